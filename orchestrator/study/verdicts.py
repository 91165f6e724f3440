"""Is A more robust than B? The verdict of a comparison of two methods' settings, with bootstrap CIs over settings,
in both directions, and for an inconclusive one the budget that would decide it."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

Verdict = Literal["holds", "does not hold", "inconclusive"]


def compare(a: np.ndarray | list[float], b: np.ndarray | list[float], *, delta: float = 1.0,
            n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Is A more robust than B? `a`, `b`: per-setting seed-mean scores of each method.

    P(a random setting of A beats one of B) (ties count half), and the differences in median and in IQR,
    each with a percentile bootstrap CI (settings of A and B resampled independently). Verdict: "A is more
    robust than B" holds when the CI of (median A - median B) lies above -delta and the CI of
    (IQR A - IQR B) lies below 0; it does not hold when either CI lies wholly on the wrong side
    (median CI below -delta, or IQR CI above 0); otherwise inconclusive.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)

    def stats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        beats = (x[:, None] > y[None, :]).mean() + 0.5 * (x[:, None] == y[None, :]).mean()
        iqr = np.subtract(*np.quantile(x, [0.75, 0.25])) - np.subtract(*np.quantile(y, [0.75, 0.25]))
        return np.array([beats, np.median(x) - np.median(y), iqr])

    point = stats(a, b)
    boots = np.array([stats(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(n_boot)])
    tail = (1 - level) / 2
    low, high = np.quantile(boots, [tail, 1 - tail], axis=0)
    median_ci, iqr_ci = (low[1], high[1]), (low[2], high[2])
    return {"p_a_beats_b": float(point[0]), "p_a_beats_b_ci": (float(low[0]), float(high[0])),
            "median_diff": float(point[1]), "median_diff_ci": (float(median_ci[0]), float(median_ci[1])),
            "iqr_diff": float(point[2]), "iqr_diff_ci": (float(iqr_ci[0]), float(iqr_ci[1])),
            "delta": delta, "verdict": _verdict(median_ci, iqr_ci, delta),
            # B more robust than A, by the same rule on the same resamples (B - A is A - B negated)
            "reverse_verdict": _verdict((-median_ci[1], -median_ci[0]), (-iqr_ci[1], -iqr_ci[0]), delta)}


def _verdict(median_ci: tuple[float, float], iqr_ci: tuple[float, float], delta: float) -> Verdict:
    if median_ci[0] > -delta and iqr_ci[1] < 0:
        return "holds"
    if median_ci[1] < -delta or iqr_ci[0] > 0:
        return "does not hold"
    return "inconclusive"


def deciding_budget(result: dict[str, Any], settings: int, seeds: int, seed_var: float, hparam_var: float,
                    seed_options: tuple[int, ...] = (1, 2)) -> list[dict[str, int]]:
    """For an inconclusive `compare` result: about how many settings per method would decide it, at the study's
    seeds and at multiples of them, if the measured differences are the true ones.

    Each CI's half-width shrinks as sqrt(var(setting mean) / settings), var(setting mean) = hparam_var +
    seed_var / seeds (the variance split of A and B summed). A verdict needs both CIs clear of their bounds
    (-delta for the median, 0 for the IQR) when both point estimates lie on the "holds" side, else one of those
    on the wrong side. Returns rows {seeds, settings, runs} (runs per method); [] when a point estimate sits on its
    bound (no budget decides it) or the verdict is already decided.
    """
    if result["verdict"] != "inconclusive":
        return []
    criteria = []
    for key, bound in (("median_diff", -result["delta"]), ("iqr_diff", 0.0)):
        low, high = result[f"{key}_ci"]
        side = (result[key] - bound) * (1 if key == "median_diff" else -1)  # > 0: on the "holds" side
        criteria.append((side, (high - low) / 2))
    if any(side == 0 or half == 0 for side, half in criteria):
        return []
    ratios = [(half / abs(side)) ** 2 for side, half in criteria]
    holds_side = all(side > 0 for side, _ in criteria)
    factor = max(ratios) if holds_side else min(r for r, (side, _) in zip(ratios, criteria, strict=True) if side < 0)
    rows = []
    for multiple in seed_options:
        k = seeds * multiple
        shrink = (hparam_var + seed_var / k) / (hparam_var + seed_var / seeds) if hparam_var + seed_var > 0 else 1.0
        n = max(settings + 1, math.ceil(settings * factor * shrink))
        rows.append({"seeds": k, "settings": n, "runs": n * k})
    return rows


def budget_text(rows: list[dict[str, int]]) -> str:
    """`verdicts.deciding_budget`'s rows in words: '64 settings x 3 seeds (192 runs) or 32 x 6 (192) per method'."""
    first, *rest = rows
    text = f"{first['settings']} settings x {first['seeds']} seeds ({first['runs']} runs)"
    return text + "".join(f" or {r['settings']} x {r['seeds']} ({r['runs']})" for r in rest) + " per method"

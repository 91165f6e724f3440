"""Is A more robust than B? The verdict of a comparison of two methods' settings, with bootstrap CIs over settings,
in both directions, and for an inconclusive one the budget that would decide it, found by simulating fresh
studies from the pilot's own settings and variance split. The bootstrap is vectorised (every resample at once)
because the budget runs it for many simulated studies in `kdo study`, `kdo report` and the demo."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

Verdict = Literal["holds", "does not hold", "inconclusive"]
POWER = 0.8  # the probability a named budget reaches the verdict with
MAX_SETTINGS = 1024  # above it, a budget is "more than" this: no study of that size is a sane proposal


def compare(a: np.ndarray | list[float], b: np.ndarray | list[float], *, delta: float = 1.0,
            n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Is A more robust than B? `a`, `b`: per-setting seed-mean scores of each method.

    P(a random setting of A beats one of B) (ties count half), and the differences in median and in IQR,
    each with a percentile bootstrap CI (settings of A and B resampled independently). Verdict: "A is more
    robust than B" holds when the CI of (median A - median B) lies above -delta and the CI of
    (IQR A - IQR B) lies below 0; it does not hold when either CI lies wholly on the wrong side
    (median CI below -delta, or IQR CI above 0); otherwise inconclusive. `reverse_verdict`: B more robust than A.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    ia, ib = rng.integers(0, len(a), (n_boot, len(a))), rng.integers(0, len(b), (n_boot, len(b)))
    median_boot, iqr_boot = _differences(a[ia][None], b[ib][None])
    # P(A beats B) of each resample from its counts: counts_a @ M @ counts_b, M the pairwise wins of the settings
    wins = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
    counts_a, counts_b = _counts(ia, len(a)), _counts(ib, len(b))
    beats_boot = ((counts_a @ wins) * counts_b).sum(axis=1) / (len(a) * len(b))
    tail = (1 - level) / 2
    low, high = (np.quantile(np.stack([beats_boot, median_boot[0], iqr_boot[0]]), q, axis=1) for q in (tail, 1 - tail))
    median_point, iqr_point = _differences(a[None, None], b[None, None])
    median_ci, iqr_ci = (float(low[1]), float(high[1])), (float(low[2]), float(high[2]))
    return {"p_a_beats_b": float(wins.mean()), "p_a_beats_b_ci": (float(low[0]), float(high[0])),
            "median_diff": float(median_point[0, 0]), "median_diff_ci": median_ci,
            "iqr_diff": float(iqr_point[0, 0]), "iqr_diff_ci": iqr_ci,
            "delta": delta, "verdict": _verdict(median_ci, iqr_ci, delta),
            # B more robust than A, by the same rule on the same resamples (B - A is A - B negated)
            "reverse_verdict": _verdict((-median_ci[1], -median_ci[0]), (-iqr_ci[1], -iqr_ci[0]), delta)}


def _differences(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and IQR differences along the last axis, for stacks of samples (studies x resamples x settings)."""
    qx, qy = np.quantile(x, [0.25, 0.5, 0.75], axis=-1), np.quantile(y, [0.25, 0.5, 0.75], axis=-1)
    return qx[1] - qy[1], (qx[2] - qx[0]) - (qy[2] - qy[0])


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of n items appears in each row of resample indices."""
    return np.stack([np.bincount(row, minlength=n) for row in indices]).astype(float)


def _verdict(median_ci: tuple[float, float], iqr_ci: tuple[float, float], delta: float) -> Verdict:
    if median_ci[0] > -delta and iqr_ci[1] < 0:
        return "holds"
    if median_ci[1] < -delta or iqr_ci[0] > 0:
        return "does not hold"
    return "inconclusive"


def reach_probability(a: np.ndarray, b: np.ndarray, splits: tuple[tuple[float, float], tuple[float, float]],
                      pilot_seeds: int, settings: int, seeds: int, target: Verdict, *, delta: float,
                      studies: int = 120, n_boot: int = 200, seed: int = 0) -> float:
    """The probability that a fresh study of `settings` x `seeds` per method reaches `target`, simulated from the
    pilot: each method's true setting values are its pilot setting means drawn toward their median by the share
    of their spread that is not seed noise (`splits`: (seed variance, hyperparameter variance) of A and B), so
    their spread is the hyperparameter variance; a fresh study draws `settings` of them and adds seed noise of
    variance seed variance / `seeds`; its verdict comes from `compare`'s rule on the same bootstrap."""
    rng = np.random.default_rng(seed)
    draws = []
    for values, (seed_var, hparam_var) in zip((a, b), splits, strict=True):
        spread = hparam_var + seed_var / pilot_seeds
        shrink = math.sqrt(max(hparam_var, 0.0) / spread) if spread > 0 else 0.0
        truth = np.median(values) + shrink * (values - np.median(values))
        picked = truth[rng.integers(0, len(truth), (studies, settings))]
        draws.append((picked + rng.normal(0.0, math.sqrt(max(seed_var, 0.0) / seeds), picked.shape)).astype(np.float32))
    reached = 0
    chunk = max(1, int(2e7 // (n_boot * settings)))  # studies per pass: about 80 MB of resamples per method
    for start in range(0, studies, chunk):
        x, y = (d[start:start + chunk] for d in draws)
        rows = np.arange(len(x))[:, None, None]
        pick = rng.integers(0, settings, (2, len(x), n_boot, settings))
        median_boot, iqr_boot = _differences(x[rows, pick[0]], y[rows, pick[1]])
        m_low, m_high = np.quantile(median_boot, [0.025, 0.975], axis=1)
        i_low, i_high = np.quantile(iqr_boot, [0.025, 0.975], axis=1)
        found = [_verdict((ml, mh), (il, ih), delta) for ml, mh, il, ih in zip(m_low, m_high, i_low, i_high,
                                                                               strict=True)]
        reached += sum(v == target for v in found)
    return reached / studies


def deciding_budget(result: dict[str, Any], a: np.ndarray, b: np.ndarray, seeds: int,
                    splits: tuple[tuple[float, float], tuple[float, float]], *,
                    seed_options: tuple[int, ...] = (1, 2), seed: int = 0) -> list[dict[str, Any]]:
    """For an inconclusive `compare` result: the smallest power-of-two number of settings per method (from 4) at
    which a fresh study reaches the verdict the point estimates lean to with probability >= `POWER`
    (`reach_probability`),
    at the study's seeds and at multiples of them; rows {seeds, settings, runs, probability}, `settings` None
    (more than `MAX_SETTINGS`) when none up to it does. [] when decided, or when a point estimate sits on its
    bound (no budget decides it)."""
    if result["verdict"] != "inconclusive" or result["median_diff"] == -result["delta"] or result["iqr_diff"] == 0:
        return []
    holds = result["median_diff"] > -result["delta"] and result["iqr_diff"] < 0
    target: Verdict = "holds" if holds else "does not hold"
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rows = []
    for multiple in seed_options:
        k = seeds * multiple
        n, found = 4, None  # the smallest power of two that decides it; it may be below the pilot's (an unlucky one)
        while n <= MAX_SETTINGS:
            probability = reach_probability(a, b, splits, seeds, n, k, target, delta=result["delta"], seed=seed)
            if probability >= POWER:
                found = (n, probability)
                break
            n *= 2
        rows.append({"seeds": k, "settings": found[0] if found else None,
                     "runs": found[0] * k if found else None, "probability": found[1] if found else None})
    return rows


def budget_text(rows: list[dict[str, Any]]) -> str:
    """`deciding_budget`'s rows in words: '64 settings x 3 seeds (192 runs, P 0.83) or 32 x 6 (192, P 0.81) per
    method', or 'more than 1024 settings x 3 seeds' where none up to the cap decides it."""
    def one(row: dict[str, Any], first: bool) -> str:
        if row["settings"] is None:
            return f"more than {MAX_SETTINGS} settings x {row['seeds']} seeds" if first else \
                f"more than {MAX_SETTINGS} x {row['seeds']}"
        if first:
            return (f"{row['settings']} settings x {row['seeds']} seeds ({row['runs']} runs, "
                    f"P {row['probability']:.2f})")
        return f"{row['settings']} x {row['seeds']} ({row['runs']}, P {row['probability']:.2f})"

    first, *rest = rows
    return one(first, True) + "".join(f" or {one(r, False)}" for r in rest) + " per method"

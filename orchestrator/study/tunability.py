"""Tunability (Probst et al., arXiv 1802.09596): the gain of tuning over the defaults, overall and per parameter
through a random-forest surrogate; the per-parameter gain also cross-fitted over seeds with a bootstrap CI."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

FOREST_TREES = 30  # the cross-fitted forests: many are fitted (2 a fold, a fold a seed, per resample), each small


def tunability(means: pd.DataFrame, parameters: dict[str, list[str]], seed: int = 0) -> pd.DataFrame:
    """Gain of tuning over the defaults, overall and per parameter (Probst et al., arXiv 1802.09596).

    Overall: best design setting minus the default setting (seed means). Per parameter: as Probst et al.
    do, through a surrogate (a random forest on the design's seed means): the best predicted score when
    only that parameter moves away from its default value, minus the surrogate's prediction at the defaults.
    Both are optimistic (a maximum over the settings tried, over the probes): labelled so wherever shown; the
    per-parameter gain is not clipped at 0. `cross_fit` gives the overall gain without the winner's curse.
    """
    from sklearn.ensemble import RandomForestRegressor

    rows = []
    for method, group in means.groupby("method", sort=False):
        defaults = group[group["defaults"]] if "defaults" in group else group.iloc[:0]
        design = group[~group["defaults"]] if "defaults" in group else group
        row: dict[str, Any] = {"method": method, "default": math.nan, "best": float(design["score"].max()),
                               "gain": math.nan}
        params = [p for p in parameters.get(method, []) if p in group and group[p].notna().all()]
        if not defaults.empty:
            row["default"] = float(defaults["score"].iloc[0])
            row["gain"] = row["best"] - row["default"]
        numeric = [p for p in params if pd.api.types.is_numeric_dtype(group[p])]
        if not defaults.empty and numeric and len(design) >= 4:
            x = design[numeric].to_numpy(dtype=float)
            forest = RandomForestRegressor(n_estimators=200, random_state=seed, min_samples_leaf=1).fit(
                x, design["score"].to_numpy(dtype=float))
            at_default = defaults[numeric].to_numpy(dtype=float)[0]
            base = float(forest.predict(at_default[None])[0])
            for j, p in enumerate(numeric):
                probe = np.repeat(at_default[None], len(design), axis=0)
                probe[:, j] = x[:, j]
                row[f"gain/{p}"] = float(forest.predict(probe).max()) - base  # unclipped; a max over probes
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def parameter_tunability(runs: pd.DataFrame, parameters: dict[str, list[str]], *, n_boot: int = 40,
                         level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per (method, parameter), the gain of tuning that parameter alone, without the winner's curse: leave one seed
    out; a surrogate fitted on the other seeds' means chooses the best probe (the defaults with only that parameter
    moved to a design setting's value), and a surrogate fitted on the seed left out scores it against the defaults;
    averaged over seeds, unclipped. `low`/`high`: a percentile bootstrap CI over settings. `runs`: `analysis.scored`'s
    table (per seed); NaN with one seed, without defaults, or with fewer than 4 design settings."""
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    rows = []
    for method, group in runs.groupby("method", sort=False):
        design = group[~group["defaults"]] if "defaults" in group else group
        defaults = group[group["defaults"]] if "defaults" in group else group.iloc[:0]
        numeric = [p for p in parameters.get(method, []) if p in group and group[p].notna().all()
                   and pd.api.types.is_numeric_dtype(group[p])]
        table = design.pivot_table(index="setting_id", columns="seed", values="score", aggfunc="mean")
        if defaults.empty or not numeric or len(table) < 4 or table.shape[1] < 2:
            continue
        x = design.groupby("setting_id")[numeric].first().loc[table.index].to_numpy(dtype=float)
        at_default = defaults[numeric].to_numpy(dtype=float)[0]
        scores = table.to_numpy(dtype=float)
        point = _crossed_gains(x, scores, at_default, seed)
        boots = np.array([_crossed_gains(x[pick], scores[pick], at_default, seed)
                          for pick in rng.integers(0, len(x), (n_boot, len(x)))])
        low, high = np.nanquantile(boots, [tail, 1 - tail], axis=0)
        rows += [{"method": method, "parameter": p, "tunability_cross": point[j], "tunability_low": low[j],
                  "tunability_high": high[j]} for j, p in enumerate(numeric)]
    return pd.DataFrame(rows, columns=["method", "parameter", "tunability_cross", "tunability_low",
                                       "tunability_high"])


def _crossed_gains(x: np.ndarray, scores: np.ndarray, at_default: np.ndarray, seed: int) -> np.ndarray:
    """Per parameter, the cross-fitted gain over the seeds (columns of `scores`, NaN where a run is missing)."""
    from sklearn.ensemble import RandomForestRegressor

    gains = []
    for held in range(scores.shape[1]):
        choosing, scoring = np.nanmean(np.delete(scores, held, axis=1), axis=1), scores[:, held]
        usable = np.isfinite(choosing) & np.isfinite(scoring)
        if usable.sum() < 4:
            continue
        fits = [RandomForestRegressor(n_estimators=FOREST_TREES, random_state=seed).fit(x[usable], y[usable])
                for y in (choosing, scoring)]
        fold = []
        for j in range(x.shape[1]):
            probes = np.repeat(at_default[None], usable.sum(), axis=0)
            probes[:, j] = x[usable, j]
            best = probes[int(np.argmax(fits[0].predict(probes)))]
            fold.append(float(fits[1].predict(best[None])[0] - fits[1].predict(at_default[None])[0]))
        gains.append(fold)
    return np.mean(gains, axis=0) if gains else np.full(x.shape[1], math.nan)

"""Robustness analysis of a study's results: plain functions on the results DataFrame.

The results table has one row per (method, setting, seed) with at least `method`, `setting_id`, `seed`,
`status`, the metric columns and one column per hyperparameter; `defaults` marks the method's default
setting. Accuracies are in whatever unit the table uses (the study uses percentage points).

Failed runs (`diverged`, `invalid`, `crashed`) are never dropped silently: `failures="chance"` counts them at chance
level in every accuracy statistic, `failures="drop"` leaves them out; the failure rate is reported either way.
Measures follow the HPO-reporting literature: variance split (Bouthillier et al., arXiv 2103.03098),
tunability (Probst et al., arXiv 1802.09596), expected best validation accuracy vs budget (Dodge et al.,
arXiv 1909.03004, with the unbiased without-replacement estimator of Tang et al. 2020), and Optuna's fANOVA /
PED-ANOVA importances.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd

from orchestrator.search.status import FAILED, normalize

Failures = Literal["chance", "drop"]


def scored(frame: pd.DataFrame, metric: str, chance: float, failures: Failures = "chance") -> pd.DataFrame:
    """`frame` with a `score` column: the metric, failed runs at `chance` (or removed with `failures="drop"`)."""
    out = frame.copy()
    failed = out["status"].map(normalize).isin(FAILED)
    out["failed"] = failed
    out["score"] = out[metric].where(~failed, chance)
    if failures == "drop":
        out = out[~failed]
    return out


def setting_means(frame: pd.DataFrame, metric: str, chance: float, failures: Failures = "chance",
                  parameters: list[str] | None = None) -> pd.DataFrame:
    """One row per (method, setting): seed-mean `score`, its seed std, seeds run, failures, the parameters.

    With `failures="drop"` a setting whose seeds all failed keeps its row (and its failures) with no score.
    """
    full = scored(frame, metric, chance)
    keys = ["method", "setting_id"]
    out = full.groupby(keys, sort=False).agg(seeds=("score", "size"), failed=("failed", "sum")).reset_index()
    kept = full if failures == "chance" else full[~full["failed"]]
    scores = kept.groupby(keys, sort=False)["score"].agg(score="mean", seed_std="std").reset_index()
    out = out.merge(scores, on=keys, how="left")
    extra = [c for c in (parameters or []) + ["defaults"] if c in full.columns]
    if extra:
        out = out.merge(full.groupby(keys, sort=False)[extra].first().reset_index(), on=keys)
    return out


def distribution(means: pd.DataFrame, delta: float = 1.0) -> pd.DataFrame:
    """Per method, over its design settings (not the defaults): best, median, mean, std, IQR, P10, worst,
    failure rate, and the share of settings within `delta` of the method's best."""
    rows = []
    for method, group in means.groupby("method", sort=False):
        design = group[~group["defaults"]] if "defaults" in group else group
        s = design["score"].dropna().to_numpy(dtype=float)
        failure_rate = float(design["failed"].sum() / max(1, design["seeds"].sum()))
        if len(s) == 0:  # every setting failed (and failures are dropped): a row of NaNs with its failures
            rows.append({"method": method, "settings": 0, "failure_rate": failure_rate})
            continue
        q10, q25, q50, q75 = np.quantile(s, [0.10, 0.25, 0.50, 0.75])
        rows.append({"method": method, "settings": len(s), "best": s.max(), "median": q50, "mean": s.mean(),
                     "std": s.std(ddof=1) if len(s) > 1 else math.nan, "iqr": q75 - q25, "p10": q10,
                     "worst": s.min(),
                     "failure_rate": failure_rate,
                     "within_delta": float(np.mean(s >= s.max() - delta))})
    return pd.DataFrame(rows).set_index("method")


def variance_split(frame: pd.DataFrame, metric: str, *, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """Per method, over its design settings: seed variance vs hyperparameter variance, on finished runs only.

    A one-way random-effects ANOVA for unbalanced data, by unweighted means: the seed variance is the pooled
    within-setting variance (MSW); the hyperparameter variance is the variance of the setting means minus
    MSW x mean(1/n_i), which is unbiased however many seeds each setting kept (`hparam_var`, unclipped: it may
    be negative). `hparam_std` and `hparam_share` clip it at 0 (a point estimate); `hparam_share_low/high` are a
    percentile bootstrap CI over settings, which is what any reading of the share is gated on. Failed runs are
    no values here: `failure_rate` (failed over outcome runs) with its bootstrap CI over settings is their column.
    """
    data = frame[~frame["defaults"]] if "defaults" in frame else frame
    failed = data["status"].map(normalize).isin(FAILED)
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2
    rows = []
    for method, group in data.assign(failed=failed).groupby("method", sort=False):
        per = group.groupby("setting_id", sort=False)
        runs, fails = per.size().to_numpy(float), per["failed"].sum().to_numpy(float)
        done = group[~group["failed"]].groupby("setting_id", sort=False)[metric]
        n = done.size().reindex(per.size().index, fill_value=0).to_numpy(float)
        means = done.mean().reindex(per.size().index).to_numpy(float)
        ss = (done.var(ddof=1) * (done.size() - 1)).reindex(per.size().index).fillna(0.0).to_numpy(float)
        idx = np.vstack([np.arange(len(runs)), rng.integers(0, len(runs), (n_boot, len(runs)))])  # row 0: as is
        hp, seed_var = _unweighted_means(n[idx], means[idx], ss[idx])
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 (no variance at all) is NaN by the where below
            share = np.where(hp + seed_var > 0, np.clip(hp, 0, None) / (np.clip(hp, 0, None) + seed_var), np.nan)
        rate = fails[idx].sum(axis=1) / runs[idx].sum(axis=1)
        share_ci = np.nanquantile(share[1:], [tail, 1 - tail]) if np.isfinite(share[1:]).any() else (np.nan,) * 2
        rate_ci = np.quantile(rate[1:], [tail, 1 - tail])
        rows.append({"method": method, "seed_std": math.sqrt(seed_var[0]) if np.isfinite(seed_var[0]) else math.nan,
                     "hparam_var": hp[0], "hparam_std": math.sqrt(max(0.0, hp[0])) if np.isfinite(hp[0]) else math.nan,
                     "hparam_share": share[0], "hparam_share_low": share_ci[0], "hparam_share_high": share_ci[1],
                     "failure_rate": rate[0], "failure_rate_low": rate_ci[0], "failure_rate_high": rate_ci[1]})
    columns = ["method", "seed_std", "hparam_var", "hparam_std", "hparam_share", "hparam_share_low",
               "hparam_share_high", "failure_rate", "failure_rate_low", "failure_rate_high"]
    return pd.DataFrame(rows, columns=columns).set_index("method")


def _unweighted_means(n: np.ndarray, means: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of settings (n seeds kept, their mean, their sum of squared deviations): the unbiased
    hyperparameter variance var(means) - MSW x mean(1/n) and the seed variance MSW; NaN where undefined (fewer
    than two settings with a run, no setting with two). Written out because statsmodels' ANOVA has no
    unweighted-means estimator for unbalanced random effects, and this runs for every bootstrap resample at once."""
    kept = n > 0
    count = kept.sum(axis=1)
    dof = np.where(kept, n - 1, 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        seed_var = np.where(dof > 0, np.where(kept, ss, 0).sum(axis=1) / dof, np.nan)
        centre = np.where(kept, means, 0).sum(axis=1) / count
        between = np.where(kept, (means - centre[:, None]) ** 2, 0).sum(axis=1) / (count - 1)
        inverse = np.where(kept, 1.0 / np.where(kept, n, 1), 0).sum(axis=1) / count
        hp = np.where(count > 1, between - np.nan_to_num(seed_var) * inverse, np.nan)
    return hp, seed_var


def max_weights(n: int) -> np.ndarray:
    """(n, n) weights: row k-1 gives E[best of k distinct settings out of n] as weights on the n values sorted
    ascending, C(j-1, k-1) / C(n, k) on the j-th (Tang et al. 2020, "Showing your work doesn't always work"; the
    U-statistic of the maximum, unbiased for the population's expected best of k). In log space: C(n, k)
    overflows floats beyond n of about 1,000."""
    from math import lgamma

    lg = np.array([0.0] + [lgamma(i) for i in range(1, n + 2)])  # lg[i] = log((i-1)!); lg[0] unused
    k = np.arange(1, n + 1)[:, None]
    j = np.arange(1, n + 1)[None, :]
    ok = j >= k
    jj = np.where(ok, j, k)
    log_w = (lg[jj] - lg[k] - lg[jj - k + 1]) - (lg[n + 1] - lg[k + 1] - lg[n - k + 1])
    return np.where(ok, np.exp(log_w), 0.0)


def expected_max(values: np.ndarray | list[float], budget: int) -> float:
    """The expected best of `budget` distinct settings drawn at random from the N tried (`max_weights`): 1 is
    the mean, N the best setting itself. Dodge et al.'s with-replacement formula reads low (its N-th point stays
    below the best); this one is unbiased for the population the settings were drawn from."""
    v = np.sort(np.asarray(values, dtype=float))
    return float(max_weights(len(v))[budget - 1] @ v)


def expected_best_curve(means: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Per method, the expected best seed-mean accuracy after n = 1..N settings tried at random (`expected_max`),
    with a percentile bootstrap CI over settings (the settings resampled): where the curve would lie for another
    draw of settings, which is what a band around it is read as. Columns method, budget, expected_best,
    ci_low, ci_high."""
    rng = np.random.default_rng(seed)
    rows = []
    tail = (1 - level) / 2
    for method, group in means.groupby("method", sort=False):
        design = group[~group["defaults"]] if "defaults" in group else group
        scores = np.sort(design["score"].dropna().to_numpy(dtype=float))
        n = len(scores)
        if n == 0:
            continue
        weights = max_weights(n)
        boots = min(n_boot, max(100, int(4e7 // n**2)))  # the (boots x n x n) product stays about 1e8 at most
        resampled = np.sort(rng.choice(scores, size=(boots, n)), axis=1)
        curves = resampled @ weights.T  # (boots, n): every resample's whole curve at once
        low, high = np.quantile(curves, [tail, 1 - tail], axis=0)
        for budget, (value, lo, hi) in enumerate(zip(weights @ scores, low, high, strict=True), start=1):
            rows.append({"method": method, "budget": budget, "expected_best": float(value), "ci_low": float(lo),
                         "ci_high": float(hi)})
    return pd.DataFrame(rows, columns=["method", "budget", "expected_best", "ci_low", "ci_high"])


def cross_fit(scored_runs: pd.DataFrame, delta: float = 1.0) -> pd.DataFrame:
    """Per method, the tuned accuracy without the winner's curse: leave one seed out, choose the best design
    setting on the other seeds' mean, score it on the seed left out, and average over the seeds (cross-fitting).
    `tuned_cross`: that score; `tunability_cross`: it minus the defaults' score on the same seeds left out;
    `within_delta_cross`: the share of settings within `delta` of the chosen one on the seed left out. NaN (n/a)
    with fewer than two seeds: one seed cannot both choose and score. `scored_runs`: `scored`'s table."""
    rows = []
    for method, group in scored_runs.groupby("method", sort=False):
        design = group[~group["defaults"]] if "defaults" in group else group
        table = design.pivot_table(index="setting_id", columns="seed", values="score", aggfunc="mean")
        defaults = group[group["defaults"]].groupby("seed")["score"].mean() if "defaults" in group else None
        tuned, gains, within = [], [], []
        for held in table.columns if table.shape[1] > 1 else []:
            choosing = table.drop(columns=held).mean(axis=1)
            scored_out = table[held]
            usable = choosing.notna() & scored_out.notna()
            if not usable.any():
                continue
            chosen = float(scored_out[choosing[usable].idxmax()])
            tuned.append(chosen)
            within.append(float((scored_out[scored_out.notna()] >= chosen - delta).mean()))
            if defaults is not None and held in defaults.index:
                gains.append(chosen - float(defaults[held]))
        rows.append({"method": method, "tuned_cross": np.mean(tuned) if tuned else math.nan,
                     "tunability_cross": np.mean(gains) if gains else math.nan,
                     "within_delta_cross": np.mean(within) if within else math.nan})
    return pd.DataFrame(rows, columns=["method", "tuned_cross", "tunability_cross", "within_delta_cross"]
                        ).set_index("method")


def importances(means: pd.DataFrame, spaces: dict[str, Any], seed: int = 0,
                target_quantile: float = 0.25) -> pd.DataFrame:
    """Per-parameter importance per method, from Optuna evaluators named explicitly (Optuna 5 changed the
    default): fANOVA on the seed means, and PED-ANOVA for the top `target_quantile` of settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for method, group in means.groupby("method", sort=False):
        space = spaces.get(method)
        design = group[~group["defaults"]] if "defaults" in group else group
        if space is None or len(design) < 4 or design["score"].nunique() < 2:
            continue  # too few settings, or all score the same (fANOVA raises on zero variance): no importances
        distributions = {p: optuna_distribution(spec) for p, spec in space.parameters.items() if p in design}
        if not distributions:
            continue
        study = optuna.create_study(direction="maximize")
        study.add_trials([
            optuna.trial.create_trial(params={p: optuna_value(r[p], distributions[p]) for p in distributions},
                                      distributions=distributions, value=float(r["score"]))
            for _, r in design.iterrows()])
        evaluators = {"fanova": optuna.importance.FanovaImportanceEvaluator(seed=seed),
                      "ped_anova": optuna.importance.PedAnovaImportanceEvaluator(target_quantile=target_quantile)}
        for name, evaluator in evaluators.items():
            if len(distributions) == 1:  # one parameter: all the importance is its own
                scores = dict.fromkeys(distributions, 1.0)
            else:
                scores = optuna.importance.get_param_importances(study, evaluator=evaluator)
            for p, value in scores.items():
                rows.append({"method": method, "evaluator": name, "parameter": p, "importance": float(value)})
    return pd.DataFrame(rows, columns=["method", "evaluator", "parameter", "importance"])


def optuna_distribution(spec: Any) -> Any:
    import optuna.distributions as d

    if spec.type == "choice":
        return d.CategoricalDistribution(spec.values)
    if spec.type == "int":
        return d.IntDistribution(int(spec.low), int(spec.high), log=spec.log)
    return d.FloatDistribution(spec.low, spec.high, log=spec.log)


def optuna_value(value: Any, distribution: Any) -> Any:
    import optuna.distributions as d

    if isinstance(distribution, d.IntDistribution):
        return int(value)
    if isinstance(distribution, d.FloatDistribution):
        return min(max(float(value), distribution.low), distribution.high)
    return value.item() if hasattr(value, "item") else value

"""The robustness measures on hand-built result tables whose answers are known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from orchestrator.search.spaces import ParamSpec, SearchSpace
from orchestrator.study.analysis import (
    _unweighted_means,
    cross_fit,
    distribution,
    expected_best_curve,
    expected_max,
    importances,
    max_weights,
    scored,
    setting_means,
    variance_split,
)
from orchestrator.study.tunability import parameter_tunability, tunability
from orchestrator.study.verdicts import budget_text, compare, deciding_budget

CHANCE = 10.0
X, Y = "method.params.x", "method.params.y"  # a space's bare names are method.params paths


def _table(method: str, setting_scores: dict[str, list[float]], statuses: dict[tuple[str, int], str] | None = None,
           params: dict[str, dict[str, float]] | None = None, defaults: str | None = None) -> pd.DataFrame:
    rows = []
    for sid, scores in setting_scores.items():
        for seed, score in enumerate(scores):
            status = (statuses or {}).get((sid, seed), "finished")
            rows.append({"method": method, "setting_id": sid, "seed": seed, "status": status,
                         "val_acc": math.nan if status != "finished" else score, "defaults": sid == defaults,
                         **(params or {}).get(sid, {})})
    return pd.DataFrame(rows)


def test_variance_split_matches_the_anova_estimate() -> None:
    # Seed effects -1, 0, +1 in every setting: within-setting variance exactly 1.
    centres = [10.0, 12.0, 14.0, 16.0]
    frame = _table("m", {f"s{k}": [c - 1, c, c + 1] for k, c in enumerate(centres)})
    split = variance_split(frame, "val_acc").loc["m"]
    between = np.var(centres, ddof=1) - 1.0 / 3
    assert split["seed_std"] == pytest.approx(1.0)
    assert split["hparam_std"] == pytest.approx(math.sqrt(between))
    assert split["hparam_share"] == pytest.approx(between / (between + 1.0))
    assert split["hparam_share_low"] <= split["hparam_share"] <= split["hparam_share_high"]
    noise = variance_split(_table("m", {f"s{k}": [9.0, 10.0, 11.0] for k in range(5)}), "val_acc").loc["m"]
    assert noise["hparam_var"] < 0 and noise["hparam_share_high"] < 0.1  # its CI, not a clipped 0, says noise


def _simulated(studies: int, settings: int, seeds: int, hparam_var: float, missing: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per study and setting: seeds kept, their mean and sum of squared deviations (seed variance 1)."""
    centre = rng.normal(0.0, math.sqrt(hparam_var), (studies, settings, 1))
    runs = centre + rng.normal(0.0, 1.0, (studies, settings, seeds))
    kept = rng.random(runs.shape) >= missing
    n = kept.sum(axis=2).astype(float)
    means = np.where(kept, runs, 0).sum(axis=2) / np.maximum(n, 1)
    ss = np.where(kept, (runs - means[..., None]) ** 2, 0).sum(axis=2)
    return n, means, ss


@pytest.mark.parametrize("hparam_var", [0.0, 1.0])
def test_the_hyperparameter_variance_is_unbiased_with_runs_missing(hparam_var: float) -> None:
    n, means, ss = _simulated(4000, 16, 3, hparam_var, missing=0.3, rng=np.random.default_rng(3))
    hp, seed_var = _unweighted_means(n, means, ss)
    error = 4 * np.nanstd(hp) / math.sqrt(np.isfinite(hp).sum())
    assert abs(np.nanmean(hp) - hparam_var) < error and abs(np.nanmean(seed_var) - 1.0) < 0.02
    kept = n > 0  # the old correction, MSW / mean(n_i), on the same studies: biased upward
    old = (np.nanmean(np.where(kept, means, np.nan) ** 2, axis=1) - np.nanmean(np.where(kept, means, np.nan),
                                                                                axis=1) ** 2)
    old = old * kept.sum(axis=1) / (kept.sum(axis=1) - 1) - seed_var / np.where(kept, n, np.nan).mean(axis=1)
    if hparam_var == 0.0:  # the case: it read 0.116 where the truth is 0
        assert np.nanmean(old) - hparam_var > 2 * error


def test_failures_are_their_own_column_not_values_in_the_variance() -> None:
    # True share 0.5 (hyperparameter and seed variance 1); 5% of runs fail at random. The old split scored them at
    # chance inside the variance (share about 0.08); here they are the failure rate.
    rng = np.random.default_rng(5)
    shares, rates = [], []
    for _ in range(60):
        centres = rng.normal(80.0, 1.0, 16)
        scores = {f"s{k}": list(c + rng.normal(0.0, 1.0, 3)) for k, c in enumerate(centres)}
        failed = {(f"s{k}", s): "diverged" for k in range(16) for s in range(3) if rng.random() < 0.05}
        split = variance_split(_table("m", scores, statuses=failed), "val_acc", n_boot=50).loc["m"]
        shares.append(split["hparam_var"] / (split["hparam_var"] + split["seed_std"] ** 2))
        rates.append(split["failure_rate"])
        assert split["failure_rate_low"] <= split["failure_rate"] <= split["failure_rate_high"]
    assert np.mean(shares) == pytest.approx(0.5, abs=0.08) and np.mean(rates) == pytest.approx(0.05, abs=0.015)


def test_distribution_and_within_delta_share() -> None:
    frame = _table("m", {"a": [90.0, 90.0], "b": [89.5, 89.5], "c": [88.0, 88.0], "d": [70.0, 70.0]})
    d = distribution(setting_means(frame, "val_acc", CHANCE), delta=1.0).loc["m"]
    assert (d["best"], d["worst"], d["settings"]) == (90.0, 70.0, 4)
    assert d["within_delta"] == 0.5 and d["median"] == pytest.approx(88.75)
    assert d["iqr"] == pytest.approx(np.subtract(*np.quantile([90, 89.5, 88, 70], [0.75, 0.25])))
    assert d["failure_rate"] == 0.0


def test_failures_count_at_chance_or_are_dropped_but_always_counted() -> None:
    frame = _table("m", {"a": [80.0, 80.0], "b": [60.0, 70.0]}, statuses={("b", 1): "diverged"})
    at_chance = setting_means(frame, "val_acc", CHANCE).set_index("setting_id")
    assert at_chance.loc["b", "score"] == pytest.approx((60.0 + CHANCE) / 2)
    assert at_chance.loc["b", "failed"] == 1
    dropped = setting_means(frame, "val_acc", CHANCE, failures="drop").set_index("setting_id")
    assert dropped.loc["b", "score"] == 60.0 and dropped.loc["b", "failed"] == 1
    for means in (at_chance.reset_index(), dropped.reset_index()):
        assert distribution(means).loc["m", "failure_rate"] == pytest.approx(1 / 4)
    all_failed = _table("m", {"a": [80.0], "b": [0.0]}, statuses={("b", 0): "error"})
    assert distribution(setting_means(all_failed, "val_acc", CHANCE, failures="drop")).loc["m", "worst"] == 80.0
    assert distribution(setting_means(all_failed, "val_acc", CHANCE)).loc["m", "worst"] == CHANCE


def test_expected_max_is_the_mean_best_of_k_distinct_settings_and_ends_at_the_best() -> None:
    values = np.array([3.0, 7.0, 7.0, 1.0, 9.5])
    for budget in range(1, 6):  # every subset of k distinct settings, enumerated
        maxima = [max(draw) for draw in itertools.combinations(values, budget)]
        assert expected_max(values, budget) == pytest.approx(np.mean(maxima))
    curve = expected_best_curve(setting_means(_table("m", {f"s{i}": [v] for i, v in enumerate(values)}),
                                              "val_acc", CHANCE))
    assert list(curve["budget"]) == [1, 2, 3, 4, 5]
    assert curve["expected_best"].is_monotonic_increasing
    assert curve["expected_best"].iloc[0] == pytest.approx(values.mean())
    assert curve["expected_best"].iloc[-1] == pytest.approx(values.max()), "n = N is the best setting tried"
    assert (curve["ci_low"] <= curve["expected_best"] + 1e-9).all() and (curve["expected_best"] <= curve["ci_high"]
                                                                          + 1e-9).all()
    sixteen = np.arange(1.0, 17.0)  # the case: the with-replacement curve ended at 15.48
    assert expected_max(sixteen, 16) == 16.0


@pytest.mark.parametrize("population", ["normal", "collapsing"])
def test_expected_best_is_unbiased_for_the_population_in_simulation(population: str) -> None:
    # A study tries N settings drawn from a population; the truth is the population's expected best of k draws.
    rng = np.random.default_rng(7)

    def draw(size: tuple[int, ...]) -> np.ndarray:
        good = rng.normal(85.0, 2.0, size)
        return good if population == "normal" else np.where(rng.random(size) < 0.3, CHANCE, good)

    truth_draws = draw((200_000, 16))
    for n in (8, 16):
        studies = np.sort(draw((4000, n)), axis=1)
        estimates = studies @ max_weights(n).T  # every study's curve at once
        for k in (1, 2, 4, n):
            truth = truth_draws[:, :k].max(axis=1).mean()
            error = 4 * estimates[:, k - 1].std() / math.sqrt(len(studies)) + 0.05  # 4 simulation SEs, the truth's
            assert abs(estimates[:, k - 1].mean() - truth) < error, (n, k)
            if k == n or (k == 2 and population == "collapsing"):  # Dodge et al.'s with-replacement weights miss it
                i = np.arange(1, n + 1)
                biased = studies @ ((i / n) ** k - ((i - 1) / n) ** k)
                assert truth - biased.mean() > 2 * error, (n, k)


def test_bootstrap_ci_covers_a_known_difference_and_gives_each_verdict() -> None:
    rng = np.random.default_rng(1)
    steady, fragile = 80 + rng.normal(0, 0.5, 256), 80 + rng.normal(0, 3.0, 256)
    out = compare(steady, fragile, delta=1.0, n_boot=2000)
    low, high = out["median_diff_ci"]
    assert low < out["median_diff"] < high and low < 0.0 < high  # true median difference is 0
    assert out["iqr_diff_ci"][1] < 0 and out["verdict"] == "holds"
    reverse = compare(fragile, steady, delta=1.0, n_boot=2000)
    assert reverse["verdict"] == "does not hold" and reverse["reverse_verdict"] == "holds"  # the direction that holds
    assert out["reverse_verdict"] == "does not hold"
    worse = compare(steady - 5.0, fragile, delta=1.0, n_boot=2000)
    assert worse["median_diff_ci"][1] < -1.0 and worse["verdict"] == "does not hold"
    same = compare(fragile[:8], fragile[8:16], delta=1.0, n_boot=2000)
    assert same["verdict"] == "inconclusive"
    assert compare([2.0, 3.0], [1.0, 1.0], n_boot=10)["p_a_beats_b"] == 1.0
    assert compare([1.0], [1.0], n_boot=10)["p_a_beats_b"] == 0.5


def _one_parameter_method() -> tuple[pd.DataFrame, SearchSpace]:
    """Score depends on x only (peak at x = 0.7); y is noise-free and irrelevant; defaults at x = 0.2."""
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, 1, 32), rng.uniform(0, 1, 32)
    settings = {f"s{i}": [90 - 100 * (x - 0.7) ** 2] for i, x in enumerate(xs)}
    params = {f"s{i}": {X: x, Y: y} for i, (x, y) in enumerate(zip(xs, ys, strict=True))}
    settings["default"] = [90 - 100 * 0.25]
    params["default"] = {X: 0.2, Y: 0.5}
    frame = _table("m", settings, params=params, defaults="default")
    space = SearchSpace(parameters={"x": ParamSpec(type="float", low=0, high=1),
                                    "y": ParamSpec(type="float", low=0, high=1)})
    return frame, space


def test_cross_fitted_tuning_carries_no_winners_curse_when_every_setting_is_equal() -> None:
    # The case: 16 equal settings (84.00, seed std 1) x 3 seeds, defaults too. The best tried reads about
    # +1 point above the truth; cross-fitting reads the truth, and so does its tunability (about 0).
    rng = np.random.default_rng(11)
    best, crossed, gains = [], [], []
    for _ in range(150):
        scores = {f"s{k}": list(84.0 + rng.normal(0.0, 1.0, 3)) for k in range(16)}
        scores["default"] = list(84.0 + rng.normal(0.0, 1.0, 3))
        frame = _table("m", scores, defaults="default")
        out = cross_fit(scored(frame, "val_acc", CHANCE)).loc["m"]
        design = setting_means(frame, "val_acc", CHANCE)
        best.append(design[~design["defaults"]]["score"].max())
        crossed.append(out["tuned_cross"])
        gains.append(out["tunability_cross"])
    assert np.mean(best) - 84.0 > 0.8  # the winner's curse the best-tried number carries
    assert abs(np.mean(crossed) - 84.0) < 0.25 and abs(np.mean(gains)) < 0.3
    one_seed = cross_fit(scored(_table("m", {"a": [80.0], "b": [82.0]}), "val_acc", CHANCE)).loc["m"]
    assert math.isnan(one_seed["tuned_cross"]), "one seed cannot both choose and score: n/a"


def test_cross_fitted_per_parameter_tunability_reads_no_gain_where_there_is_none() -> None:
    # Every setting and the defaults equal (84, seed std 1), 16 settings x 3 seeds over two parameters: the
    # surrogate's best probe reads a gain (a maximum over probes); cross-fitted it reads about 0, CI around it.
    rng = np.random.default_rng(13)
    optimistic, crossed, covered = [], [], 0
    for _ in range(6):
        xs, ys = rng.uniform(0, 1, 16), rng.uniform(0, 1, 16)
        scores = {f"s{i}": list(84.0 + rng.normal(0.0, 1.0, 3)) for i in range(16)}
        scores["default"] = list(84.0 + rng.normal(0.0, 1.0, 3))
        params = {f"s{i}": {X: x, Y: y} for i, (x, y) in enumerate(zip(xs, ys, strict=True))}
        params["default"] = {X: 0.5, Y: 0.5}
        frame = _table("m", scores, params=params, defaults="default")
        runs = scored(frame, "val_acc", CHANCE)
        crossed_table = parameter_tunability(runs, {"m": [X, Y]}, n_boot=5).set_index("parameter")
        means = setting_means(frame, "val_acc", CHANCE, parameters=[X, Y])
        surrogate = tunability(means, {"m": [X, Y]}).loc["m"]
        optimistic += [surrogate[f"gain/{X}"], surrogate[f"gain/{Y}"]]
        crossed += list(crossed_table["tunability_cross"])
        covered += int(((crossed_table["tunability_low"] <= 0) & (0 <= crossed_table["tunability_high"])).sum())
    assert np.mean(optimistic) > 0.25 and abs(np.mean(crossed)) < 0.2, (np.mean(optimistic), np.mean(crossed))
    assert covered >= 8, covered  # of 12 CIs (5 resamples each: coarse), most hold the true 0


def test_tunability_overall_and_per_parameter() -> None:
    frame, _ = _one_parameter_method()
    means = setting_means(frame, "val_acc", CHANCE, parameters=[X, Y])
    t = tunability(means, {"m": [X, Y]}).loc["m"]
    assert t["default"] == pytest.approx(65.0)
    assert t["gain"] == pytest.approx(means[~means["defaults"]]["score"].max() - 65.0)
    assert t[f"gain/{X}"] > 15.0 and t[f"gain/{Y}"] < 3.0


def test_importances_name_their_evaluator_and_find_the_parameter_that_matters() -> None:
    frame, space = _one_parameter_method()
    means = setting_means(frame, "val_acc", CHANCE, parameters=[X, Y])
    imp = importances(means, {"m": space}).set_index(["evaluator", "parameter"])["importance"]
    assert set(imp.index.get_level_values(0)) == {"fanova", "ped_anova"}
    assert imp[("fanova", X)] > imp[("fanova", Y)]
    assert imp[("ped_anova", X)] > imp[("ped_anova", Y)]


def test_importances_skip_a_method_whose_settings_all_score_the_same() -> None:
    # Every run of a method failed (all at chance): fANOVA would raise on the zero variance.
    frame, space = _one_parameter_method()
    flat = frame.assign(method="flat", val_acc=CHANCE)
    means = setting_means(pd.concat([frame, flat]), "val_acc", CHANCE, parameters=[X, Y])
    imp = importances(means, {"m": space, "flat": space})
    assert set(imp["method"]) == {"m"}


def test_the_deciding_budget_decides_in_at_least_80_percent_of_fresh_studies() -> None:
    # The truth: A's settings spread less than B's (hyperparameter std 1.0 vs 1.6, seed std 1, 3 seeds), same
    # median: "A is more robust than B" is true. The budget is named from a large pilot (the true differences),
    # then fresh studies of that size, drawn from the truth and judged by `compare` itself, must reach it >= 80%.
    rng = np.random.default_rng(2)
    truth = {"a": 1.0, "b": 1.6}

    def fresh(settings: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(80 + rng.normal(0, truth[m], settings) + rng.normal(0, 1, (settings, 3)).mean(axis=1)
                     for m in ("a", "b"))

    pilot = fresh(256)
    result = {**compare(*pilot, delta=1.0, n_boot=500), "verdict": "inconclusive"}
    splits = ((1.0, truth["a"] ** 2), (1.0, truth["b"] ** 2))
    [row] = deciding_budget(result, *pilot, 3, splits, seed_options=(1,))
    assert row["seeds"] == 3 and row["settings"] is not None and row["probability"] >= 0.8
    assert row["settings"] & (row["settings"] - 1) == 0, "a power-of-two design"
    reached = [compare(*fresh(row["settings"]), delta=1.0, n_boot=500, seed=s)["verdict"] == "holds"
               for s in range(40)]
    assert np.mean(reached) >= 0.65, np.mean(reached)  # 0.8 within the simulation error of 40 studies
    half = [compare(*fresh(row["settings"] // 2), delta=1.0, n_boot=500, seed=s)["verdict"] == "holds"
            for s in range(40)]
    assert np.mean(half) < np.mean(reached), "half the budget decides it less often"
    assert deciding_budget({**result, "iqr_diff": 0.0}, *pilot, 3, splits) == []  # on its bound: nothing decides it
    assert deciding_budget({**result, "verdict": "holds"}, *pilot, 3, splits) == []
    assert budget_text([{"seeds": 3, "settings": 64, "runs": 192, "probability": 0.83},
                        {"seeds": 6, "settings": None, "runs": None, "probability": None}]) == (
        "64 settings x 3 seeds (192 runs, P 0.83) or more than 1024 x 6 per method")
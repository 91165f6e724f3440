"""`StudyResults`: a study's results table (one row per (method, setting, seed) child) and every statistic on
it, in accuracy points; what the report, the plots and the console tables read."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import dataset_info
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import ui_hint
from orchestrator.search import ledger
from orchestrator.search.spaces import SearchSpace
from orchestrator.search.status import FAILED, NOT_OUTCOMES, normalize
from orchestrator.study import analysis, tunability, verdicts
from orchestrator.study.spec import StudySpec

# A method's importances say which hyperparameter moves its accuracy; when the hyperparameters explain less than this
# share of the variance of its val accuracy (the rest is seed noise: `hparam_share` of the variance split, read by
# its CI), they rank noise, and the report marks them "not meaningful".
IMPORTANCE_MIN_SHARE = 0.1

T = TypeVar("T")


def _memoized(method: Callable[..., T]) -> Callable[..., T]:
    """A statistic computed once per `StudyResults` and arguments (the report, the plots and the console each ask
    for the same ones; the importances and the bootstrap take seconds); callers get their own copy."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: StudyResults, *args: Any, **kwargs: Any) -> T:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        key = (method.__name__, *list(bound.arguments.values())[1:])
        if key not in self._memo:
            self._memo[key] = method(self, *args, **kwargs)
        return copy.deepcopy(self._memo[key])
    return wrapper


@dataclass
class StudyResults:
    """The results of a study as MLflow holds them; `frame` in fractions (as logged), statistics in points."""

    spec: StudySpec
    base: ExperimentConfig
    spaces: dict[str, SearchSpace]
    frame: pd.DataFrame
    teacher_acc: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def methods(self) -> list[str]:
        return self.spec.all_methods

    @property
    def chance(self) -> float:
        """Chance accuracy in points: failed runs count at this level."""
        return 100.0 / dataset_info(self.base.data).num_classes

    def parameters(self) -> dict[str, list[str]]:
        return {m: list(s.parameters) for m, s in self.spaces.items()}

    def results(self) -> pd.DataFrame:
        """One row per (method, setting, seed): every parameter, seed, val/test accuracy (fractions, as in
        MLflow), status (finished, diverged, crashed, ...), seconds, role and the MLflow run id."""
        return self.frame.copy()

    def _points_frame(self) -> pd.DataFrame:
        """Results in accuracy points (0-100), the unit of every statistic and table; partial runs (interrupted,
        stopped early: not outcomes) left out."""
        frame = self.results()
        frame["status"] = frame["status"].map(normalize)  # an older ledger's words
        frame = frame[~frame["status"].isin(NOT_OUTCOMES)].copy()
        for column in ("val_acc", "test_acc", "last_epoch_test_acc", "peak_test_acc"):
            frame[column] = frame[column] * 100.0 if column in frame else math.nan  # a table from before: n/a
        return frame

    @_memoized
    def setting_means(self, metric: str = "val_acc", failures: analysis.Failures = "chance") -> pd.DataFrame:
        params = sorted({p for ps in self.parameters().values() for p in ps})
        return analysis.setting_means(self._points_frame(), metric, self.chance, failures, params)

    @_memoized
    def summary(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        """One row per method (accuracy points): the distribution of per-setting seed means over the
        design, the variance split, the defaults' and the tuned (best-on-val) setting's val/test
        accuracy as mean ± std over seeds, and the failure rate. `tuned_val` and `within_delta` are the best of the
        settings tried and are optimistic (the winner's curse); `tuned_val_cross`, `tunability` and
        `within_delta_cross` are cross-fitted over seeds (`analysis.cross_fit`; NaN with one seed). `tuned_test`,
        the chosen setting's test accuracy, never chose anything and is unbiased."""
        frame = self._points_frame()
        val = self.setting_means("val_acc", failures)
        test = self.setting_means("test_acc", failures).set_index(["method", "setting_id"])
        rows = []
        dist = analysis.distribution(val[val["method"].isin(self.spec.methods)], self.spec.delta)
        split = self.variance_split()
        studied = frame[frame["method"].isin(self.spec.methods)]
        cross = analysis.cross_fit(analysis.scored(studied, "val_acc", self.chance, failures), self.spec.delta)
        for method in self.methods:
            mine = val[val["method"] == method]
            row: dict[str, Any] = {"method": method}
            defaults = mine[mine["defaults"]]
            if not defaults.empty:
                sid = defaults["setting_id"].iloc[0]
                row.update(default_val=defaults["score"].iloc[0], default_val_std=defaults["seed_std"].iloc[0],
                           default_test=test.loc[(method, sid), "score"],
                           default_test_std=test.loc[(method, sid), "seed_std"])
            design = mine[~mine["defaults"]]
            if not design.empty and design["score"].notna().any():
                best = design.loc[design["score"].idxmax()]
                row.update(tuned_val=best["score"], tuned_val_std=best["seed_std"],
                           tuned_test=test.loc[(method, best["setting_id"]), "score"],
                           tuned_test_std=test.loc[(method, best["setting_id"]), "seed_std"])
                row.update(dist.loc[method].to_dict())
                row.update(split.loc[method].to_dict())
                crossed = cross.loc[method]
                row.update(tuned_val_cross=crossed["tuned_cross"], tunability=crossed["tunability_cross"],
                           within_delta_cross=crossed["within_delta_cross"])
            all_runs = frame[frame["method"] == method]
            row["runs"] = len(all_runs)
            row["failed_runs"] = int(all_runs["status"].isin(FAILED).sum())
            rows.append(row)
        return pd.DataFrame(rows).set_index("method")

    @_memoized
    def protocols(self) -> pd.DataFrame:
        """Per method, its chosen setting (the best design setting on validation; the defaults where there is no
        design) under three protocols, mean and std over its finished seeds (points): `selected`, the test accuracy
        of the epoch chosen on validation (kdo's); `last_epoch`, the last epoch's (RepDistiller's); `peak`, the best
        test accuracy over epochs (mdistiller's and the logit-standardisation code's: the test set chooses the
        epoch); `gap` = peak - selected, how much the best-test-epoch protocol inflates. NaN (n/a) for runs logged
        before kdo recorded them."""
        frame = self._points_frame()
        frame = frame[frame["status"] == "finished"]
        val = self.setting_means("val_acc", "drop")
        rows = []
        for method in self.methods:
            mine = val[(val["method"] == method) & val["score"].notna()]
            design = mine[~mine["defaults"]]
            pick = design if not design.empty else mine
            if pick.empty:
                continue
            runs = frame[(frame["method"] == method) & (frame["setting_id"] == pick.loc[pick["score"].idxmax(),
                                                                                        "setting_id"])]
            row: dict[str, Any] = {"method": method, "setting": "tuned" if not design.empty else "defaults"}
            for column, name in (("test_acc", "selected"), ("last_epoch_test_acc", "last_epoch"),
                                 ("peak_test_acc", "peak")):
                row[name], row[f"{name}_std"] = runs[column].mean(), runs[column].std()
            row["gap"] = (runs["peak_test_acc"] - runs["test_acc"]).mean()
            rows.append(row)
        return pd.DataFrame(rows).set_index("method") if rows else pd.DataFrame()

    def teacher(self) -> dict[str, float]:
        """The shared teacher's val/test accuracy in points (a reference row), from the children's metrics."""
        return dict(self.teacher_acc)

    @_memoized
    def sensitivity(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        """Per (method, parameter): fANOVA and PED-ANOVA importance, the parameter's tunability gain, the method's
        `hparam_share` with its CI, `meaningful` (the CI's lower bound at or above `IMPORTANCE_MIN_SHARE`; unknown
        shares, with one seed, count as meaningful) and `seed_noise` (its upper bound below it): a CI across the
        threshold is neither, and the importances are then uncertain."""
        means = self.setting_means("val_acc", failures)
        means = means[means["method"].isin(self.spec.methods)]
        imp = analysis.importances(means, self.spaces, seed=self.spec.design_seed)
        table = imp.pivot_table(index=["method", "parameter"], columns="evaluator", values="importance")
        tun = tunability.tunability(means, self.parameters(), seed=self.spec.design_seed)
        gains = [{"method": m, "parameter": c.removeprefix("gain/"), "tunability": v}
                 for m, row in tun.iterrows() for c, v in row.items() if str(c).startswith("gain/") and pd.notna(v)]
        if gains:
            table = table.join(pd.DataFrame(gains).set_index(["method", "parameter"]), how="outer")
        frame = self._points_frame()
        studied = analysis.scored(frame[frame["method"].isin(self.spec.methods)], "val_acc", self.chance, failures)
        crossed = tunability.parameter_tunability(studied, self.parameters(), seed=self.spec.design_seed)
        if not crossed.empty:
            table = table.join(crossed.set_index(["method", "parameter"]), how="outer")
        if not table.empty:
            split = self.variance_split().reindex(table.index.get_level_values(0))
            table["hparam_share"] = split["hparam_share"].to_numpy(dtype=float)
            low, high = (split[c].to_numpy(dtype=float) for c in ("hparam_share_low", "hparam_share_high"))
            table["hparam_share_low"], table["hparam_share_high"] = low, high
            table["meaningful"] = ~(low < IMPORTANCE_MIN_SHARE)  # shown to matter (an unknown share counts)
            table["seed_noise"] = high < IMPORTANCE_MIN_SHARE  # shown not to: the spread is seed noise
        return table

    @_memoized
    def variance_split(self) -> pd.DataFrame:
        """Per studied method: `analysis.variance_split` of its design settings (finished runs; failures apart)."""
        frame = self._points_frame()
        return analysis.variance_split(frame[frame["method"].isin(self.spec.methods)], "val_acc",
                                       seed=self.spec.design_seed)

    @_memoized
    def expected_best(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        means = self.setting_means("val_acc", failures)
        return analysis.expected_best_curve(means[means["method"].isin(self.spec.methods)])

    @_memoized
    def compare(self, a: str, b: str, failures: analysis.Failures = "chance") -> dict[str, Any]:
        """Is `a` more robust than `b`? See `verdicts.compare` for the rule."""
        for m in (a, b):
            if m not in self.spec.methods:
                raise ConfigError(f"compare: '{m}' is not a method of this study; "
                                  f"allowed: {', '.join(self.spec.methods)}")
        means = self.setting_means("val_acc", failures)
        design = means[~means["defaults"]]
        scores = [design[design["method"] == m]["score"].dropna().to_numpy() for m in (a, b)]
        result = {"a": a, "b": b, **verdicts.compare(*scores, delta=self.spec.delta, seed=self.spec.design_seed)}
        split = self.variance_split().loc[[a, b]]
        splits = tuple((float(np.nan_to_num(r["seed_std"]) ** 2), float(np.nan_to_num(r["hparam_var"])))
                       for _, r in split.iterrows())
        budget = verdicts.deciding_budget(result, *scores, len(self.spec.seeds), splits,  # type: ignore[arg-type]
                                          seed=self.spec.design_seed)
        return {**result, "deciding_budget": budget}

    def register_best(self) -> dict[str, str]:
        """Each studied entry's best run (highest validation accuracy among its finished runs) registered as a
        version of `kdo-student-<study>.<entry>`; returns the parent's tags `best_model.<entry>`."""
        from orchestrator.experiment.model_registry import register_checkpoint

        finished = self.frame[(self.frame["status"] == "finished") & self.frame["method"].isin(self.spec.methods)]
        best = finished.sort_values("val_acc", ascending=False).drop_duplicates("method")
        return {f"best_model.{r.method}": register_checkpoint(self.tracking_uri, r.run_id,
                                                               f"kdo-student-{self.name}.{r.method}", "student",
                                                               f"the best {r.method} student of study {self.name}")
                for r in best.itertuples()}

    def comparisons(self, failures: analysis.Failures = "chance") -> list[dict[str, Any]]:
        """The study's declared pairs, or every studied method against the first one; none without a design."""
        studied = list(self.spec.methods)
        pairs = self.spec.compare or [(studied[0], m) for m in studied[1:] if self.spec.has_design]
        return [self.compare(a, b, failures) for a, b in pairs]

    def val_set_size(self) -> int:
        from orchestrator.experiment.data import load_splits

        return len(load_splits(self.base.data).val_y)

    def warnings(self) -> list[str]:
        """What a reader must know before trusting the tables: runs not yet redone, and older ledgers' runs."""
        counts = self.frame["status"].value_counts()
        out = []
        for status in ("interrupted", "crashed", "running"):
            if counts.get(status, 0):
                reasons = (self.frame.loc[self.frame["status"] == status, "reason"].replace("", None).dropna()
                           if "reason" in self.frame else [])
                why = "; ".join(f"{r} (x{n})" for r, n in pd.Series(reasons).value_counts().head(3).items())
                out.append(f"{counts[status]} run(s) {status}{f' ({why})' if why else ''}: left out or counted as "
                           f"failures until `kdo resume {self.name}` redoes them")
        if counts.get("early_stopped", 0):
            out.append(f"{counts['early_stopped']} run(s) early_stopped: a study stops nothing early, so in a ledger "
                       "written before kdo's fault statuses these may be killed runs; they are left out")
        return out

    def ui_hint(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id, view=self.name)


def read_results(spec: StudySpec, base: ExperimentConfig, spaces: dict[str, SearchSpace], uri: str,
                 experiment_id: str, parent_run_id: str) -> StudyResults:
    """A study's results from its MLflow children (the ledger), ordered by entry as the study lists them; the
    `method` column holds each entry's label (the `kdo.entry` tag; the method itself is `kdo.method`)."""
    client = mlflow_client(uri)
    params = sorted({p for s in spaces.values() for p in s.parameters})
    frame = ledger.children_frame(client, experiment_id, parent_run_id, params,
                                  tag_columns={"method": "kdo.entry", "role": "kdo.role", "run_method": "kdo.method"})
    # The entry's label names the rows; children of studies from before labels have only the method's name.
    frame["method"] = frame["method"].fillna(frame.pop("run_method"))
    frame["defaults"] = frame["role"] != "design"
    order = {m: i for i, m in enumerate(spec.all_methods)}
    frame = frame.sort_values(["method", "role", "setting_id", "seed"],
                              key=lambda c: c.map(order) if c.name == "method" else c).reset_index(drop=True)
    teacher: dict[str, float] = {}
    for run in ledger.children(client, experiment_id, parent_run_id, page_size=50, limit=50):
        m = run.data.metrics
        if "teacher_val_acc" in m:
            teacher = {"val": 100 * m["teacher_val_acc"], "test": 100 * m.get("teacher_test_acc", float("nan"))}
            break
    return StudyResults(spec, base, spaces, frame, teacher, uri, experiment_id, parent_run_id)

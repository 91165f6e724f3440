"""Robustness studies: how fragile is each KD method to its hyperparameters?

A study runs a design built up front (scrambled Sobol 2^m points, a full grid or i.i.d. random, by the
sweeps' design builder) in each method's space, crossed with seeds, plus each method's defaults and the
reference methods (`ce`) at their defaults: every (method, setting, seed) is one Ray Tune trial and one
MLflow child run of the study's parent run. Nothing is stopped early. Then `orchestrator.analysis`
measures the spread of each method over its settings, and `orchestrator.report` draws and writes it up.
Everything is rebuilt from MLflow by `RobustnessStudy.load(name)`, and `RobustnessStudy.resume(name)`
finishes a study whose driver died without rerunning what finished.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from methods import get_method, list_methods
from orchestrator import analysis
from orchestrator.config import (
    ExperimentConfig,
    format_validation_error,
    load_config,
)
from orchestrator.data import dataset_info
from orchestrator.design import build_design
from orchestrator.errors import ConfigError
from orchestrator.runner import prepare
from orchestrator.spaces import SearchSpace, load_space
from orchestrator.sweep import (
    SweepPlan,
    children_frame,
    close_orphans,
    find_parent,
    run_tune,
    setting_id,
    settle_child,
)
from orchestrator.tracking import Tracker, flatten, start_run, ui_hint

ROLES = ("design", "defaults", "reference")


class MethodEntry(BaseModel):
    """One method of a study: its space (None: the method's shipped space) and fixed params."""

    model_config = ConfigDict(extra="forbid")
    space: str | dict[str, Any] | None = None
    params: dict[str, Any] = Field({}, description="method params fixed for the whole study")


class StudySpec(BaseModel):
    """A study as written in `STUDY.yaml` (and logged as `study.json` on the parent run)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1)
    config: str | dict[str, Any] = Field(..., description="base experiment: shipped name, YAML path or mapping")
    methods: dict[str, MethodEntry | None] = Field(..., min_length=1)
    design: Literal["sobol", "grid", "random"] = "sobol"
    n_settings: int = Field(8, ge=1, le=4096, description="settings per method (2^m for sobol; grid: ignored)")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    include_defaults: bool = True
    references: list[str] = Field(["ce"], description="methods run at their defaults only, as reference rows")
    metric: Literal["val_acc"] = Field("val_acc", description="selection metric (test accuracy is never used)")
    delta: float = Field(1.0, gt=0, le=100, description="points of accuracy that count as 'as good as the best'")
    compare: list[tuple[str, str]] = Field([], description="pairs (A, B): is A more robust than B?")
    concurrency: int = Field(2, ge=1, le=4096)
    design_seed: int = Field(0, ge=0)
    set: list[str] = Field([], description="overrides of the base config: a.b=value")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"distinct non-negative integers, e.g. [0, 1, 2] (got {seeds})")
        return seeds

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: dict[str, MethodEntry | None]) -> dict[str, MethodEntry | None]:
        for name in methods:
            if name not in list_methods():
                raise ValueError(f"unknown method '{name}'; allowed: {', '.join(list_methods())}")
        return methods


class RobustnessStudy:
    """`RobustnessStudy(name, base_config, methods={method: space or None}, ...)`, then `.run()`.

    Everything the user can get wrong (configs, spaces, design sizes, comparisons) is checked here,
    before Ray or MLflow are touched. Results, summaries, plots and the report come from MLflow, so
    `RobustnessStudy.load(name)` in a notebook gives the same answers without rerunning anything.
    """

    def __init__(self, name: str, base_config: str | Path | dict[str, Any] | ExperimentConfig,
                 methods: dict[str, Any], design: str = "sobol", n_settings: int = 8,
                 seeds: list[int] | tuple[int, ...] = (0, 1, 2), include_defaults: bool = True,
                 metric: str = "val_acc", *, references: list[str] | tuple[str, ...] = ("ce",), delta: float = 1.0,
                 compare: list[tuple[str, str]] | None = None, concurrency: int = 2, design_seed: int = 0,
                 overrides: list[str] | None = None) -> None:
        if isinstance(base_config, ExperimentConfig):
            base_config = base_config.model_dump(mode="json")
        entries = {m: _entry(v) for m, v in methods.items()}
        try:
            self.spec = StudySpec(name=name, config=str(base_config) if isinstance(base_config, Path) else base_config,
                                  methods=entries, design=design, n_settings=n_settings, seeds=list(seeds),
                                  include_defaults=include_defaults, references=list(references),
                                  metric=metric, delta=delta, compare=compare or [], concurrency=concurrency,
                                  design_seed=design_seed, set=overrides or [])
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "study", StudySpec)) from None
        self._plan_points()
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._frame: pd.DataFrame | None = None

    # ------------------------------------------------------------------------------- definition
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RobustnessStudy:
        """A `STUDY.yaml` (a path, or the name of a shipped study in `search_spaces/studies/`)."""
        source = _study_path(path)
        try:
            raw = yaml.safe_load(source.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a study is a mapping with name, config and methods")
        try:
            spec = StudySpec.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "study", StudySpec)) from None
        config = spec.config
        if isinstance(config, str) and not Path(config).is_absolute() and (source.parent / config).is_file():
            config = str(source.parent / config)  # a config beside the study file
        return cls._from_spec(spec.model_copy(update={"config": config, "set": [*spec.set, *(overrides or [])]}))

    @classmethod
    def _from_spec(cls, spec: StudySpec) -> RobustnessStudy:
        return cls(spec.name, spec.config, {m: e.model_dump() if e else None for m, e in spec.methods.items()},
                   spec.design, spec.n_settings, spec.seeds, spec.include_defaults, spec.metric,
                   references=spec.references, delta=spec.delta, compare=[tuple(p) for p in spec.compare],
                   concurrency=spec.concurrency, design_seed=spec.design_seed, overrides=spec.set)

    def replace(self, **changes: Any) -> RobustnessStudy:
        """The same study with some spec fields changed (name, seeds, n_settings, ...), validated anew."""
        return type(self)._from_spec(self.spec.model_copy(update=changes))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def methods(self) -> list[str]:
        """The studied methods, then the references (which have no design)."""
        return [*self.spec.methods, *[r for r in self.spec.references if r not in self.spec.methods]]

    def _plan_points(self) -> None:
        """Validate every config of every point up front; the points are what Tune runs."""
        spec = self.spec
        base = load_config(spec.config, spec.set)
        self.base = base
        self.spaces: dict[str, SearchSpace] = {}
        self.points: list[dict[str, Any]] = []
        for ref in spec.references:
            if ref not in list_methods():
                raise ConfigError(f"study.references: unknown method '{ref}'; allowed: {', '.join(list_methods())}")
        for a, b in spec.compare:
            for m in (a, b):
                if m not in spec.methods:
                    raise ConfigError(f"study.compare: '{m}' is not a method of this study; allowed: "
                                      f"{', '.join(spec.methods)}")
        for method in self.methods:
            entry = spec.methods.get(method) or MethodEntry()
            method_base = _method_config(base, method, entry.params)
            points: list[tuple[str, dict[str, Any], ExperimentConfig]] = []
            if method in spec.methods:
                space = load_space(entry.space if entry.space is not None else method, method_base)
                self.spaces[method] = space
                try:
                    design = build_design(space, spec.design, spec.n_settings, seed=spec.design_seed)
                except ConfigError as err:
                    raise ConfigError(f"study.n_settings: {str(err).split(': ', 1)[-1]}") from None
                for setting in design:
                    points.append(("design", setting, space.apply(method_base, setting)))
                if spec.include_defaults:
                    points.append(("defaults", {}, space.apply(method_base, {})))
            else:
                points.append(("reference", {}, method_base))
            seen: set[str] = set()
            for role, setting, cfg in points:
                sid = setting_id({"method": method, "role": role, **setting})
                if sid in seen:  # a design over choices can draw a setting twice: it runs (and counts) once
                    continue
                seen.add(sid)
                for seed in spec.seeds:
                    self.points.append({"setting": setting, "seed": seed, "setting_id": sid,
                                        "config": cfg.model_dump(mode="json"),
                                        "tags": {"kdo.role": role, "kdo.study": spec.name}})

    def _shared_config(self) -> ExperimentConfig:
        """The config `prepare` uses: data and teacher are the same for every point."""
        for point in self.points:
            if get_method(point["config"]["method"]["name"]).needs_teacher:
                return ExperimentConfig.model_validate(point["config"])
        return ExperimentConfig.model_validate(self.points[0]["config"])

    # ------------------------------------------------------------------------------------ running
    def run(self, *, address: str | None = None) -> RobustnessStudy:
        """Run every (method, setting, seed) as a Tune trial under one MLflow parent run; then analyse."""
        prepared = prepare(self._shared_config(), address=address)
        cfg = prepared.config
        assert cfg.tracking.uri is not None
        parent, experiment_id = start_run(
            cfg.tracking.uri, cfg.tracking.experiment, self.name,
            tags={"kdo.kind": "study", "kdo.study": self.name, "kdo.methods": ",".join(self.methods),
                  "kdo.design": self.spec.design, "kdo.seeds": ",".join(map(str, self.spec.seeds))})
        parent.log_params(flatten({"study": self.spec.model_dump(mode="json", exclude={"config"})}))
        parent.log_text(self._stored_spec(cfg), "study.json")
        parent.log_text(cfg.to_yaml(), "config.yaml")
        return self._execute(prepared, parent, experiment_id)

    @classmethod
    def resume(cls, name: str, *, address: str | None = None, tracking_uri: str | None = None,
               experiment: str = "kdo") -> RobustnessStudy:
        """Finish a study whose driver died: finished (setting, seed) runs are kept, the rest run."""
        study, parent_run = cls._from_mlflow(name, tracking_uri, experiment)
        client = MlflowClient(study._uri)
        for run in client.search_runs([parent_run.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent_run.info.run_id}' "
                                      "and attributes.status = 'RUNNING'", max_results=50_000):
            settle_child(study._uri, run, "orphaned")
        prepared = prepare(study._shared_config(), address=address)
        client.update_run(parent_run.info.run_id, status="RUNNING")
        return study._execute(prepared, Tracker(study._uri, parent_run.info.run_id), parent_run.info.experiment_id)

    def _execute(self, prepared: Any, parent: Tracker, experiment_id: str) -> RobustnessStudy:
        cfg = prepared.config
        self.parent_run_id, self.experiment_id, self._uri = parent.run_id, experiment_id, parent.uri
        plan = SweepPlan(self.name, cfg.model_dump(mode="json"), None, list(self.spec.seeds), None, parent.run_id,
                         parent.uri, cfg.tracking.experiment, experiment_id)
        options = {"sampler": self.spec.design, "scheduler": "none", "trials": self.spec.n_settings,
                   "concurrency": self.spec.concurrency, "metric": self.spec.metric, "seeds": self.spec.seeds,
                   "max_failures": 0, "design_seed": self.spec.design_seed}
        status = "FAILED"
        try:
            run_tune(plan, prepared, options, previous=[], points=self.points)
            status = "FINISHED"
        finally:
            close_orphans(parent, experiment_id)
            self._frame = None
            if status == "FINISHED":
                self._log_outputs(parent)
            parent.finish(status)
        return self

    def _stored_spec(self, cfg: ExperimentConfig) -> str:
        """The spec with its config inlined and its spaces resolved: enough to load or resume anywhere."""
        raw = self.spec.model_dump(mode="json")
        raw["config"] = self.base.model_dump(mode="json")
        raw["set"] = []
        for method, space in self.spaces.items():
            entry = raw["methods"].get(method) or {"space": None, "params": {}}
            entry["space"] = space.model_dump(mode="json", exclude={"source"})
            raw["methods"][method] = entry
        raw["tracking"] = {"uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}
        return json.dumps(raw, indent=2)

    @classmethod
    def load(cls, name: str, *, tracking_uri: str | None = None, experiment: str = "kdo") -> RobustnessStudy:
        """Rebuild a finished (or interrupted) study from MLflow alone, to analyse it without rerunning."""
        return cls._from_mlflow(name, tracking_uri, experiment)[0]

    @classmethod
    def _from_mlflow(cls, name: str, tracking_uri: str | None, experiment: str) -> tuple[RobustnessStudy, Any]:
        uri, client, parent = find_parent("study", name, tracking_uri, experiment)
        folder = tempfile.mkdtemp(prefix="kdo-study-")
        raw = json.loads(Path(client.download_artifacts(parent.info.run_id, "study.json", folder)).read_text())
        raw.pop("tracking", None)
        raw["config"]["tracking"]["uri"] = uri
        study = cls._from_spec(StudySpec.model_validate(raw))
        study.parent_run_id, study.experiment_id, study._uri = parent.info.run_id, parent.info.experiment_id, uri
        return study, parent

    # ----------------------------------------------------------------------------------- analysis
    @property
    def chance(self) -> float:
        """Chance accuracy in points: failed runs count at this level."""
        return 100.0 / dataset_info(self.base.data).num_classes

    def parameters(self) -> dict[str, list[str]]:
        return {m: list(s.parameters) for m, s in self.spaces.items()}

    def results(self) -> pd.DataFrame:
        """One row per (method, setting, seed): every parameter, seed, val/test accuracy (fractions, as in
        MLflow), status (finished, diverged, error, ...), seconds, role and the MLflow run id."""
        if self.parent_run_id is None:
            raise ConfigError(f"study '{self.name}' has not run: call .run() or RobustnessStudy.load(name)")
        if self._frame is None:
            params = sorted({p for ps in self.parameters().values() for p in ps})
            frame = children_frame(MlflowClient(self._uri), str(self.experiment_id), self.parent_run_id, params,
                                   tag_columns={"method": "kdo.method", "role": "kdo.role"})
            frame["defaults"] = frame["role"] != "design"
            order = {m: i for i, m in enumerate(self.methods)}
            self._frame = frame.sort_values(["method", "role", "setting_id", "seed"],
                                            key=lambda c: c.map(order) if c.name == "method" else c)
            self._frame = self._frame.reset_index(drop=True)
        return self._frame.copy()

    def _points_frame(self) -> pd.DataFrame:
        """Results in accuracy points (0-100), the unit of every statistic and table."""
        frame = self.results()
        frame["val_acc"] *= 100.0
        frame["test_acc"] *= 100.0
        return frame

    def setting_means(self, metric: str = "val_acc", failures: analysis.Failures = "chance") -> pd.DataFrame:
        params = sorted({p for ps in self.parameters().values() for p in ps})
        return analysis.setting_means(self._points_frame(), metric, self.chance, failures, params)

    def summary(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        """One row per method (accuracy points): the distribution of per-setting seed means over the
        design, the variance split, the defaults' and the tuned (best-on-val) setting's val/test
        accuracy as mean ± std over seeds, tunability, and the failure rate."""
        frame = self._points_frame()
        val = self.setting_means("val_acc", failures)
        test = self.setting_means("test_acc", failures).set_index(["method", "setting_id"])
        rows = []
        dist = analysis.distribution(val[val["method"].isin(self.spec.methods)], self.spec.delta)
        split = analysis.variance_split(frame[frame["method"].isin(self.spec.methods)], "val_acc", self.chance,
                                        failures)
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
                if "default_val" in row:
                    row["tunability"] = row["tuned_val"] - row["default_val"]
            all_runs = frame[frame["method"] == method]
            row["runs"] = len(all_runs)
            row["failed_runs"] = int(all_runs["status"].isin(analysis.FAILED).sum())
            rows.append(row)
        return pd.DataFrame(rows).set_index("method")

    def teacher(self) -> dict[str, float]:
        """The shared teacher's val/test accuracy in points (a reference row), from any child run."""
        client = MlflowClient(self._uri)
        for run in client.search_runs([str(self.experiment_id)], f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
                                      max_results=50):
            m = run.data.metrics
            if "teacher_val_acc" in m:
                return {"val": 100 * m["teacher_val_acc"], "test": 100 * m.get("teacher_test_acc", float("nan"))}
        return {}

    def sensitivity(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        """Per (method, parameter): fANOVA and PED-ANOVA importance, and the parameter's tunability gain."""
        means = self.setting_means("val_acc", failures)
        means = means[means["method"].isin(self.spec.methods)]
        imp = analysis.importances(means, self.spaces, seed=self.spec.design_seed)
        table = imp.pivot_table(index=["method", "parameter"], columns="evaluator", values="importance")
        tun = analysis.tunability(means, self.parameters(), seed=self.spec.design_seed)
        gains = [{"method": m, "parameter": c.removeprefix("gain/"), "tunability": v}
                 for m, row in tun.iterrows() for c, v in row.items() if str(c).startswith("gain/") and pd.notna(v)]
        if gains:
            table = table.join(pd.DataFrame(gains).set_index(["method", "parameter"]), how="outer")
        return table

    def expected_best(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        means = self.setting_means("val_acc", failures)
        return analysis.expected_best_curve(means[means["method"].isin(self.spec.methods)])

    def compare(self, a: str, b: str, failures: analysis.Failures = "chance") -> dict[str, Any]:
        """Is `a` more robust than `b`? See `analysis.compare` for the rule."""
        for m in (a, b):
            if m not in self.spec.methods:
                raise ConfigError(f"compare: '{m}' is not a method of this study; "
                                  f"allowed: {', '.join(self.spec.methods)}")
        means = self.setting_means("val_acc", failures)
        design = means[~means["defaults"]]
        scores = [design[design["method"] == m]["score"].dropna().to_numpy() for m in (a, b)]
        return {"a": a, "b": b, **analysis.compare(*scores, delta=self.spec.delta, seed=self.spec.design_seed)}

    def comparisons(self, failures: analysis.Failures = "chance") -> list[dict[str, Any]]:
        """The study's declared pairs, or every studied method against the first one."""
        studied = list(self.spec.methods)
        pairs = self.spec.compare or [(studied[0], m) for m in studied[1:]]
        return [self.compare(a, b, failures) for a, b in pairs]

    def val_set_size(self) -> int:
        from orchestrator.data import load_splits

        return len(load_splits(self.base.data).val_y)

    def plot(self, folder: str | Path | None = None) -> list[Path]:
        """Draw every plot as PNG into `folder` (a temporary one by default); returns the files."""
        from orchestrator.report import draw_plots

        return draw_plots(self, Path(folder or tempfile.mkdtemp(prefix=f"kdo-{self.name}-plots-")))

    def report(self, path: str | Path | None = None) -> Path:
        """Write `<name>.md` and a self-contained `<name>.html` (tables and plots inline); returns the HTML."""
        from orchestrator.report import write_report

        return write_report(self, Path(path or f"{self.name}-report"))

    def _log_outputs(self, parent: Tracker) -> None:
        """Results table, summary, plots and report, on the parent run (they open in the MLflow UI)."""
        parent.log_text(self.results().to_csv(index=False), "results.csv")
        summary = self.summary()
        parent.log_text(summary.to_csv(), "summary.csv")
        for method, row in summary.iterrows():
            parent.log_metrics({f"{method}.{k}": v for k, v in row.items() if isinstance(v, float | int)}, step=0)
        folder = Path(tempfile.mkdtemp(prefix=f"kdo-{self.name}-"))
        html = self.report(folder / "report")
        for file in sorted(html.parent.rglob("*")):
            if file.is_file():
                parent.log_artifact(file, "report" if file.suffix in (".md", ".html") else "plots")

    def ui_hint(self) -> str:
        return ui_hint(self._uri, str(self.experiment_id))


def _entry(value: Any) -> dict[str, Any] | None:
    """A `methods` value: None, a space (name, path, dict or SearchSpace), or {space:, params:}."""
    if value is None:
        return None
    if isinstance(value, SearchSpace):
        return {"space": value.model_dump(mode="json", exclude={"source"})}
    if isinstance(value, Path):
        return {"space": str(value)}
    if isinstance(value, dict) and set(value) <= {"space", "params"}:
        return value
    return {"space": value}


def _method_config(base: ExperimentConfig, method: str, params: dict[str, Any]) -> ExperimentConfig:
    """The base config running `method` with its defaults (plus the study's fixed params)."""
    raw = base.model_dump(mode="json")
    raw["method"] = {"name": method, "params": params}
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"study.methods.{method}: {format_validation_error(err, '', ExperimentConfig)}") from None


def _study_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    from importlib import resources

    shipped = resources.files("search_spaces") / "studies" / f"{path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"STUDY: no file '{path}' and no shipped study of that name; shipped: "
                      f"{', '.join(shipped_studies())}")


def shipped_studies() -> list[str]:
    from importlib import resources

    folder = resources.files("search_spaces") / "studies"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))

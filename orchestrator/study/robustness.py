"""Robustness studies: how fragile is each KD method to its hyperparameters?

A study runs a design built up front (scrambled Sobol 2^m points, a full grid or i.i.d. random, by the
sweeps' design builder) in each method's space, crossed with seeds, plus each method's defaults and the
reference methods (`ce`) at their defaults: every (method, setting, seed) is one Ray Tune trial and one
MLflow child run of the study's parent run, run through `search/`. Nothing is stopped early. Then
`StudyResults` (`study.results`) measures the spread of each method over its settings, and `study.report`
draws and writes it up. `RobustnessStudy.load(name)` rebuilds everything from MLflow, and
`RobustnessStudy.resume(name)` finishes a study whose driver died without rerunning what finished.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError
from orchestrator.experiment import tracking
from orchestrator.experiment.config import ExperimentConfig, resolve_paths
from orchestrator.experiment.launch import use_gpu
from orchestrator.experiment.runner import Prepared, provision
from orchestrator.experiment.store import write_view
from orchestrator.search import parent
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point, TrialOptions
from orchestrator.search.spaces import SearchSpace
from orchestrator.search.tuner import run_points
from orchestrator.study import analysis
from orchestrator.study.outputs import draw, log_outputs, report
from orchestrator.study.plan import plan_study
from orchestrator.study.results import StudyResults, read_results
from orchestrator.study.spec import (
    StudySpec,
    build_spec,
    method_entry,
    read_spec,
    recorded_plugins,
    shipped_studies,
    stored_spec,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RobustnessStudy", "shipped_studies"]


class RobustnessStudy:
    """`RobustnessStudy(name, base_config, methods={method: space or None}, ...)`, then `.run()`.

    A `methods` key is a label: `{"kd_ls": {"method": "kd", "params": {...}, "space": ...}}` runs kd under the
    label kd_ls, the name of its rows in every table, plot and comparison (and its children's `kdo.entry` tag);
    without `method` the label is the method's name.

    Everything the user can get wrong (configs, spaces, design sizes, comparisons) is checked here,
    before Ray or MLflow are touched. Results, summaries, plots and the report come from MLflow
    (`outcome()` -> `StudyResults`), so `RobustnessStudy.load(name)` in a notebook gives the same answers
    without rerunning anything.
    """

    def __init__(self, name: str, base_config: str | Path | dict[str, Any] | ExperimentConfig,
                 methods: dict[str, Any], design: str = "sobol", n_settings: int = 8,
                 seeds: list[int] | tuple[int, ...] = (0, 1, 2), include_defaults: bool = True,
                 metric: str = "val_acc", *, references: list[str] | tuple[str, ...] = ("ce",), delta: float = 1.0,
                 compare: list[tuple[str, str]] | None = None, concurrency: int = 2, design_seed: int = 0,
                 overrides: list[str] | None = None, max_failures: int = 0, checkpoint_seconds: float = 30.0,
                 group_size: int = 0, plugins: list[str] | tuple[str, ...] = ()) -> None:
        if isinstance(base_config, ExperimentConfig):
            base_config = base_config.model_dump(mode="json")
        self._adopt(build_spec(
            name=name, config=str(base_config) if isinstance(base_config, Path) else base_config,
            methods={m: method_entry(v) for m, v in methods.items()}, design=design, n_settings=n_settings,
            seeds=list(seeds), include_defaults=include_defaults, references=list(references), metric=metric,
            delta=delta, compare=compare or [], concurrency=concurrency, design_seed=design_seed, set=overrides or [],
            max_failures=max_failures, checkpoint_seconds=checkpoint_seconds, group_size=group_size,
            plugins=list(plugins)))

    def _adopt(self, spec: StudySpec, *, explicit_name: bool = False) -> None:
        """Become the study `spec` describes: planned once (`plan.plan_study`), not run yet."""
        self.spec, self.plan = spec, plan_study(spec)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._uri = ""
        self._results: StudyResults | None = None
        self._explicit_name = explicit_name
        self._claimed = False

    # ------------------------------------------------------------------------------- definition
    @classmethod
    def from_spec(cls, spec: StudySpec, *, explicit_name: bool = False) -> RobustnessStudy:
        """The study a validated `StudySpec` describes."""
        study = cls.__new__(cls)
        study._adopt(spec, explicit_name=explicit_name)
        return study

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None,
                  plugins: list[str] | tuple[str, ...] = ()) -> RobustnessStudy:
        """A `STUDY.yaml` (a path, or the name of a shipped study in `search_spaces/studies/`); `plugins` join the
        file's."""
        return cls.from_spec(read_spec(path, overrides, plugins))

    def replace(self, **changes: Any) -> RobustnessStudy:
        """The same study with some spec fields changed (name, seeds, n_settings, ...), validated anew. A name
        given here is the study's for sure: `run` refuses it if it is taken (instead of suffixing it)."""
        spec = build_spec(**{**self.spec.model_dump(), **changes})
        return type(self).from_spec(spec, explicit_name=self._explicit_name or "name" in changes)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def methods(self) -> list[str]:
        """The studied entries' labels, then the references (which have no design)."""
        return self.spec.all_methods

    @property
    def base(self) -> ExperimentConfig:
        return self.plan.base

    @property
    def spaces(self) -> dict[str, SearchSpace]:
        return self.plan.spaces

    @property
    def points(self) -> list[Point]:
        return self.plan.points

    # ------------------------------------------------------------------------------------ running
    def claim_name(self) -> RobustnessStudy:
        """Take the first free name in the store, once: a study file that ran before runs as `<name>-2`, ...; a
        name given by `replace(name=...)` (`--name`) that is taken is refused."""
        if self._claimed:
            return self
        name = parent.claim_name("study", self.name, resolve_paths(self.base), explicit=self._explicit_name)
        if name != self.name:
            self.spec, self.plan = self.spec.model_copy(update={"name": name}), self.plan.named(name)
        self._claimed = True
        return self

    def run(self, *, address: str | None = None, verbose: bool = False) -> RobustnessStudy:
        """Run every (method, setting, seed) as a Tune trial under one MLflow parent run; then analyse.
        Progress is one live panel on a terminal, else one line per run; `verbose` adds Tune's status output and
        the Ray workers' own output."""
        checkpoints = self.claim_name().plan.checked()
        prepared = provision(self.plan.shared_config(), address=address, checkpoints=checkpoints, verbose=verbose)
        cfg = prepared.config
        run = parent.start("study", self.name, prepared, tags={
            "kdo.methods": ",".join(self.methods), "kdo.design": self.spec.design,
            "kdo.seeds": ",".join(map(str, self.spec.seeds))},
            params=tracking.flatten({"study": self.spec.model_dump(mode="json", exclude={"config"})}),
            files={"study.json": stored_spec(self.spec, self.base, self.spaces, cfg), "config.yaml": cfg.to_yaml()})
        return self._drive(run, lambda: prepared, resumed=False, verbose=verbose)

    @classmethod
    def resume(cls, name: str, *, address: str | None = None, tracking_uri: str | None = None,
               experiment: str = "kdo", force: bool = False, verbose: bool = False,
               plugins: list[str] | tuple[str, ...] = ()) -> RobustnessStudy:
        """Finish a study whose driver died: finished (setting, seed) runs are kept, the rest run. Refused while
        its driver is alive (`force` resumes regardless). Its recorded plugins are imported again; one of `plugins`
        takes the place of a recorded one of the same module name (a file that moved)."""
        uri, _, found = parent.find("study", name, tracking_uri, experiment, to_resume=True, force=force)
        if parent.nothing_to_resume("study", uri, found):  # before its plugins: a finished study needs none
            return cls.load(name, tracking_uri=uri, experiment=experiment, plugins=plugins)
        study, found = cls._from_mlflow(name, uri, experiment, to_resume=True, force=force, plugins=plugins)
        checkpoints = study.plan.checked()
        shared = study.plan.shared_config()
        run = parent.reopen("study", found, study._uri, shared)
        return study._drive(run, lambda: provision(shared, address=address, checkpoints=checkpoints, verbose=verbose),
                            resumed=True, verbose=verbose)

    def _drive(self, run: parent.ParentRun, prepare: Callable[[], Prepared], *, resumed: bool,
               verbose: bool) -> RobustnessStudy:
        """The study's work under its parent's lifecycle (`parent.hold`); a study that finished logs its outputs."""
        self.parent_run_id, self.experiment_id, self._uri = run.run_id, run.experiment_id, run.uri
        options = TrialOptions(sampler=self.spec.design,
                               scheduler="none", trials=self.spec.n_settings, concurrency=self.spec.concurrency,
                               metric=self.spec.metric, seeds=list(self.spec.seeds),
                               max_failures=self.spec.max_failures, design_seed=self.spec.design_seed,
                               checkpoint_seconds=self.spec.checkpoint_seconds, group_size=self.spec.group_size)

        def train(prepared: Prepared, ref: LedgerRef) -> frozenset[str]:
            run_points(ref, prepared, self.points, options, use_gpu=use_gpu(prepared.config), verbose=verbose)
            return frozenset()  # a study never stops a run early: one left RUNNING crashed, or the driver stopped

        def summarise(status: str) -> str:
            self._results = None
            if status == "FINISHED":
                log_outputs(run.tracker, self.outcome())
            return status

        parent.hold(run, prepare, train, summarise, resumed=resumed)
        return self

    @classmethod
    def load(cls, name: str, *, tracking_uri: str | None = None, experiment: str = "kdo",
             plugins: list[str] | tuple[str, ...] = ()) -> RobustnessStudy:
        """Rebuild a finished (or interrupted) study from MLflow alone, to analyse it without rerunning. A recorded
        plugin that cannot be imported any more is one warning line: its methods' rows still come from the ledger."""
        return cls._from_mlflow(name, tracking_uri, experiment, plugins=plugins)[0]

    @classmethod
    def _from_mlflow(cls, name: str, tracking_uri: str | None, experiment: str, *, to_resume: bool = False,
                     force: bool = False, plugins: list[str] | tuple[str, ...] = ()) -> tuple[RobustnessStudy, Any]:
        uri, client, found = parent.find("study", name, tracking_uri, experiment, to_resume=to_resume, force=force)
        with tempfile.TemporaryDirectory(prefix="kdo-study-") as folder:
            raw = json.loads(Path(client.download_artifacts(found.info.run_id, "study.json", folder)).read_text())
        raw.pop("tracking", None)
        raw["config"]["tracking"]["uri"] = uri
        recorded_plugins(raw, plugins, f"study {name}", to_resume=to_resume)
        study = cls.from_spec(StudySpec.model_validate(raw))
        study.parent_run_id, study.experiment_id, study._uri = found.info.run_id, found.info.experiment_id, uri
        write_view(uri, found.info.experiment_id, "study", name, best_effort=True)  # older studies get one too
        return study, found

    # ----------------------------------------------------------------------------------- analysis
    def outcome(self) -> StudyResults:
        """The results table and every statistic, read from the study's MLflow children (cached)."""
        if self.parent_run_id is None:
            raise ConfigError(f"study '{self.name}' has not run: call .run() or RobustnessStudy.load(name)")
        if self._results is None:
            self._results = read_results(self.spec, self.base, self.spaces, self._uri, str(self.experiment_id),
                                         self.parent_run_id)
        return self._results

    @property
    def chance(self) -> float:
        return self.outcome().chance

    def results(self) -> pd.DataFrame:
        """One row per (method, setting, seed) child: see `StudyResults.results`."""
        return self.outcome().results()

    def summary(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        """One row per method: see `StudyResults.summary`."""
        return self.outcome().summary(failures)

    def sensitivity(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        return self.outcome().sensitivity(failures)

    def expected_best(self, failures: analysis.Failures = "chance") -> pd.DataFrame:
        return self.outcome().expected_best(failures)

    def compare(self, a: str, b: str, failures: analysis.Failures = "chance") -> dict[str, Any]:
        return self.outcome().compare(a, b, failures)

    def comparisons(self, failures: analysis.Failures = "chance") -> list[dict[str, Any]]:
        return self.outcome().comparisons(failures)

    def teacher(self) -> dict[str, float]:
        return self.outcome().teacher()

    def plot(self, folder: str | Path | None = None) -> list[Path]:
        """Draw every plot as PNG into `folder` (a temporary one by default); returns the files."""
        return draw(self.outcome(), folder)

    def report(self, path: str | Path | None = None) -> Path:
        """Write `<name>.md` and a self-contained `<name>.html` (tables and plots inline); returns the HTML."""
        return report(self.outcome(), path)

    def ui_hint(self) -> str:
        return self.outcome().ui_hint()


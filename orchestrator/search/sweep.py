"""`sweep(config, space, ...) -> SweepResult`: Ray Tune + Optuna over distillation runs, and `resume(name)`.

Every (setting, seed) is an MLflow child of the sweep's parent run, logged by the trial itself (Ray's
MLflowLoggerCallback cannot nest runs). The children are also the sweep's ledger (`search.ledger`): results
tables and `kdo report` are rebuilt from them alone.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from methods.plugins import merged, replaced
from orchestrator.errors import ConfigError, check_name
from orchestrator.experiment.config import MAX_GROUP, MAX_SEED, ExperimentConfig, require_validation
from orchestrator.experiment.config_files import read_yaml
from orchestrator.experiment.launch import use_gpu
from orchestrator.experiment.model_registry import register_checkpoint
from orchestrator.experiment.runner import ConfigSource, Prepared, check, provision
from orchestrator.experiment.store import ui_hint, write_view
from orchestrator.experiment.teachers import check_teacher_checkpoint
from orchestrator.experiment.tracking import run_params
from orchestrator.search import ledger, parent
from orchestrator.search.design import build_design
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import FIXED_DESIGNS, Point, Sampler, TrialOptions, point_config
from orchestrator.search.spaces import SearchSpace, fixed_by, load_space, space_plugins
from orchestrator.search.status import FAILED
from orchestrator.search.tuner import run_points, run_search, trial_resources

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class SweepResult:
    """One row per (setting, seed) child run, rebuilt from MLflow; `best()` picks on validation only."""

    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    parameters: list[str]
    frame: pd.DataFrame

    def dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def settings(self) -> pd.DataFrame:
        """One row per setting: seed mean ± std of val/test accuracy, seeds run, failures."""
        import pandas as pd

        if self.frame.empty:
            return pd.DataFrame()
        f = self.frame
        grouped = f.groupby("setting_id", sort=False)
        out = grouped[self.parameters].first()
        out["seeds"] = grouped.size()
        out["failed"] = grouped["status"].agg(lambda s: int(s.isin(FAILED).sum()))
        out["early_stopped"] = grouped["status"].agg(lambda s: int((s == "early_stopped").sum()))
        out["complete"] = grouped["status"].agg(lambda s: bool((s == "finished").all()))
        for metric in ("val_acc", "test_acc", "last_epoch_test_acc", "peak_test_acc"):
            if metric not in f:  # a frame made before the protocol columns
                continue
            out[f"{metric}_mean"] = grouped[metric].mean()
            out[f"{metric}_std"] = grouped[metric].std()
        return out.sort_values(["complete", "val_acc_mean"], ascending=False)

    def best(self) -> pd.Series:
        """The complete setting with the highest mean validation accuracy (test accuracy is never used)."""
        table = self.settings()
        complete = table[table["complete"]] if not table.empty else table
        if complete.empty:
            raise ValueError(f"sweep {self.name}: no setting finished all its seeds")
        return complete.iloc[0]

    def ui_hint(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id, view=self.name)


def load_sweep(name: str, tracking_uri: str | None = None, experiment: str = "kdo") -> SweepResult:
    """Rebuild a sweep's results from MLflow alone (no rerun): `kdo report NAME`. Runs a driver that is gone left
    RUNNING (killed, or it lost its store) are settled `crashed` first, the parent FAILED."""
    uri, client, run = parent.find("sweep", name, tracking_uri, experiment)
    write_view(uri, run.info.experiment_id, "sweep", name, best_effort=True)  # older sweeps get one too
    parameters = json.loads(run.data.tags.get("kdo.parameters", "[]"))
    frame = ledger.children_frame(client, run.info.experiment_id, run.info.run_id, parameters)
    return SweepResult(name, run.info.run_id, run.info.experiment_id, uri, parameters, frame)


def _options(sampler: str, scheduler: str | None, trials: int, concurrency: int, metric: str, seeds: list[int],
             max_failures: int, design_seed: int, checkpoint_seconds: float, group_size: int,
             cfg: ExperimentConfig) -> TrialOptions:
    if sampler not in ("tpe", "random", "sobol", "grid"):
        raise ConfigError(f"--sampler: unknown sampler '{sampler}'; allowed: tpe, random, sobol, grid")
    if scheduler not in (None, "asha", "none"):
        raise ConfigError(f"--scheduler: unknown scheduler '{scheduler}'; allowed: asha, none")
    if sampler in FIXED_DESIGNS and scheduler == "asha":
        raise ConfigError(f"--scheduler: a fixed {sampler} design runs every point in full; use --scheduler none")
    if trials < 1:
        raise ConfigError(f"--trials: must be >= 1 (got {trials})")
    if concurrency < 1:
        raise ConfigError(f"--concurrency: must be >= 1 (got {concurrency})")
    if not 0 <= max_failures <= 100:
        raise ConfigError(f"--max-failures: retries of a crashed trial, 0 to 100 (got {max_failures})")
    if checkpoint_seconds < 0:
        raise ConfigError(f"--checkpoint-seconds: must be >= 0 (got {checkpoint_seconds:g})")
    if not 0 <= group_size <= MAX_GROUP:
        raise ConfigError(f"--group-size: runs per group, 0 (auto) to {MAX_GROUP}; 1 trains every run alone "
                          f"(got {group_size})")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise ConfigError(f"--seeds: distinct integers in 0..{MAX_SEED}, e.g. 0,1,2 (got {seeds})")
    if cfg.scaling.num_workers > 1 and sampler not in FIXED_DESIGNS and len(seeds) > 1:
        raise ConfigError(f"--seeds: a data-parallel trial (scaling.num_workers={cfg.scaling.num_workers}) runs one "
                          "seed; use --sampler sobol|grid, which makes one trial per (setting, seed)")
    return TrialOptions(sampler=sampler, scheduler=scheduler or ("none" if sampler in FIXED_DESIGNS else "asha"),
                        trials=trials, concurrency=concurrency, metric=metric, seeds=seeds,
                        max_failures=max_failures, design_seed=design_seed, checkpoint_seconds=checkpoint_seconds,
                        group_size=group_size)


def plan_points(name: str, space: SearchSpace, base: ExperimentConfig, options: TrialOptions,
                checkpoints: dict[str, dict[str, Any]] | None = None) -> list[Point]:
    """Every (setting, seed) of a fixed design, before Ray starts: each setting's config validated once
    (`space.apply`; `base` is checked already, `runner.check`), each point's teacher checkpoint checked against it
    (read once per source, each distinct network built once)."""
    points = []
    for setting in build_design(space, options.sampler, options.trials, seed=options.design_seed):  # type: ignore[arg-type]
        sid = ledger.setting_id(setting)
        cfg = space.apply(base, setting)
        for seed in options.seeds:
            points.append(Point(setting, seed, sid, point_config(cfg, name, sid, seed)))
            check_teacher_checkpoint(points[-1].config, checkpoints)
    return points


def sweep(config: ConfigSource, space: str | Path | dict[str, Any] | None = None,
          *, trials: int = 8, sampler: Sampler = "tpe", scheduler: str | None = None, concurrency: int = 2,
          metric: str = "val_acc", seeds: list[int] | tuple[int, ...] = (0,), name: str | None = None,
          address: str | None = None, max_failures: int = 0, overrides: list[str] | None = None,
          design_seed: int = 0, checkpoint_seconds: float = 30.0, group_size: int = 0,
          verbose: bool = False, plugins: list[str] | tuple[str, ...] = ()) -> SweepResult:
    """Search `space` (a shipped method name, a YAML path or a dict; default: the method's own) with Tune.

    `trials` counts settings (a grid's size is fixed by the space). Adaptive samplers (`tpe`, `random`:
    Optuna) run each setting's seeds in one trial and ASHA stops weak settings on the seed-mean `metric`;
    fixed designs (`sobol`, `grid`) run every (setting, seed) in full, the runs of one seed in groups of up to
    `group_size` per trial (0: auto, 1: one run per trial) on shared batches and teacher passes. A trial that
    crashes is retried `max_failures` times from its last checkpoint (taken `checkpoint_seconds` apart).
    Progress is one live panel on a terminal, else one line per run; `verbose` adds Tune's status output and
    the Ray workers' own output. `plugins` (module names or paths) join those the config and the space name.
    """
    checkpoints: dict[str, dict[str, Any]] = {}
    cfg = check(config, overrides, checkpoints=checkpoints, plugins=merged(space_plugins(space), plugins))
    require_validation(cfg, "sweep")
    options = _options(sampler, scheduler, trials, concurrency, metric, list(seeds), max_failures, design_seed,
                       checkpoint_seconds, group_size, cfg)
    space_obj = fixed_by(load_space(space if space is not None else cfg.method.name, cfg), overrides or [])
    wanted = check_name(name or f"{cfg.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}", "--name")
    name = parent.claim_name("sweep", wanted, cfg, explicit=name is not None)
    points = plan_points(name, space_obj, cfg, options, checkpoints) if options.sampler in FIXED_DESIGNS else None

    # data and teacher once, before any trial
    prepared = provision(cfg, address=address, checkpoints=checkpoints, verbose=verbose)
    trial_resources(cfg, use_gpu(cfg), concurrency)  # a trial that cannot fit fails before the parent run exists
    run = parent.start("sweep", name, prepared, params=run_params(cfg), tags={
        "kdo.method": cfg.method.name, "kdo.space": space_obj.source, "kdo.sampler": options.sampler,
        "kdo.scheduler": options.scheduler, "kdo.seeds": ",".join(map(str, options.seeds)),
        "kdo.parameters": json.dumps(list(space_obj.parameters)), "kdo.options": options.to_json()},
        files={"config.yaml": cfg.to_yaml(), "space.json": space_obj.model_dump_json(indent=2)})
    return _drive(run, lambda: prepared, space_obj, options, points, resumed=False, verbose=verbose)


def resume(name: str, *, address: str | None = None, tracking_uri: str | None = None,
           experiment: str = "kdo", force: bool = False, verbose: bool = False,
           plugins: list[str] | tuple[str, ...] = ()) -> SweepResult:
    """Finish a sweep whose driver died or was stopped: nothing final is rerun; crashed and interrupted runs are
    redone, continuing from their checkpoints where they have one (older attempts end `superseded`).

    The ledger is the sweep's MLflow children (not Tune's state, which is snapshotted only every few
    seconds): fixed designs run only their missing (setting, seed) points; adaptive sweeps re-enqueue
    every setting seen (finished seeds are replayed from MLflow, not trained) and draw the rest anew.
    Refused while the sweep's driver is alive (`force` resumes regardless). The plugins the sweep recorded are
    imported again; one of `plugins` takes the place of a recorded one of the same module name (a file that moved).
    """
    uri, client, found = parent.find("sweep", name, tracking_uri, experiment, to_resume=True, force=force)
    if parent.nothing_to_resume("sweep", uri, found):
        return load_sweep(name, uri, experiment)
    parent_id = found.info.run_id
    options = TrialOptions.from_json(found.data.tags["kdo.options"])
    checkpoints: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kdo-resume-") as local:
        raw = read_yaml(client.download_artifacts(parent_id, "config.yaml", local))
        raw["tracking"]["uri"] = uri  # the logged config shows credentials masked: use the store it was found in
        raw["plugins"] = replaced(raw.get("plugins") or [], plugins)
        cfg = check(raw, checkpoints=checkpoints)
        space_obj = SearchSpace.model_validate_json(Path(client.download_artifacts(parent_id, "space.json",
                                                                                   local)).read_text())
    run = parent.reopen("sweep", found, uri, cfg)
    points = plan_points(name, space_obj, cfg, options, checkpoints) if options.sampler in FIXED_DESIGNS else None
    return _drive(run, lambda: provision(cfg, address=address, checkpoints=checkpoints, verbose=verbose), space_obj,
                  options, points, resumed=True, verbose=verbose)


def _drive(run: parent.ParentRun, prepare: Callable[[], Prepared], space: SearchSpace, options: TrialOptions,
           points: list[Point] | None, *, resumed: bool, verbose: bool) -> SweepResult:
    """The sweep's work under its parent's lifecycle (`parent.hold`): its points, or an Optuna search (on resume,
    re-enqueuing the settings the ledger has seen); then the results table and the best setting on the parent."""
    parameters = list(space.parameters)
    results: list[SweepResult] = []

    def train(prepared: Prepared, ref: LedgerRef) -> frozenset[str]:
        gpu = use_gpu(prepared.config)
        if points is not None:
            return run_points(ref, prepared, points, options, use_gpu=gpu, verbose=verbose)
        previous = ledger.seen_settings(run.tracker.client, ref.experiment_id, ref.parent_run_id) if resumed else []
        return run_search(ref, prepared, space, options, previous, use_gpu=gpu, verbose=verbose)

    def summarise(status: str) -> str:
        result = SweepResult(run.name, run.run_id, run.experiment_id, run.uri, parameters,
                             ledger.children_frame(run.tracker.client, run.experiment_id, run.run_id, parameters))
        results.append(result)
        return _log_best(run, result, status)

    parent.hold(run, prepare, train, summarise, resumed=resumed)
    return results[-1]


def _log_best(run: parent.ParentRun, result: SweepResult, status: str) -> str:
    """The results table, run counts and best setting on the parent (its student in the model registry); a sweep
    where no setting finished all its seeds ends FAILED."""
    tracker, frame = run.tracker, result.dataframe()
    tracker.log_text(frame.to_csv(index=False), "results.csv")
    try:
        best = result.best()
        # Tags, not params: a resumed sweep's best may change, and MLflow params cannot.
        best_run = frame[frame["setting_id"] == best.name]["run_id"].iloc[0]
        model = register_checkpoint(run.uri, best_run, f"kdo-student-{run.name}", "student",
                                    f"the best student of sweep {run.name}")
        tracker.set_tags({**{f"best.{p}": best[p] for p in result.parameters}, "best_setting_id": best.name,
                          "best_run_id": best_run, "best_model": model})
        tracker.log_metrics({"best_val_acc": best["val_acc_mean"], "best_test_acc": best["test_acc_mean"]}, step=0)
    except ValueError:
        status = "FAILED" if status == "FINISHED" else status
    tracker.log_metrics({f"trials_{k}": float(v) for k, v in frame["status"].value_counts().to_dict().items()},
                        step=0)
    return status

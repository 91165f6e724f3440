"""`sweep(config, space, ...) -> SweepResult`: Ray Tune + Optuna over distillation runs.

Every (setting, seed) is an MLflow child of the sweep's parent run, logged by the trial itself (Ray's
MLflowLoggerCallback cannot nest runs). The children are also the sweep's ledger: results tables and
`kdo report` are rebuilt from them alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from methods import get_method
from orchestrator.config import ExperimentConfig, load_config, resolve_paths, set_path
from orchestrator.data import Splits
from orchestrator.design import build_design
from orchestrator.errors import ConfigError
from orchestrator.loop import iterate_epochs
from orchestrator.runner import Prepared, fit_data_parallel, prepare, use_gpu
from orchestrator.spaces import SearchSpace, load_space
from orchestrator.tracking import Tracker, flatten, start_run, ui_hint

Sampler = Literal["tpe", "random", "sobol", "grid"]
FIXED_DESIGNS = ("sobol", "grid")


def setting_id(setting: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tune_key(path: str) -> str:
    return path.replace(".", "__")


@dataclass
class SweepPlan:
    """What every trial needs besides data and teacher (shipped once through the object store)."""

    name: str
    base: dict[str, Any]
    space: SearchSpace | None  # None for a study: its points carry their own configs
    seeds: list[int]
    points: list[dict[str, Any]] | None  # fixed designs: one trial per {"setting", "seed"}
    parent_run_id: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    use_gpu: bool = False


def _close(tracker: Tracker, status: str, mlflow_status: str) -> None:
    tracker.set_tags({"kdo.status": status, "kdo.early_stopped": str(status == "early_stopped").lower()})
    tracker.finish(mlflow_status)


DONE = ("finished", "diverged", "early_stopped")  # terminal outcomes of a (setting, seed): never rerun
_MLFLOW_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "stopped": "KILLED", "early_stopped": "KILLED",
                  "error": "FAILED", "running": "KILLED", "orphaned": "KILLED"}


def settle_child(uri: str, run: Any, unfinished: str) -> None:
    """Terminate a child left RUNNING: with the outcome its loop recorded if it got that far, else `unfinished`."""
    recorded = run.data.tags.get("kdo.status")
    status = recorded if recorded in ("finished", "diverged") else unfinished
    _close(Tracker(uri, run.info.run_id), status, _MLFLOW_STATUS[status])


def _with(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    raw = cfg.model_dump(mode="json")
    for path, value in values.items():
        set_path(raw, path, value)
    return ExperimentConfig.model_validate(raw)


def _replay(client: MlflowClient, run: Any) -> Iterator[dict[str, Any]]:
    """A finished child's epochs, from MLflow, as `iterate_epochs` would yield them (resume: no rerun)."""
    status = run.data.tags["kdo.status"]
    history = {k: sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
               for k in ("val_acc", "train_loss")}
    for i, (val, loss) in enumerate(zip(history["val_acc"], history["train_loss"], strict=False)):
        row = {"val_acc": val.value, "train_loss": loss.value}
        if i == len(history["val_acc"]) - 1 and status in ("finished", "diverged"):
            row.update(test_acc=run.data.metrics.get("test_acc", math.nan), status=status)
        yield row


def _start_child(plan: SweepPlan, base: ExperimentConfig, setting: dict[str, Any], seed: int,
                 point: dict[str, Any] | None = None) -> tuple[ExperimentConfig, Tracker]:
    """The config of one (setting, seed) and its MLflow child run under the sweep's parent.

    A study's point carries its own config (its method, the setting applied), its id and extra tags.
    """
    point = point or {}
    sid = point.get("setting_id") or setting_id(setting)
    run = {"training.seed": seed, "name": f"{plan.name}-{sid[:6]}-s{seed}"}
    cfg = plan.space.apply(base, {**setting, **run}) if "config" not in point else _with(base, run)
    tracker, _ = start_run(plan.tracking_uri, plan.experiment, cfg.name, parent_run_id=plan.parent_run_id,
                           tags={"kdo.kind": "trial", "kdo.sweep": plan.name, "kdo.setting_id": sid,
                                 "kdo.setting": json.dumps(setting, sort_keys=True), "kdo.seed": seed,
                                 "kdo.method": cfg.method.name,
                                 "kdo.data_free": str(get_method(cfg.method.name).data_free).lower(),
                                 **point.get("tags", {})})
    tracker.log_params(flatten(cfg.model_dump(mode="json")))
    return cfg, tracker


def _data_parallel_trial(plan: SweepPlan, base: ExperimentConfig, setting: dict[str, Any], seed: int,
                         previous: Any, client: MlflowClient, splits: Splits, teacher: dict[str, Any] | None,
                         point: dict[str, Any] | None) -> None:
    """A trial whose run is a TorchTrainer; rank 0's epochs reach Tune through `TuneReportCallback`."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sid = (point or {}).get("setting_id") or setting_id(setting)
    if previous is not None:  # resume: this (setting, seed) is in the ledger already
        for row in _replay(client, previous):
            tune.report({**row, "setting_id": sid})
        return
    cfg, tracker = _start_child(plan, base, setting, seed, point)
    status = "running"
    try:
        payload = {"config": cfg.model_dump(mode="json"), "data": ray.put(splits),
                   "teacher": ray.put(teacher) if teacher is not None else None, "run_id": tracker.run_id,
                   "artifact_name": "student", "use_gpu": plan.use_gpu}
        status = fit_data_parallel(cfg, payload, callbacks=[TuneReportCallback()]).status
    except BaseException as exc:  # SystemExit: Tune stopped the trial at a report
        status = "early_stopped" if isinstance(exc, SystemExit) else "error"
        raise
    finally:
        if status == "early_stopped":  # the stop may come with the last report, after the loop recorded its outcome
            settle_child(plan.tracking_uri, client.get_run(tracker.run_id), "early_stopped")
        else:
            _close(tracker, status, _MLFLOW_STATUS[status])


def run_trial(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None,
              plan: SweepPlan) -> None:
    """One Tune trial: one setting, its seeds advanced epoch by epoch in lockstep, the seed mean reported.

    A diverged seed fails the whole setting (status `diverged`, its accuracy counted at chance level in
    the reported mean), never averaged away. Seeds the ledger (this sweep's MLflow children) already
    holds are replayed from MLflow instead of trained again.
    """
    from ray import tune

    point: dict[str, Any] | None = None
    if plan.points is not None:
        point = plan.points[tune_config["point"]]
        setting, seeds = point["setting"], [point["seed"]]
    else:
        keys = {_tune_key(p): p for p in plan.space.parameters}
        setting, seeds = {keys[k]: v for k, v in tune_config.items() if k in keys}, plan.seeds
    sid = (point or {}).get("setting_id") or setting_id(setting)
    base = ExperimentConfig.model_validate((point or {}).get("config", plan.base))
    torch.set_num_threads(max(1, int(base.scaling.cpus_per_worker)))
    chance = 1.0 / splits.info.num_classes
    client = MlflowClient(plan.tracking_uri)
    done = {int(r.data.tags["kdo.seed"]): r for r in client.search_runs(
        [plan.experiment_id], f"tags.mlflow.parentRunId = '{plan.parent_run_id}' and tags.`kdo.setting_id` = '{sid}'")
        if r.data.tags.get("kdo.status") in DONE}
    if base.scaling.num_workers > 1:  # one seed per trial (checked by the sweep), DDP through Ray Train
        _data_parallel_trial(plan, base, setting, seeds[0], done.get(seeds[0]), client, splits, teacher, point)
        return
    trackers: list[Tracker | None] = []
    runs: list[Iterator[dict[str, Any]]] = []
    for seed in seeds:
        if seed in done:
            trackers.append(None)
            runs.append(_replay(client, done[seed]))
            continue
        cfg, tracker = _start_child(plan, base, setting, seed, point)
        trackers.append(tracker)
        runs.append(iterate_epochs(cfg, splits, teacher, device=torch.device("cuda" if plan.use_gpu else "cpu"),
                                   tracker=tracker, log=None))
    statuses = ["running"] * len(seeds)
    try:
        for epoch, rows in enumerate(zip(*runs, strict=False), start=1):  # seeds share their epochs
            diverged = [row.get("status") == "diverged" for row in rows]
            vals = [chance if d else row["val_acc"] for row, d in zip(rows, diverged, strict=True)]
            report: dict[str, Any] = {"val_acc": sum(vals) / len(vals), "epoch": epoch,
                                      "setting_id": sid, "seeds_diverged": sum(diverged),
                                      "train_loss": sum(r["train_loss"] for r in rows) / len(rows)}
            last = "test_acc" in rows[0] or any(diverged)
            if last:
                tests = [chance if d else row["test_acc"] for row, d in zip(rows, diverged, strict=True)]
                report.update(test_acc=sum(tests) / len(tests), status="diverged" if any(diverged) else "finished")
                statuses = ["diverged" if d else ("finished" if "test_acc" in row else "stopped")
                            for row, d in zip(rows, diverged, strict=True)]
                # Closed before the last report: Tune may tear this process down as soon as it has it.
                for i, (tracker, status) in enumerate(zip(trackers, statuses, strict=True)):
                    if tracker is not None:
                        _close(tracker, status, _MLFLOW_STATUS[status])
                        trackers[i] = None
            tune.report(report)
            if last:
                break
    except SystemExit:  # Tune stops a trial (ASHA) by exiting it at its next report
        statuses = ["early_stopped" if s == "running" else s for s in statuses]
        raise
    except BaseException:
        statuses = ["error" if s == "running" else s for s in statuses]
        raise
    finally:
        for tracker, status in zip(trackers, statuses, strict=True):
            if tracker is not None:
                final = "early_stopped" if status == "running" else status
                _close(tracker, final, _MLFLOW_STATUS[status])


# ------------------------------------------------------------------------------------------ results
_STATUS_OK = "finished"


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
        if self.frame.empty:
            return pd.DataFrame()
        f = self.frame
        grouped = f.groupby("setting_id", sort=False)
        out = grouped[self.parameters].first()
        out["seeds"] = grouped.size()
        out["failed"] = grouped["status"].agg(lambda s: int(s.isin(["diverged", "error"]).sum()))
        out["early_stopped"] = grouped["status"].agg(lambda s: int((s == "early_stopped").sum()))
        out["complete"] = grouped["status"].agg(lambda s: bool((s == _STATUS_OK).all()))
        for metric in ("val_acc", "test_acc"):
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
        return ui_hint(self.tracking_uri, self.experiment_id)


def children_frame(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   parameters: list[str], tag_columns: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per child run of `parent_run_id`: setting, seed, parameters, status, accuracies, seconds, run id
    (and `tag_columns`: column name -> tag key)."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50_000)
    rows = []
    for r in runs:
        if r.data.tags.get("kdo.status") == "orphaned":  # an interrupted attempt, redone by `resume`
            continue
        m, tags = r.data.metrics, r.data.tags
        status = tags.get("kdo.status", "running" if r.info.status == "RUNNING" else r.info.status.lower())
        row = {"setting_id": tags.get("kdo.setting_id"), "seed": int(tags.get("kdo.seed", -1)), "status": status,
               "val_acc": m.get("selected_val_acc", m.get("val_acc", math.nan)),
               "test_acc": m.get("test_acc", math.nan),
               "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000.0,
               "run_id": r.info.run_id, **{col: tags.get(key) for col, key in (tag_columns or {}).items()}}
        for p in parameters:
            raw = r.data.params.get(p)
            try:
                row[p] = json.loads(raw) if raw is not None else None
            except json.JSONDecodeError:
                row[p] = raw
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["setting_id", "seed", *parameters, "status", "val_acc", "test_acc",
                                        "seconds", "run_id", *(tag_columns or {})])
    return frame.sort_values(["setting_id", "seed"]).reset_index(drop=True)


def find_parent(kind: str, name: str, tracking_uri: str | None, experiment: str) -> tuple[str, MlflowClient, Any]:
    """The newest parent run of the sweep or study (`kind`) named `name`: its store URI, a client and the run."""
    from orchestrator.config import absolute_uri, default_tracking_uri

    uri = absolute_uri(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri: no MLflow store at {uri}")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment '{experiment}' in {uri}")
    parents = client.search_runs([exp.experiment_id], f"tags.`kdo.{kind}` = '{name}' and tags.`kdo.kind` = '{kind}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ConfigError(f"NAME: no {kind} named '{name}' in {uri} (experiment '{experiment}')")
    return uri, client, parents[0]


def load_sweep(name: str, tracking_uri: str | None = None, experiment: str = "kdo") -> SweepResult:
    """Rebuild a sweep's results from MLflow alone (no rerun): `kdo report NAME`."""
    uri, client, parent = find_parent("sweep", name, tracking_uri, experiment)
    parameters = json.loads(parent.data.tags.get("kdo.parameters", "[]"))
    frame = children_frame(client, parent.info.experiment_id, parent.info.run_id, parameters)
    return SweepResult(name, parent.info.run_id, parent.info.experiment_id, uri, parameters, frame)


# ------------------------------------------------------------------------------------------- sweep
def _tune_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    out = {}
    for path, spec in space.parameters.items():
        if spec.type == "choice":
            out[_tune_key(path)] = tune.choice(spec.values)
        elif spec.type == "int":
            out[_tune_key(path)] = (tune.lograndint if spec.log else tune.randint)(int(spec.low), int(spec.high) + 1)
        else:
            out[_tune_key(path)] = (tune.loguniform if spec.log else tune.uniform)(spec.low, spec.high)
    return out


def _validate_options(sampler: str, scheduler: str | None, trials: int, concurrency: int,
                      seeds: list[int], cfg: ExperimentConfig) -> str:
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
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: distinct non-negative integers, e.g. 0,1,2 (got {seeds})")
    if cfg.scaling.num_workers > 1 and sampler not in FIXED_DESIGNS and len(seeds) > 1:
        raise ConfigError(f"--seeds: a data-parallel trial (scaling.num_workers={cfg.scaling.num_workers}) runs one "
                          "seed; use --sampler sobol|grid, which makes one trial per (setting, seed)")
    return scheduler or ("none" if sampler in FIXED_DESIGNS else "asha")


def sweep(config: str | Path | dict[str, Any] | ExperimentConfig, space: str | Path | dict[str, Any] | None = None,
          *, trials: int = 8, sampler: Sampler = "tpe", scheduler: str | None = None, concurrency: int = 2,
          metric: str = "val_acc", seeds: list[int] | tuple[int, ...] = (0,), name: str | None = None,
          address: str | None = None, max_failures: int = 0, overrides: list[str] | None = None,
          design_seed: int = 0) -> SweepResult:
    """Search `space` (a shipped method name, a YAML path or a dict; default: the method's own) with Tune.

    `trials` counts settings (a grid's size is fixed by the space). Adaptive samplers (`tpe`, `random`:
    Optuna) run each setting's seeds in one trial and ASHA stops weak settings on the seed-mean `metric`;
    fixed designs (`sobol`, `grid`) run one trial per (setting, seed) with no early stopping.
    """
    cfg = resolve_paths(load_config(config, overrides or []))
    seeds = list(seeds)
    scheduler = _validate_options(sampler, scheduler, trials, concurrency, seeds, cfg)
    space_obj = load_space(space if space is not None else cfg.method.name, cfg)
    if sampler in FIXED_DESIGNS:
        build_design(space_obj, sampler, trials, seed=design_seed)  # type: ignore[arg-type]  # fails early
    name = name or f"{cfg.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    prepared = prepare(cfg, address=address)  # data loaded and teacher trained once, before any trial
    cfg = prepared.config
    assert cfg.tracking.uri is not None
    _trial_resources(cfg, use_gpu(cfg), concurrency)  # a trial that cannot fit fails before the parent run exists
    options = {"sampler": sampler, "scheduler": scheduler, "trials": trials, "concurrency": concurrency,
               "metric": metric, "seeds": seeds, "max_failures": max_failures, "design_seed": design_seed}
    parent, experiment_id = start_run(
        cfg.tracking.uri, cfg.tracking.experiment, name,
        tags={"kdo.kind": "sweep", "kdo.sweep": name, "kdo.method": cfg.method.name, "kdo.space": space_obj.source,
              "kdo.sampler": sampler, "kdo.scheduler": scheduler, "kdo.seeds": ",".join(map(str, seeds)),
              "kdo.parameters": json.dumps(list(space_obj.parameters)), "kdo.options": json.dumps(options)})
    parent.log_params(flatten(cfg.model_dump(mode="json")))
    parent.log_text(cfg.to_yaml(), "config.yaml")
    parent.log_text(space_obj.model_dump_json(indent=2), "space.json")
    plan = SweepPlan(name, cfg.model_dump(mode="json"), space_obj, seeds, None, parent.run_id, cfg.tracking.uri,
                     cfg.tracking.experiment, experiment_id)
    return _execute_sweep(plan, prepared, parent, options, previous=[])


def resume(name: str, *, address: str | None = None, tracking_uri: str | None = None,
           experiment: str = "kdo") -> SweepResult:
    """Finish a sweep whose driver died: nothing finished is rerun, orphaned children are closed and redone.

    The ledger is the sweep's MLflow children (not Tune's state, which is snapshotted only every few
    seconds): fixed designs run only their missing (setting, seed) points; adaptive sweeps re-enqueue
    every setting seen (finished seeds are replayed from MLflow, not trained) and draw the rest anew.
    """
    found = load_sweep(name, tracking_uri, experiment)
    client = MlflowClient(found.tracking_uri)
    parent_run = client.get_run(found.parent_run_id)
    options = json.loads(parent_run.data.tags["kdo.options"])
    for run in client.search_runs([found.experiment_id], f"tags.mlflow.parentRunId = '{found.parent_run_id}' "
                                                         "and attributes.status = 'RUNNING'"):
        settle_child(found.tracking_uri, run, "orphaned")
    local = Path(tempfile.mkdtemp(prefix="kdo-resume-"))
    cfg_path = client.download_artifacts(found.parent_run_id, "config.yaml", str(local))
    space_path = client.download_artifacts(found.parent_run_id, "space.json", str(local))
    cfg = load_config(cfg_path)
    space_obj = SearchSpace.model_validate_json(Path(space_path).read_text())
    prepared = prepare(cfg, address=address)
    client.update_run(found.parent_run_id, status="RUNNING")
    parent = Tracker(found.tracking_uri, found.parent_run_id)
    plan = SweepPlan(name, cfg.model_dump(mode="json"), space_obj, options["seeds"], None, found.parent_run_id,
                     found.tracking_uri, cfg.tracking.experiment, found.experiment_id)
    previous = [json.loads(r.data.tags["kdo.setting"]) for r in client.search_runs(
        [found.experiment_id], f"tags.mlflow.parentRunId = '{found.parent_run_id}'") if "kdo.setting" in r.data.tags]
    unique = list({setting_id(s): s for s in previous}.values())
    return _execute_sweep(plan, prepared, parent, options, previous=unique)


def _execute_sweep(plan: SweepPlan, prepared: Prepared, parent: Tracker, options: dict[str, Any],
                   previous: list[dict[str, Any]]) -> SweepResult:
    """Run the trials still to do under `parent` with Tune; `previous` settings are re-enqueued (resume)."""
    assert plan.space is not None
    status = "FAILED"
    try:
        run_tune(plan, prepared, options, previous)
        status = "FINISHED"
    finally:
        result = _finish(parent, plan.experiment_id, plan.name, list(plan.space.parameters), status)
    return result


def run_tune(plan: SweepPlan, prepared: Prepared, options: dict[str, Any], previous: list[dict[str, Any]],
             points: list[dict[str, Any]] | None = None) -> None:
    """The Tune part of a sweep or a study: fixed points (a design, or a study's prebuilt `points`) minus
    those the ledger holds, or an Optuna search; one `run_trial` per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg, space_obj, sampler = prepared.config, plan.space, options["sampler"]
    plan.use_gpu = use_gpu(cfg)
    if points is not None or sampler in FIXED_DESIGNS:
        if points is None:
            assert space_obj is not None
            design = build_design(space_obj, sampler, options["trials"], seed=options["design_seed"])
            points = [{"setting": s, "seed": seed} for s in design for seed in plan.seeds]
        client = MlflowClient(plan.tracking_uri)
        done = {(r.data.tags.get("kdo.setting_id"), int(r.data.tags.get("kdo.seed", -1))) for r in client.search_runs(
            [plan.experiment_id], f"tags.mlflow.parentRunId = '{plan.parent_run_id}'", max_results=50_000)
            if r.data.tags.get("kdo.status") in DONE}
        plan.points = [p for p in points if (p.get("setting_id") or setting_id(p["setting"]), p["seed"]) not in done]
        param_space: dict[str, Any] = {"point": tune.grid_search(list(range(len(plan.points))))}
        search_alg, num_samples = None, 1
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        assert space_obj is not None
        # On resume the sampler restarts: a fresh seed keeps it from drawing the settings it drew before.
        seed = options["design_seed"] + 7919 * len(previous)
        optuna_sampler = (optuna.samplers.TPESampler(seed=seed) if sampler == "tpe"
                          else optuna.samplers.RandomSampler(seed=seed))
        replays = [{_tune_key(k): v for k, v in s.items()} for s in previous]
        param_space = _tune_space(space_obj)
        search_alg = OptunaSearch(sampler=optuna_sampler, points_to_evaluate=replays or None)
        num_samples = max(options["trials"], len(replays))
    epochs_spec = space_obj.parameters.get("training.epochs") if space_obj is not None else None
    epochs = int(epochs_spec.high or 1) if epochs_spec is not None else cfg.training.epochs
    resources, concurrency = _trial_resources(cfg, plan.use_gpu, options["concurrency"])
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, splits=prepared.splits, teacher=prepared.teacher, plan=plan), resources)
    # The first epochs of a short run are noisy: no setting is judged before a quarter of its budget.
    asha = (ASHAScheduler(max_t=epochs, grace_period=max(1, epochs // 4), reduction_factor=2)
            if options["scheduler"] == "asha" else None)
    if plan.points is None or plan.points:
        tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=options["metric"], mode="max", search_alg=search_alg,
                                        num_samples=num_samples, max_concurrent_trials=concurrency,
                                        scheduler=asha, reuse_actors=True),  # no re-import per trial
            run_config=tune.RunConfig(name=plan.name, storage_path=cfg.tracking.storage_path, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=options["max_failures"])),
        ).fit()


TRIAL_DRIVER_CPU = 0.25  # a data-parallel trial only waits on its TorchTrainer (Tune needs a CPU share > 0)


def _trial_resources(cfg: ExperimentConfig, use_gpu: bool, concurrency: int) -> tuple[dict[str, float], int]:
    """What Tune reserves per trial, and how many trials fit at once.

    A one-worker trial trains in its own process. A data-parallel trial starts a TorchTrainer whose
    workers Tune does not count, so concurrency is capped so trial + workers fit the cluster's CPUs.
    """
    import ray

    sc = cfg.scaling
    gpu = sc.gpus_per_worker if use_gpu else 0.0
    if sc.num_workers == 1:
        return {"cpu": sc.cpus_per_worker, "gpu": gpu}, concurrency
    per_trial = TRIAL_DRIVER_CPU + sc.num_workers * sc.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0.0)
    fits = int(cpus // per_trial)
    if fits < 1:
        raise ConfigError(f"scaling: one data-parallel trial needs {per_trial:g} CPUs ({sc.num_workers} workers x "
                          f"{sc.cpus_per_worker:g} + {TRIAL_DRIVER_CPU:g}); the cluster has {cpus:g}")
    return {"cpu": TRIAL_DRIVER_CPU, "gpu": 0.0}, min(concurrency, fits)


def close_orphans(parent: Tracker, experiment_id: str) -> None:
    """Children left RUNNING (trials Tune stopped between reports, or tore down after their last one)."""
    for run in parent.client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' "
                                                          "and attributes.status = 'RUNNING'", max_results=50_000):
        settle_child(parent.uri, run, "early_stopped")


def _finish(parent: Tracker, experiment_id: str, name: str, parameters: list[str], status: str) -> SweepResult:
    """Close orphaned children, summarise onto the parent."""
    client = parent.client
    close_orphans(parent, experiment_id)
    result = SweepResult(name, parent.run_id, experiment_id, parent.uri, parameters,
                         children_frame(client, experiment_id, parent.run_id, parameters))
    with_results = result.dataframe()
    parent.log_text(with_results.to_csv(index=False), "results.csv")
    try:
        best = result.best()
        parent.log_params({f"best.{p}": best[p] for p in parameters})
        parent.log_metrics({"best_val_acc": best["val_acc_mean"], "best_test_acc": best["test_acc_mean"]}, step=0)
        best_runs = with_results[with_results["setting_id"] == best.name]["run_id"]
        parent.set_tags({"best_run_id": best_runs.iloc[0], "best_setting_id": best.name})
    except ValueError:
        status = "FAILED"
    counts = with_results["status"].value_counts().to_dict()
    parent.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()}, step=0)
    parent.finish(status)
    return result

"""Launching one run on Ray: what a Ray process needs to train it (`Launch`), a direct Ray task for one worker or
Ray Train's TorchTrainer for several (`experiment.data_parallel`), and `execute`, which logs the run in MLflow
around the launch and returns its `RunResult`. Ray is imported inside the functions that use it: importing this
module (every command does) costs no Ray start-up."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from methods.plugins import is_path
from orchestrator.errors import ConfigError, reason
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.loop import LoopOutput
from orchestrator.experiment.model_registry import register_student
from orchestrator.experiment.progress import watch_epochs
from orchestrator.experiment.store import store_errors, ui_hint
from orchestrator.experiment.tracking import (
    dataset_inputs,
    log_datasets,
    run_params,
    run_tags,
    start_run,
)
from orchestrator.experiment.workers import Launch, fit_data_parallel, launch_for, train_direct

if TYPE_CHECKING:
    import pandas as pd



@dataclass
class RunResult:
    """One finished run: the selected student's val/test accuracy, its history and where it is logged."""

    name: str
    status: str
    val_acc: float
    test_acc: float
    best_epoch: int
    teacher_val_acc: float | None
    teacher_test_acc: float | None
    seconds: float
    history: pd.DataFrame
    run_id: str
    experiment_id: str
    tracking_uri: str
    config: ExperimentConfig
    reason: str = ""  # why a run crashed

    def ui_hint(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id)


def init_ray(address: str | None = None, *, verbose: bool = False, plugins: list[str] | tuple[str, ...] = ()) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start a local runtime; reuse a live one.

    Workers' output reaches the driver's console only when `verbose`: what the user sees (epochs, runs) the
    driver reads from MLflow, and a worker's traceback when Ray ends it at shutdown is no news. Plugin files and
    folders travel to every node as the job's `py_modules` (a worker imports that copy: `methods.plugins`)."""
    import ray

    if not verbose:  # Ray's notice that token auth is on (every command), and that a user exception type could not
        # be mixed into RayTaskError (kdo reads the exception's `cause`: `errors.reason`): not news, off unless verbose
        for name in ("ray._private.authentication.authentication_token_setup", "ray.exceptions"):
            logging.getLogger(name).setLevel(logging.ERROR)
    files = [p for p in plugins if is_path(p)]
    if ray.is_initialized():
        _check_plugins_reach(files)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ and token.is_file():
        # Ray 2.60 turns token auth on by itself only for address=None/"auto"; a `ray start` cluster
        # reached by host:port otherwise refuses the driver with an opaque ConnectionError.
        os.environ["RAY_AUTH_MODE"] = "token"
    ray.init(address=address, log_to_driver=verbose, configure_logging=True, logging_level="WARNING",
             runtime_env={"py_modules": files} if files else None)
    _shipped.update(files)


_shipped: set[str] = set()  # the plugin files this process's Ray job ships to its workers


def _check_plugins_reach(files: list[str]) -> None:
    """Ray was started before these plugins were named (a notebook's `ray.init`, an earlier run): its job cannot
    ship them any more. On one machine every worker reads them from their path; across machines, one line."""
    import ray

    if not files or set(files) <= _shipped or ray.get_runtime_context().runtime_env.get("py_modules"):
        return
    here = ray.util.get_node_ip_address()
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if hosts - {here}:
        raise ConfigError(f"plugins: Ray was started without {', '.join(files)}, so nodes other than this one cannot "
                          f"import them; call ray.init(runtime_env={{'py_modules': {files}}}) yourself, or "
                          "ray.shutdown() and let kdo start Ray")


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse (one line) what the connected cluster can never grant, before anything is submitted: Ray would
    hold an infeasible request pending for ever."""
    import ray

    sc = cfg.scaling
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = (max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU"))
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    if sc.use_gpu is True and not gpus:
        raise ConfigError("scaling.use_gpu: true, but the Ray cluster has no GPU (use auto or false)")
    if sc.use_gpu is True and sc.gpus_per_worker > gpus:
        raise ConfigError(f"scaling.gpus_per_worker: {sc.gpus_per_worker:g}, but no node has more than {gpus:g}")
    if sc.cpus_per_worker > cpus:
        raise ConfigError(f"scaling.cpus_per_worker: {sc.cpus_per_worker:g}, but no node has more than {cpus:g} "
                          "CPUs")
    if sc.num_workers * sc.cpus_per_worker > total_cpus:
        raise ConfigError(f"scaling.num_workers: {sc.num_workers} workers x {sc.cpus_per_worker:g} CPUs, but the "
                          f"cluster has {total_cpus:g}")


def use_gpu(cfg: ExperimentConfig) -> bool:
    """`scaling.use_gpu`, with `auto` meaning: the Ray cluster has GPUs."""
    import ray

    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def _launch(launch: Launch) -> LoopOutput:
    import ray

    sc = launch.config.scaling
    if sc.trainer == "direct" or (sc.trainer == "auto" and sc.num_workers == 1):
        if sc.num_workers > 1:
            raise ConfigError("scaling.trainer: 'direct' runs one worker; use 'ray_train' or 'auto' for "
                              f"num_workers={sc.num_workers}")
        # No silent re-execution: a retried task would train from epoch 0 again into the same MLflow run.
        task = ray.remote(train_direct).options(num_cpus=sc.cpus_per_worker, max_retries=0,
                                                  num_gpus=sc.gpus_per_worker if launch.use_gpu else 0)
        return ray.get(task.remote(launch))
    return fit_data_parallel(launch)




def execute(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None, *,
            artifact_name: str = "student", every_epoch: bool = True) -> RunResult:
    """Log one run in MLflow and train it on Ray, showing its epochs (`watch_epochs`: without a terminal, a line
    per epoch, or a first and last line when not `every_epoch`); the config is already checked and resolved."""
    import pandas as pd
    import ray

    started = time.perf_counter()
    assert cfg.tracking.uri is not None
    with store_errors(cfg.tracking.uri):  # the store stopped answering: one line, not a traceback
        tracker, experiment_id = start_run(cfg.tracking.uri, cfg.tracking.experiment, cfg.name,
                                           tags={**run_tags(cfg), "kdo.kind": artifact_name})
        status = "FAILED"
        try:
            tracker.log_params(run_params(cfg))
            tracker.log_text(cfg.to_yaml(), "config.yaml")
            log_datasets(tracker, dataset_inputs(cfg.data, splits))
            tracker.monitor_system(cfg.tracking.system_metrics_seconds)
            try:
                with watch_epochs(cfg.tracking.uri, tracker.run_id, cfg.name, cfg.training.epochs,
                                  every_epoch=every_epoch):
                    out = _launch(launch_for(cfg, splits, teacher, tracker.run_id, gpu=use_gpu(cfg),
                                             artifact_name=artifact_name))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.ActorDiedError) as err:  # the worker or its node died (killed, OOM): the run crashed
                out = LoopOutput(status="crashed", history=[], final={"reason": reason(err)})
            status = "FINISHED" if out.status == "finished" else "FAILED"
            if cfg.tracking.log_models and out.status == "finished" and artifact_name == "student":
                register_student(tracker, cfg.name)
            tracker.set_tags({"kdo.status": out.status})
        finally:
            tracker.finish(status)
    final = out.final
    return RunResult(
        name=cfg.name, status=out.status, val_acc=float(final.get("selected_val_acc", float("nan"))),
        test_acc=float(final.get("test_acc", float("nan"))), best_epoch=int(final.get("best_epoch", 0)),
        teacher_val_acc=final.get("teacher_val_acc"), teacher_test_acc=final.get("teacher_test_acc"),
        seconds=time.perf_counter() - started, history=pd.DataFrame(out.history), run_id=tracker.run_id,
        experiment_id=experiment_id, tracking_uri=cfg.tracking.uri, config=cfg, reason=str(final.get("reason", "")))

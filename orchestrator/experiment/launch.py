"""Launching one run on Ray: a direct Ray task for one worker, Ray Train's TorchTrainer for several (DDP),
and `execute`, which logs the run in MLflow around the launch and returns its `RunResult`. Ray is imported
inside the functions that use it: importing this module (every command does) costs no Ray start-up."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.loop import AfterEpoch, LoopOutput, iterate_epochs, train_loop
from orchestrator.experiment.progress import watch_epochs
from orchestrator.experiment.tracking import (
    Tracker,
    dataset_inputs,
    flatten,
    log_datasets,
    register_student,
    run_tags,
    start_run,
    store_errors,
    ui_hint,
)

if TYPE_CHECKING:
    import pandas as pd

TRAIN_POLL_SECONDS = "0.1"  # Ray Train's controller poll (its default 2 s is a floor on every epoch); a user's wins


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


def init_ray(address: str | None = None, *, verbose: bool = False) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start a local runtime; reuse a live one.

    Workers' output reaches the driver's console only when `verbose`: what the user sees (epochs, runs) the
    driver reads from MLflow, and a worker's traceback when Ray ends it at shutdown is no news."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ and token.is_file():
        # Ray 2.60 turns token auth on by itself only for address=None/"auto"; a `ray start` cluster
        # reached by host:port otherwise refuses the driver with an opaque ConnectionError.
        os.environ["RAY_AUTH_MODE"] = "token"
    ray.init(address=address, log_to_driver=verbose, configure_logging=True, logging_level="WARNING")


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


def worker_device(gpu: bool) -> torch.device:
    """The device this Ray worker trains on. A GPU Ray granted that torch cannot see (a logical GPU, a CPU build
    of torch, a broken driver) is one line naming what Ray gave the worker."""
    if not gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    import ray

    granted = ", ".join(f"{k} {v:g}" for k, v in sorted(ray.get_runtime_context().get_assigned_resources().items()))
    raise RuntimeError(f"scaling.use_gpu: Ray gave the worker on {socket.gethostname()} {granted or 'nothing'} "
                       f"(GPU ids {ray.get_gpu_ids()}), but torch {torch.__version__} finds no CUDA device there")


def one_line(err: BaseException) -> str:
    """An error as one short line, for a run's `kdo.reason` tag: its type and its first line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}"[:300] if text else type(err).__name__


def _train_direct(payload: dict[str, Any]) -> LoopOutput:
    """One worker: the loop runs in this Ray process itself (no TorchTrainer start-up cost)."""
    import ray

    cfg = ExperimentConfig.model_validate(payload["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = worker_device(payload["use_gpu"])
    tracker = Tracker(cfg.tracking.uri, payload["run_id"])
    teacher = ray.get(payload["teacher"]) if payload["teacher"] is not None else None
    return train_loop(cfg, ray.get(payload["data"]), teacher, device=device, tracker=tracker,
                      artifact_name=payload["artifact_name"], log=None)  # the driver shows the epochs


def _train_worker(payload: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel run. Rank 0 logs to MLflow (the epochs after `logged`) and, given
    `checkpoint_seconds`, reports the loop state as a checkpoint that far apart; every rank continues from
    `resume` when given."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(payload["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker, every = None, payload.get("checkpoint_seconds")
    if rank == 0:
        tracker = AfterEpoch(Tracker(cfg.tracking.uri, payload["run_id"]), payload.get("logged", 0))
        tracker.set_tags({"kdo.host": socket.gethostname(), "kdo.pid": str(os.getpid())})  # the process training
    teacher = ray.get(payload["teacher"]) if payload["teacher"] is not None else None
    resume = ray.get(payload["resume"]) if payload.get("resume") is not None else None
    epochs = iterate_epochs(cfg, ray.get(payload["data"]), teacher, rank=rank, world=world,
                            device=ray.train.torch.get_device(), tracker=tracker, wrap=ray.train.torch.prepare_model,
                            artifact_name=payload["artifact_name"], log=None, resume=resume,
                            snapshot_every=1 if rank == 0 and every is not None else 0)
    if rank == 0 and payload.get("scratch"):
        os.makedirs(payload["scratch"], exist_ok=True)
    saved = time.monotonic()
    for metrics in epochs:
        state = metrics.pop("loop_state", None)
        if state is None or time.monotonic() - saved < every:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory(dir=payload.get("scratch")) as folder:  # Train copies it to its storage
            torch.save(state, Path(folder) / f"seed-{cfg.training.seed}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        saved = time.monotonic()


def _launch(cfg: ExperimentConfig, payload: dict[str, Any]) -> LoopOutput:
    import ray

    gpu = payload["use_gpu"]
    sc = cfg.scaling
    if sc.trainer == "direct" or (sc.trainer == "auto" and sc.num_workers == 1):
        if sc.num_workers > 1:
            raise ConfigError("scaling.trainer: 'direct' runs one worker; use 'ray_train' or 'auto' for "
                              f"num_workers={sc.num_workers}")
        # No silent re-execution: a retried task would train from epoch 0 again into the same MLflow run.
        task = ray.remote(_train_direct).options(num_cpus=sc.cpus_per_worker, max_retries=0,
                                                  num_gpus=sc.gpus_per_worker if gpu else 0)
        return ray.get(task.remote(payload))

    return fit_data_parallel(cfg, payload)


def train_folder(storage: str, cfg: ExperimentConfig, run_id: str) -> str:
    """Where Ray Train keeps the state and checkpoints of the data-parallel run logged as MLflow run `run_id`."""
    return f"{storage}/{cfg.name}-{run_id[:8]}"


def fit_data_parallel(cfg: ExperimentConfig, payload: dict[str, Any], *, storage: str | None = None,
                      callbacks: list[Any] | None = None) -> LoopOutput:
    """The loop on `scaling.num_workers` DDP workers through Ray Train's TorchTrainer.

    In a sweep the trial passes Tune's `TuneReportCallback`, which forwards rank 0's per-epoch reports
    to Tune (ASHA sees every epoch), and the `storage` its checkpoints stay in until the sweep ends; Tune does
    not count these workers' CPUs, so the sweep budgets them. Without `storage` (`kdo run`) the run's folder
    is removed once it ends: a run that is never retried needs nothing of it.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Train's controller polls its workers every 2 s by default, and a worker's `ray.train.report` blocks until
    # the poll takes it (a queue of one): every epoch took at least 2 s. fit() hands the variable to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_SECONDS)
    sc, gpu = cfg.scaling, payload["use_gpu"]
    base = storage or cfg.tracking.storage_path
    folder = train_folder(base, cfg, payload["run_id"])
    local = "://" not in folder
    if local:
        payload = {**payload, "scratch": str(Path(folder) / ".kdo-scratch")}  # a killed worker leaves nothing in /tmp
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=Path(folder).name, storage_path=base, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    finally:
        if storage is None and local:
            shutil.rmtree(folder, ignore_errors=True)
    history = _history(cfg.tracking.uri or "", payload["run_id"])
    return LoopOutput(status=history[-1]["status"], history=history, final=history[-1])


def _history(uri: str, run_id: str) -> list[dict[str, Any]]:
    """The epochs rank 0 logged to the run, one row per epoch (Ray Train's own table holds only the reports
    that came with a checkpoint)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    rows: dict[int, dict[str, Any]] = {}
    for key in (k for k in run.data.metrics if not k.startswith("system/")):  # MLflow's own steps are not epochs
        for m in client.get_metric_history(run_id, key):
            if m.step >= 1:
                rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    history = [rows[step] for step in sorted(rows)] or [{"epoch": 0}]
    history[-1]["status"] = run.data.tags.get("kdo.status", "crashed")
    return history


def payload(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None, run_id: str, *,
            gpu: bool, artifact_name: str = "student") -> dict[str, Any]:
    """What a Ray process needs to train one run: the config, data and teacher in the object store, the run id."""
    import ray

    return {"config": cfg.model_dump(mode="json"), "data": ray.put(splits),
            "teacher": ray.put(teacher) if teacher is not None else None,
            "run_id": run_id, "artifact_name": artifact_name, "use_gpu": gpu}


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
            tracker.log_params(flatten(cfg.model_dump(mode="json")))
            tracker.log_text(cfg.to_yaml(), "config.yaml")
            log_datasets(tracker, dataset_inputs(cfg.data, splits))
            tracker.monitor_system(cfg.tracking.system_metrics_seconds)
            try:
                with watch_epochs(cfg.tracking.uri, tracker.run_id, cfg.name, cfg.training.epochs,
                                  every_epoch=every_epoch):
                    out = _launch(cfg, payload(cfg, splits, teacher, tracker.run_id, gpu=use_gpu(cfg),
                                               artifact_name=artifact_name))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.ActorDiedError) as err:  # the worker or its node died (killed, OOM): the run crashed
                out = LoopOutput(status="crashed", history=[], final={"reason": one_line(err)})
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

"""What runs in Ray's workers: the record of one run to train (`Launch`), its loop in one Ray task (one worker),
or on `scaling.num_workers` DDP workers through Ray Train's TorchTrainer (rank 0's MLflow log and loop-state
checkpoints; the run's history read back from MLflow)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.loop import LoopOutput, iterate_epochs, train_loop
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.tracking import AfterEpoch, Tracker

TRAIN_POLL_SECONDS = "0.1"  # Ray Train's controller poll (its default 2 s is a floor on every epoch); a user's wins


@dataclass(frozen=True)
class Launch:
    """What a Ray process needs to train one run: its checked config (pickled as it is: a worker validates
    nothing again), the data and the teacher in Ray's object store, its MLflow run, the GPU decision; for a
    continued attempt, the loop state to resume (in the object store), the epochs its run has logged already, and
    how far apart a data-parallel run checkpoints (None: never)."""

    config: ExperimentConfig
    data: Any  # ray.ObjectRef of `Splits`
    teacher: Any  # ray.ObjectRef of the teacher checkpoint, or None
    run_id: str
    use_gpu: bool
    artifact_name: str = "student"
    resume: Any = None  # ray.ObjectRef of a loop state, or None
    logged: int = 0
    checkpoint_seconds: float | None = None


def launch_for(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None, run_id: str, *, gpu: bool,
               artifact_name: str = "student") -> Launch:
    """The `Launch` of a new run: the data and teacher put in Ray's object store."""
    import ray

    return Launch(cfg, ray.put(splits), ray.put(teacher) if teacher is not None else None, run_id, gpu,
                  artifact_name)


def train_direct(launch: Launch) -> LoopOutput:
    """One worker: the loop runs in this Ray process itself (no TorchTrainer start-up cost)."""
    import ray

    cfg = launch.config
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = worker_device(launch.use_gpu)
    tracker = Tracker(cfg.tracking.uri or "", launch.run_id)
    teacher = ray.get(launch.teacher) if launch.teacher is not None else None
    return train_loop(cfg, ray.get(launch.data), teacher, device=device, tracker=tracker,
                      artifact_name=launch.artifact_name, log=None)  # the driver shows the epochs


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


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel run (`config["launch"]`, its `Launch`; `config["scratch"]`, where
    rank 0 writes a checkpoint before Train copies it). Rank 0 logs to MLflow (the epochs after `logged`) and,
    given `checkpoint_seconds`, reports the loop state as a checkpoint that far apart; every rank continues from
    `resume` when given."""
    import ray.train
    import ray.train.torch

    launch: Launch = config["launch"]
    cfg, scratch = launch.config, config.get("scratch")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker, every = None, launch.checkpoint_seconds
    if rank == 0:
        tracker = AfterEpoch(Tracker(cfg.tracking.uri or "", launch.run_id), launch.logged)
        tracker.set_tags({"kdo.host": socket.gethostname(), "kdo.pid": str(os.getpid())})  # the process training
    teacher = ray.get(launch.teacher) if launch.teacher is not None else None
    resume = ray.get(launch.resume) if launch.resume is not None else None
    epochs = iterate_epochs(cfg, ray.get(launch.data), teacher, rank=rank, world=world,
                            device=ray.train.torch.get_device(), tracker=tracker, wrap=ray.train.torch.prepare_model,
                            artifact_name=launch.artifact_name, log=None, resume=resume,
                            snapshot_every=1 if rank == 0 and every is not None else 0)
    if rank == 0 and scratch:
        os.makedirs(scratch, exist_ok=True)
    saved = time.monotonic()
    for metrics in epochs:
        state = metrics.pop("loop_state", None)
        if state is None or time.monotonic() - saved < every:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory(dir=scratch) as folder:  # Train copies it to its storage
            torch.save(state, Path(folder) / f"seed-{cfg.training.seed}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        saved = time.monotonic()


def train_folder(storage: str, cfg: ExperimentConfig, run_id: str) -> str:
    """Where Ray Train keeps the state and checkpoints of the data-parallel run logged as MLflow run `run_id`."""
    return f"{storage}/{cfg.name}-{run_id[:8]}"


def fit_data_parallel(launch: Launch, *, storage: str | None = None, callbacks: list[Any] | None = None,
                      ) -> LoopOutput:
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
    cfg = launch.config
    sc, gpu = cfg.scaling, launch.use_gpu
    base = storage or cfg.tracking.storage_path
    folder = train_folder(base, cfg, launch.run_id)
    local = "://" not in folder
    config = {"launch": launch, "scratch": str(Path(folder) / ".kdo-scratch") if local else None}  # a killed
    # worker leaves nothing in /tmp
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=Path(folder).name, storage_path=base, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    finally:
        if storage is None and local:
            shutil.rmtree(folder, ignore_errors=True)
    history = _history(cfg.tracking.uri or "", launch.run_id)
    return LoopOutput(status=history[-1]["status"], history=history, final=history[-1])


def _history(uri: str, run_id: str) -> list[dict[str, Any]]:
    """The epochs rank 0 logged to the run, one row per epoch (Ray Train's own table holds only the reports
    that came with a checkpoint)."""
    client = mlflow_client(uri)
    run = client.get_run(run_id)
    rows: dict[int, dict[str, Any]] = {}
    for key in (k for k in run.data.metrics if not k.startswith("system/")):  # MLflow's own steps are not epochs
        for m in client.get_metric_history(run_id, key):
            if m.step >= 1:
                rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    history = [rows[step] for step in sorted(rows)] or [{"epoch": 0}]
    history[-1]["status"] = run.data.tags.get("kdo.status", "crashed")
    return history



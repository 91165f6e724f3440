"""`run(config) -> RunResult`: validate, resolve the teacher, launch the loop on Ray, log to MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from filelock import FileLock

from methods import get_method
from orchestrator.checkpoints import build_from_checkpoint, check_compatible, load_checkpoint
from orchestrator.config import ExperimentConfig, NetworkConfig, check_method_setup, load_config, resolve_paths
from orchestrator.data import Splits, load_splits
from orchestrator.errors import ConfigError
from orchestrator.loop import LoopOutput, build_student, train_loop
from orchestrator.tracking import Tracker, flatten, start_run, ui_hint


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

    def ui_hint(self) -> str:
        return ui_hint(self.tracking_uri, self.experiment_id)


def init_ray(address: str | None = None) -> None:
    """Connect to `address` (or $RAY_ADDRESS), else start a local runtime; reuse a live one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if address not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ and token.is_file():
        # Ray 2.60 turns token auth on by itself only for address=None/"auto"; a `ray start` cluster
        # reached by host:port otherwise refuses the driver with an opaque ConnectionError.
        os.environ["RAY_AUTH_MODE"] = "token"
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")


def use_gpu(cfg: ExperimentConfig) -> bool:
    """`scaling.use_gpu`, with `auto` meaning: the Ray cluster has GPUs."""
    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def _train_direct(payload: dict[str, Any]) -> LoopOutput:
    """One worker: the loop runs in this Ray process itself (no TorchTrainer start-up cost)."""
    cfg = ExperimentConfig.model_validate(payload["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = torch.device("cuda" if payload["use_gpu"] else "cpu")
    tracker = Tracker(cfg.tracking.uri, payload["run_id"])
    teacher = ray.get(payload["teacher"]) if payload["teacher"] is not None else None
    return train_loop(cfg, ray.get(payload["data"]), teacher, device=device, tracker=tracker,
                      artifact_name=payload["artifact_name"])


def _train_worker(payload: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel run; rank 0 logs to MLflow and reports checkpoints."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(payload["config"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = Tracker(cfg.tracking.uri, payload["run_id"]) if rank == 0 else None

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    teacher = ray.get(payload["teacher"]) if payload["teacher"] is not None else None
    train_loop(cfg, ray.get(payload["data"]), teacher, rank=rank, world=world,
               device=ray.train.torch.get_device(), report=report, tracker=tracker,
               wrap=ray.train.torch.prepare_model, artifact_name=payload["artifact_name"])


def _launch(cfg: ExperimentConfig, payload: dict[str, Any]) -> LoopOutput:
    gpu = payload["use_gpu"]
    sc = cfg.scaling
    if sc.trainer == "direct" or (sc.trainer == "auto" and sc.num_workers == 1):
        if sc.num_workers > 1:
            raise ConfigError("scaling.trainer: 'direct' runs one worker; use 'ray_train' or 'auto' for "
                              f"num_workers={sc.num_workers}")
        task = ray.remote(_train_direct).options(num_cpus=sc.cpus_per_worker,
                                                  num_gpus=sc.gpus_per_worker if gpu else 0)
        return ray.get(task.remote(payload))

    return fit_data_parallel(cfg, payload)


def fit_data_parallel(cfg: ExperimentConfig, payload: dict[str, Any], callbacks: list[Any] | None = None) -> LoopOutput:
    """The loop on `scaling.num_workers` DDP workers through Ray Train's TorchTrainer.

    In a sweep the trial passes Tune's `TuneReportCallback`, which forwards rank 0's per-epoch reports
    to Tune (ASHA sees every epoch); Tune does not count these workers' CPUs, so the sweep budgets them.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc, gpu = cfg.scaling, payload["use_gpu"]
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"{cfg.name}-{payload['run_id'][:8]}", storage_path=cfg.tracking.storage_path,
                             callbacks=callbacks),
    )
    result = trainer.fit()
    rows = result.metrics_dataframe.to_dict("records")
    history = [{k: v for k, v in row.items() if k in rows[-1] and not k.startswith(("_", "training_"))
                and k not in ("timestamp", "checkpoint_dir_name")} for row in rows]
    return LoopOutput(status=str(history[-1].get("status", "finished")), history=history, final=history[-1])


def _teacher_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The `ce` experiment that trains a described teacher on the student's data."""
    assert cfg.teacher is not None and cfg.teacher.architecture is not None
    raw = cfg.model_dump(mode="json")
    raw.update(name=f"teacher-{teacher_key(cfg)}", teacher=None, method={"name": "ce", "params": {}},
               student=NetworkConfig(architecture=cfg.teacher.architecture, args=cfg.teacher.args).model_dump(),
               training=cfg.teacher.training.model_dump(mode="json"))
    raw["data"]["batch_size"] = cfg.teacher.batch_size
    return ExperimentConfig.model_validate(raw)


def teacher_key(cfg: ExperimentConfig) -> str:
    """Cache key of a described teacher: everything that changes its weights, nothing else."""
    assert cfg.teacher is not None
    data = cfg.data.model_dump(mode="json")
    data.pop("data_dir")
    data.pop("download")
    data["batch_size"] = cfg.teacher.batch_size
    teacher = cfg.teacher.model_dump(mode="json", include={"architecture", "args", "training"})
    blob = json.dumps({"data": data, "teacher": teacher}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _resolve_checkpoint(cfg: ExperimentConfig, splits: Splits) -> dict[str, Any] | None:
    """Load and check a given teacher checkpoint (file or MLflow URI) before any cluster work."""
    if cfg.teacher is None or cfg.teacher.checkpoint is None:
        return None
    source = cfg.teacher.checkpoint
    if source.startswith("runs:/"):
        source = str(_download_teacher(cfg, source))
    ckpt = load_checkpoint(source)
    info = splits.info
    check_compatible(ckpt, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    teacher = build_from_checkpoint(ckpt)  # tensors that do not fit the architecture fail here, not on a worker
    try:
        check_method_setup(cfg, build_student(cfg, splits), teacher)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ckpt


def _download_teacher(cfg: ExperimentConfig, uri: str) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    tracking = cfg.tracking.uri or ""
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"teacher.checkpoint: {uri} names an MLflow run but the store {tracking} does not exist")
    assert cfg.teacher is not None
    dest = Path(cfg.teacher.cache_dir) / "mlflow" / uri.removeprefix("runs:/").replace("/", "_")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking)
    except MlflowException as err:
        raise ConfigError(f"teacher.checkpoint: cannot fetch {uri} from {tracking}: "
                          f"{str(err).splitlines()[0][:200]}") from None
    found = sorted(Path(local).rglob("*.pt")) if Path(local).is_dir() else [Path(local)]
    if not found:
        raise ConfigError(f"teacher.checkpoint: {uri} holds no .pt checkpoint")
    return found[0]


def ensure_teacher(cfg: ExperimentConfig, splits: Splits, *, force: bool = False) -> tuple[dict[str, Any], Path]:
    """Train a described teacher once per cache key; concurrent callers wait on a file lock."""
    assert cfg.teacher is not None
    key = teacher_key(cfg)
    folder = Path(cfg.teacher.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    with FileLock(str(folder / f"{key}.lock")):
        if force or not path.is_file():
            teacher_run = _execute(_teacher_config(cfg), splits, None, artifact_name="teacher")
            if teacher_run.status != "finished":
                raise RuntimeError(f"teacher training {teacher_run.status} (MLflow run {teacher_run.run_id})")
            _fetch_artifact(cfg.tracking.uri or "", teacher_run.run_id, "teacher/teacher.pt", path)
    return load_checkpoint(path, "teacher cache"), path


def _fetch_artifact(uri: str, run_id: str, artifact: str, dest: Path) -> None:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, tracking_uri=uri,
                                                dst_path=str(dest.parent / f".{run_id}"))
    os.replace(local, dest)


def _execute(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None, *,
             artifact_name: str = "student", tags: dict[str, Any] | None = None,
             parent_run_id: str | None = None) -> RunResult:
    """Log one run in MLflow and train it on Ray; the config is already validated and resolved."""
    started = time.perf_counter()
    assert cfg.tracking.uri is not None
    tracker, experiment_id = start_run(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.name, parent_run_id=parent_run_id,
        tags={"kdo.method": cfg.method.name, "kdo.dataset": cfg.data.name,
              "kdo.student": cfg.student.architecture, "kdo.seed": cfg.training.seed,
              "kdo.teacher": _teacher_label(cfg), "kdo.kind": artifact_name,
              "kdo.data_free": str(get_method(cfg.method.name).data_free).lower(), **(tags or {})})
    status = "FAILED"
    try:
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        tracker.log_text(cfg.to_yaml(), "config.yaml")
        payload = {"config": cfg.model_dump(mode="json"), "data": ray.put(splits),
                   "teacher": ray.put(teacher) if teacher is not None else None,
                   "run_id": tracker.run_id, "artifact_name": artifact_name, "use_gpu": use_gpu(cfg)}
        out = _launch(cfg, payload)
        status = "FINISHED" if out.status == "finished" else "FAILED"
    finally:
        tracker.finish(status)
    final = out.final
    return RunResult(
        name=cfg.name, status=out.status, val_acc=float(final.get("selected_val_acc", float("nan"))),
        test_acc=float(final.get("test_acc", float("nan"))), best_epoch=int(final.get("best_epoch", 0)),
        teacher_val_acc=final.get("teacher_val_acc"), teacher_test_acc=final.get("teacher_test_acc"),
        seconds=time.perf_counter() - started, history=pd.DataFrame(out.history), run_id=tracker.run_id,
        experiment_id=experiment_id, tracking_uri=cfg.tracking.uri, config=cfg)


def _teacher_label(cfg: ExperimentConfig) -> str:
    if cfg.teacher is None:
        return "none"
    return cfg.teacher.checkpoint or f"{cfg.teacher.architecture} (trained, key {teacher_key(cfg)})"


@dataclass
class Prepared:
    """A validated, path-resolved config with its data and teacher, ready to launch."""

    config: ExperimentConfig
    splits: Splits
    teacher: dict[str, Any] | None


def prepare(config: str | Path | dict[str, Any] | ExperimentConfig, overrides: list[str] | None = None,
            *, address: str | None = None) -> Prepared:
    """Everything that can fail on user input fails here, before Ray or MLflow are touched;
    then Ray starts and a described teacher is trained or taken from the cache."""
    cfg = resolve_paths(load_config(config, overrides or []))
    splits = load_splits(cfg.data)
    teacher = _resolve_checkpoint(cfg, splits)
    init_ray(address)
    if cfg.teacher is not None and cfg.teacher.architecture is not None:
        teacher, _ = ensure_teacher(cfg, splits)
    return Prepared(cfg, splits, teacher)


def run(config: str | Path | dict[str, Any] | ExperimentConfig, overrides: list[str] | None = None,
        *, address: str | None = None) -> RunResult:
    """Run one experiment (a YAML path, a shipped config name, a dict or an `ExperimentConfig`)."""
    p = prepare(config, overrides, address=address)
    return _execute(p.config, p.splits, p.teacher)

"""The teacher cache: a described teacher is trained once per cache key (`config.teacher_key`) under a file
lock, logged as its own MLflow run and kept as a checkpoint file; checkpoint teachers are read from a file or
downloaded from an MLflow `runs:/` URI and checked against the data and the method before any work starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from orchestrator.errors import ConfigError
from orchestrator.experiment.checkpoints import (
    build_from_checkpoint,
    check_compatible,
    load_checkpoint,
    weights_checkpoint,
)
from orchestrator.experiment.config import (
    ExperimentConfig,
    NetworkConfig,
    check_method_setup,
    teacher_key,
)
from orchestrator.experiment.data import Splits, dataset_info
from orchestrator.experiment.launch import execute
from orchestrator.experiment.model_registry import register_checkpoint
from orchestrator.experiment.network_checks import checked_network
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import mask_uri


def teacher_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The `ce` experiment that trains a described teacher on the student's data (as `teacher.data` changes it)."""
    assert cfg.teacher is not None and cfg.teacher.architecture is not None
    raw = cfg.model_dump(mode="json")
    raw.update(name=f"teacher-{teacher_key(cfg)}", teacher=None, method={"name": "ce", "params": {}},
               student=NetworkConfig(architecture=cfg.teacher.architecture, args=cfg.teacher.args,
                                     features=cfg.teacher.features).model_dump(),
               training=cfg.teacher.training.model_dump(mode="json"))
    raw["data"]["batch_size"] = cfg.teacher.batch_size
    if cfg.teacher.data.augment is not None:
        raw["data"]["augment"] = cfg.teacher.data.augment
    return ExperimentConfig.model_validate(raw)


def check_teacher_checkpoint(cfg: ExperimentConfig, loaded: dict[str, dict[str, Any]] | None = None
                             ) -> dict[str, Any] | None:
    """Load and check a given teacher checkpoint (file, MLflow `runs:/` or `models:/` URI) against the data's shape
    and the method; None for a described teacher. `loaded` caches checkpoints by source across a design's points."""
    if cfg.teacher is None or (cfg.teacher.checkpoint is None and cfg.teacher.weights is None):
        return None
    source = cfg.teacher.checkpoint or f"weights:{cfg.teacher.weights.path}"  # type: ignore[union-attr]
    info = dataset_info(cfg.data)
    size = cfg.data.image_size or info.image_size
    if loaded is not None and source in loaded:  # loaded and built once already: its architecture is what counts
        ckpt = loaded[source]
        teacher = checked_network(ckpt["architecture"], ckpt["args"], ckpt.get("features"),
                                  num_classes=ckpt["num_classes"],
                                  in_channels=ckpt["in_channels"], image_size=ckpt["image_size"])
    elif cfg.teacher.weights is not None:
        ckpt = weights_checkpoint(cfg.teacher.weights, num_classes=info.num_classes, in_channels=info.channels,
                                  image_size=size)
        teacher = build_from_checkpoint(ckpt, "teacher.weights")
    else:
        path = str(_download_teacher(cfg, source)) if source.startswith(("runs:/", "models:/")) else source
        ckpt = load_checkpoint(path)
        check_compatible(ckpt, num_classes=info.num_classes, in_channels=info.channels, image_size=size)
        teacher = build_from_checkpoint(ckpt)  # tensors that do not fit the architecture fail here, not on a worker
    if loaded is not None:
        loaded[source] = ckpt
        if loaded is not None:
            loaded[source] = ckpt
    student = checked_network(cfg.student.architecture, cfg.student.args, cfg.student.features,
                              num_classes=info.num_classes,
                              in_channels=info.channels, image_size=size)
    try:
        check_method_setup(cfg, student, teacher)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ckpt


def _download_teacher(cfg: ExperimentConfig, uri: str) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    tracking = cfg.tracking.uri or ""
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"teacher.checkpoint: {uri} names an MLflow run but the store {mask_uri(tracking)} does "
                          "not exist")
    assert cfg.teacher is not None
    if uri.startswith("models:/"):  # a registered version: its source is the teacher run's `teacher/` folder
        uri = _model_source(tracking, uri)
    dest = Path(cfg.teacher.cache_dir) / "mlflow" / uri.removeprefix("runs:/").replace("/", "_")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking)
    except MlflowException as err:
        raise ConfigError(mask_uri(f"teacher.checkpoint: cannot fetch {uri} from {tracking}: "
                                   f"{str(err).splitlines()[0][:200]}")) from None
    found = sorted(Path(local).rglob("*.pt")) if Path(local).is_dir() else [Path(local)]
    if not found:
        raise ConfigError(f"teacher.checkpoint: {uri} holds no .pt checkpoint")
    return found[0]


def _model_source(tracking: str, uri: str) -> str:
    """The `runs:/` source of a registered model version, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    from mlflow.exceptions import MlflowException
    client = mlflow_client(tracking, registry=True)
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        raise ConfigError(mask_uri(f"teacher.checkpoint: no model version {uri} in {tracking}: "
                                   f"{str(err).splitlines()[0][:200]}")) from None
    if not version.source.startswith("runs:/"):
        raise ConfigError(f"teacher.checkpoint: {uri} is not a kdo teacher (its source is {version.source})")
    return version.source


def register_teacher(tracking: str, run_id: str, key: str) -> str:
    """Register a trained teacher in MLflow's model registry: a version of `kdo-teacher-<key>` (its cache key) whose
    files are kdo's own checkpoint, the run's `teacher/` artifact (state_dict plus config; it loads back as kdo's
    class, feature outputs included). Tags the run with the version's URI and returns it: `teacher.checkpoint:
    models:/kdo-teacher-<key>/<version>` works wherever a path does."""
    model = register_checkpoint(tracking, run_id, f"kdo-teacher-{key}", "teacher",
                                f"kdo teacher checkpoints of cache key {key}")
    mlflow_client(tracking).set_tag(run_id, "kdo.model", model)
    return model


def registered_teacher(tracking: str, key: str) -> str | None:
    """The newest registered version of the teacher with cache key `key`, as a `models:/` URI (None if none)."""
    versions = mlflow_client(tracking, registry=True).search_model_versions(f"name = 'kdo-teacher-{key}'")
    return f"models:/kdo-teacher-{key}/{max(int(v.version) for v in versions)}" if versions else None


def ensure_teacher(cfg: ExperimentConfig, splits: Splits, *, force: bool = False) -> tuple[dict[str, Any], Path]:
    """Train a described teacher once per cache key; concurrent callers wait on a file lock."""
    assert cfg.teacher is not None
    key = teacher_key(cfg)
    folder = Path(cfg.teacher.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    with FileLock(str(folder / f"{key}.lock")):
        if force or not path.is_file():
            teacher_run = execute(teacher_config(cfg), splits, None, artifact_name="teacher", every_epoch=False)
            if teacher_run.status != "finished":
                raise RuntimeError(f"teacher training {teacher_run.status} (MLflow run {teacher_run.run_id})")
            _fetch_artifact(cfg.tracking.uri or "", teacher_run.run_id, "teacher/teacher.pt", path)
            register_teacher(cfg.tracking.uri or "", teacher_run.run_id, key)
    return load_checkpoint(path, "teacher cache"), path


def _fetch_artifact(uri: str, run_id: str, artifact: str, dest: Path) -> None:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, tracking_uri=uri,
                                                dst_path=str(dest.parent / f".{run_id}"))
    os.replace(local, dest)

"""`ExperimentConfig`: the typed, bounded description of one experiment, loaded from YAML or a dict."""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from methods import get_method, list_methods
from methods.networks import list_networks
from methods.plugins import load_plugins, merged
from orchestrator.errors import ConfigError, check_name, format_validation_error
from orchestrator.experiment.config_files import (
    absolute_uri,
    apply_overrides,
    default_tracking_uri,
    import_named_plugins,
    plugins_named,
    read_yaml,
)
from orchestrator.experiment.data import DataConfig, dataset_info
from orchestrator.experiment.network_checks import checked_network

MAX_SEED = 2**31 - 1  # every seed torch, numpy and CUDA accept
MAX_GROUP = 64  # the most runs one trial trains as a group (`group_size`)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NetworkConfig(_Strict):
    architecture: str
    args: dict[str, Any] = {}
    features: list[str] | None = Field(None, description="layers of a plain nn.Module network whose outputs are its "
                                       "features (forward hooks), the last one the penultimate; zoo networks name "
                                       "their own")


class TrainingConfig(_Strict):
    epochs: int = Field(20, ge=1, le=100_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    schedule: Literal["constant", "step", "cosine", "multistep"] = "cosine"
    step_size: int = Field(30, ge=1, description="epochs between decays for schedule=step")
    milestones: list[int] = Field([], description="epochs at which schedule=multistep decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Literal["fp32", "bf16"] = "fp32"
    selection: Literal["best", "last"] = Field(
        "best", description="which epoch's student is tested: best val_acc or the last"
    )
    channels_last: bool = False
    compile: bool = False


class TeacherDataConfig(_Strict):
    """How a described teacher sees the student's data; None inherits the student's `data` setting."""

    augment: bool | None = Field(None, description="crop (and flip) while training the teacher; None: data.augment")


class TeacherWeights(_Strict):
    """A pretrained teacher of your own: a plain `state_dict` file (`torch.save(model.state_dict(), path)`, read with
    weights_only) for a registered architecture built with `args` (and `features`)."""

    path: str
    architecture: str
    args: dict[str, Any] = {}
    features: list[str] | None = None


class TeacherConfig(_Strict):
    """A teacher is a checkpoint (file path, MLflow `runs:/<id>/teacher` or `models:/<name>/<version>`) or a
    description to train."""

    checkpoint: str | None = None
    weights: TeacherWeights | None = None
    architecture: str | None = None
    args: dict[str, Any] = {}
    features: list[str] | None = Field(None, description="a described teacher's feature layers (see student.features)")
    training: TrainingConfig = TrainingConfig(epochs=30)
    batch_size: int = Field(128, ge=1, le=65536, description="the teacher's own training batch size")
    data: TeacherDataConfig = TeacherDataConfig()
    cache_dir: str = ".kdo/teachers"

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if sum(s is not None for s in (self.checkpoint, self.weights, self.architecture)) != 1:
            raise ValueError("teacher: give exactly one of teacher.checkpoint (kdo's checkpoint, runs:/ or models:/), "
                             "teacher.weights (your state_dict file) or teacher.architecture (trained here)")
        return self


class MethodConfig(_Strict):
    name: str = "kd"
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _validate_params(self) -> MethodConfig:
        try:
            method = get_method(self.name)
        except KeyError:
            raise ValueError(
                f"method.name: unknown method '{self.name}'; allowed: {', '.join(list_methods())}") from None
        try:
            schema = method.Params.model_validate(self.params)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, "method.params", method.Params)) from None
        self.params = schema.model_dump()
        return self


class ScalingConfig(_Strict):
    num_workers: int = Field(1, ge=1, le=4096)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0.0, le=1024)
    gpus_per_worker: float = Field(1.0, ge=0.0, le=64)
    trainer: Literal["auto", "direct", "ray_train"] = Field(
        "auto",
        description="auto: run one worker directly in its Ray process, several through Ray Train's TorchTrainer",
    )


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db")
    experiment: str = Field("kdo", description="the MLflow experiment (a name: see `errors.check_name`)")
    storage_path: str = Field("kdo_runs", description="where Ray Train/Tune keep run state and checkpoints")
    system_metrics_seconds: float = Field(10.0, ge=0.0, le=3600.0, description="seconds between MLflow system "
                                          "metrics samples (CPU, memory, GPU where present) on every run; 0: off")
    log_models: bool = Field(False, description="register every finished run's student in MLflow's model registry "
                             "(kdo-student-<run name>); off: only a sweep's or study's best")

    @field_validator("experiment")
    @classmethod
    def _named(cls, experiment: str) -> str:
        return check_name(experiment, "tracking.experiment")


def check_method_setup(cfg: ExperimentConfig, student: Any, teacher: Any) -> None:
    """The method's own check of the networks and scaling it is given (raises ValueError, one line)."""
    method = get_method(cfg.method.name)
    method.check_setup(method.Params.model_validate(cfg.method.params), student=student,
                       teacher=teacher if method.needs_teacher else None, num_workers=cfg.scaling.num_workers)


class ExperimentConfig(_Strict):
    name: str = Field("experiment", min_length=1)
    data: DataConfig = DataConfig()
    student: NetworkConfig
    teacher: TeacherConfig | None = None
    method: MethodConfig = MethodConfig()
    training: TrainingConfig = TrainingConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    plugins: list[str] = Field([], description="user code imported before the rest is read, in the driver and in "
                               "every Ray process: module names, or paths to a .py file or a package folder")

    @model_validator(mode="before")
    @classmethod
    def _import(cls, raw: Any) -> Any:
        """Plugins are imported before any field is read: they register the methods, networks and datasets named."""
        return import_named_plugins(raw)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        """A config unpickled (a Ray task, trial or Train worker receives it) imports the user code it names first:
        the one place every Ray process that trains a config loads its plugins."""
        super().__setstate__(state)
        load_plugins(self.plugins)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if get_method(self.method.name).needs_teacher and self.teacher is None:
            raise ValueError(f"teacher: required by method '{self.method.name}' (give teacher.checkpoint or "
                             "teacher.architecture)")
        info = dataset_info(self.data)
        size = self.data.image_size or info.image_size
        nets = [("student", self.student)]
        if self.teacher is not None and self.teacher.architecture is not None:
            nets.append(("teacher", NetworkConfig(architecture=self.teacher.architecture, args=self.teacher.args,
                                                  features=self.teacher.features)))
        built = {}
        for where, net in nets:
            if net.architecture not in list_networks() and not net.architecture.startswith("wrn_"):
                raise ValueError(f"{where}.architecture: unknown architecture '{net.architecture}'; "
                                 f"allowed: {', '.join(list_networks())}")
            try:
                built[where] = checked_network(net.architecture, net.args, net.features, num_classes=info.num_classes,
                                               in_channels=info.channels, image_size=size)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where}: {err}") from None
            except (RuntimeError, MemoryError, OverflowError) as err:  # e.g. weights too large to allocate
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                raise ValueError(f"{where}.args: cannot build '{net.architecture}' with {net.args}: {first}") from None
        if self.teacher is None or "teacher" in built:  # a checkpoint or weights teacher is checked when loaded
            check_method_setup(self, built["student"], built.get("teacher"))
        trained = [("training", self.training)]
        if self.teacher is not None and self.teacher.architecture is not None:
            trained.append(("teacher.training", self.teacher.training))
        for where, training in trained:
            if self.data.val_fraction == 0 and training.selection != "last":
                raise ValueError(f"data.val_fraction: 0 leaves no validation split, so {where}.selection must be "
                                 f"'last' (got '{training.selection}'); allowed: val_fraction > 0, or selection last")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def require_validation(cfg: ExperimentConfig, what: str) -> None:
    """Sweeps and studies select on val_acc: refuse a config without a validation split (one line)."""
    if cfg.data.val_fraction == 0:
        raise ConfigError(f"data.val_fraction: 0 leaves no validation split, which a {what} selects on (val_acc); "
                          "allowed: 0 < val_fraction < 0.5 (0 only for `kdo run` and `kdo teacher train`)")


def teacher_key(cfg: ExperimentConfig) -> str:
    """Cache key of a described teacher: everything that changes its weights, nothing else. `teacher.data` enters
    only through the data the teacher sees, so a config that leaves it unset keeps its key (and its cache)."""
    assert cfg.teacher is not None
    data = cfg.data.model_dump(mode="json")
    data.pop("data_dir")
    data.pop("download")
    data["batch_size"] = cfg.teacher.batch_size
    if cfg.teacher.data.augment is not None:
        data["augment"] = cfg.teacher.data.augment
    teacher = cfg.teacher.model_dump(mode="json", include={"architecture", "args", "training"})
    blob = json.dumps({"data": data, "teacher": teacher}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def teacher_label(cfg: ExperimentConfig) -> str:
    """How a run's teacher is named in its tags: the checkpoint, or the described architecture and its key."""
    if cfg.teacher is None:
        return "none"
    if cfg.teacher.weights is not None:
        return f"{cfg.teacher.weights.architecture} (weights {cfg.teacher.weights.path})"
    return cfg.teacher.checkpoint or f"{cfg.teacher.architecture} (trained, key {teacher_key(cfg)})"



def load_config(source: str | Path | dict[str, Any] | ExperimentConfig,
                overrides: typing.Iterable[str] = (), plugins: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Build a validated `ExperimentConfig` from a path, a shipped name, a dict or a config; `plugins` join the ones
    it names (a file's relative plugin paths are read beside it)."""
    beside = None
    if isinstance(source, ExperimentConfig):
        raw = source.model_dump(mode="json")
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # a deep copy the overrides may change
    else:
        raw = read_yaml(source)
        beside = Path(source).parent if Path(source).is_file() else None
    raw = apply_overrides(raw, overrides)
    raw["plugins"] = merged(plugins_named(raw, "", beside), plugins)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "", ExperimentConfig)) from None



def resolve_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy with every path and URI absolute, resolved in the driver's working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = absolute_uri(cfg.tracking.uri or default_tracking_uri())
    if "://" not in cfg.tracking.storage_path:  # s3://, gs://, ...: Ray's own storage, passed through
        cfg.tracking.storage_path = str(Path(cfg.tracking.storage_path).expanduser().resolve())
    cfg.data.data_dir = str(Path(cfg.data.data_dir).expanduser().resolve())
    if cfg.teacher is not None:
        cfg.teacher.cache_dir = str(Path(cfg.teacher.cache_dir).expanduser().resolve())
        if cfg.teacher.checkpoint is not None:
            cfg.teacher.checkpoint = absolute_uri(cfg.teacher.checkpoint)
        if cfg.teacher.weights is not None:
            cfg.teacher.weights.path = str(Path(cfg.teacher.weights.path).expanduser().resolve())
    return cfg

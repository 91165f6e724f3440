"""MLflow logging by run id, so the driver and any Ray worker can write to the same run. MLflow is imported
when a run is first written: a config error never pays for it."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from methods import get_method
from orchestrator.experiment.config import ExperimentConfig, teacher_label
from orchestrator.experiment.store import client, mask_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.experiment.data import DataConfig, Splits

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]

@functools.cache
def source_tags() -> dict[str, str]:
    """This process's source tags by MLflow's own context resolution (`mlflow.source.name`/`type`, `mlflow.user`,
    the git commit, branch and repo URL); where the entry script lies outside a checkout (the `kdo` console script
    in a venv), MLflow's git utilities are asked about kdo's own folder. A driver resolves them once and hands them
    to the children its Ray workers start (a worker's own script is not the source)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    tags = {k: str(v) for k, v in resolve_tags().items()}
    if MLFLOW_GIT_COMMIT not in tags:
        for key, read in ((MLFLOW_GIT_COMMIT, git_utils.get_git_commit), (MLFLOW_GIT_BRANCH, git_utils.get_git_branch),
                          (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url)):
            value = read(str(_PACKAGE_ROOT))
            if value:
                tags[key] = value
    return tags


def dataset_inputs(data: DataConfig, splits: Splits) -> tuple[dict[str, str], ...]:
    """A run's datasets as the MLflow UI's Dataset column shows them: one per split (context training, validation,
    test), named after the dataset, with a digest of the split's images and labels and its shapes as the profile.
    Computed once where the data are loaded; `log_datasets` logs them on each run."""
    source = json.dumps({"tags": {"kdo.dataset": data.name, "kdo.data_dir": str(data.data_dir),
                                  "kdo.split_seed": str(data.split_seed), "kdo.val_fraction": str(data.val_fraction),
                                  "kdo.train_fraction": str(data.train_fraction)}})
    out = []
    parts = {"training": (splits.train_x, splits.train_y), "validation": (splits.val_x, splits.val_y),
             "test": (splits.test_x, splits.test_y)}
    for context, (x, y) in parts.items():
        digest = hashlib.sha256(np.ascontiguousarray(x).data)
        digest.update(np.ascontiguousarray(y).data)
        profile = {"num_rows": int(len(y)), "features_shape": list(x.shape), "targets_shape": list(y.shape)}
        out.append({"context": context, "name": data.name, "digest": digest.hexdigest()[:8], "source": source,
                    "profile": json.dumps(profile)})
    return tuple(out)


def log_datasets(tracker: Tracker, datasets: tuple[dict[str, str], ...]) -> None:
    """Log `dataset_inputs` on a run (`mlflow.log_input`'s record, through the client)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tracker.client.log_inputs(tracker.run_id, datasets=[
        DatasetInput(Dataset(d["name"], d["digest"], "code", d["source"], profile=d["profile"]),
                     [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])]) for d in datasets])


def kdo_version(distribution: str = "kd-orchestrator") -> str:
    """The installed package's version, else the one in the checkout's pyproject.toml: tags old and new numbers."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        import tomllib

        try:
            return str(tomllib.loads((_PACKAGE_ROOT / "pyproject.toml").read_text())["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """A run's params: its config flattened, less the sections that do not apply to it (the synthetic dataset's
    shape on another dataset; how a teacher would be trained when it is a checkpoint or weights; a checkpoint's
    fields for a described teacher), so the MLflow UI's columns show what the run used. Every field a space may
    vary per trial, and every one the ledger reads, is kept: the full config is the run's `config.yaml`."""
    raw = cfg.model_dump(mode="json")
    if cfg.data.name != "synthetic":
        raw["data"].pop("synthetic")
    if cfg.teacher is not None:
        unused = (("training", "batch_size", "data", "cache_dir", "architecture", "args", "features")
                  if cfg.teacher.architecture is None else ("checkpoint", "weights"))
        for key in unused:
            raw["teacher"].pop(key)
    if not cfg.plugins:
        raw.pop("plugins")
    return flatten(raw)


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The tags every run carries, whether `kdo run`, a sweep child or a study child: what it trains on what."""
    return {"kdo.method": cfg.method.name, "kdo.dataset": cfg.data.name, "kdo.student": cfg.student.architecture,
            "kdo.teacher": teacher_label(cfg), "kdo.seed": str(cfg.training.seed), "kdo.version": kdo_version(),
            "kdo.data_free": str(get_method(cfg.method.name).data_free).lower()}


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, creating it with artifacts beside a SQLite store (not under some cwd)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


class Tracker:
    """Writes metrics and artifacts to one existing MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.client = client(uri)
        self.run_id = run_id
        self._monitor: Any = None

    def monitor_system(self, seconds: float, resume: bool = False) -> None:
        """MLflow's system metrics on this run (`system/cpu_utilization_percentage`, memory, disk, network; GPU where
        present) every `seconds` while it is open, and one sample when it finishes; 0: none."""
        if seconds <= 0:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=seconds, resume_logging=resume,
                                             tracking_uri=self.uri)
        self._monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 500])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, mask_uri(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, mask_uri(text), artifact_file)

    def finish(self, status: str) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()
            monitor.collect_metrics()  # the end sample: a run shorter than the interval still has one
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        self.client.set_terminated(self.run_id, status)


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, Any],
              parent_run_id: str | None = None, source: dict[str, str] | None = None) -> tuple[Tracker, str]:
    """Create a RUNNING run (a child when `parent_run_id` is given) with the source tags given (a driver's), else
    this process's; returns it and its experiment id."""
    store = client(uri)
    experiment_id = ensure_experiment(store, experiment, uri)
    all_tags = {**(source if source is not None else source_tags()), "kdo.version": kdo_version(),
                **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = store.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return Tracker(uri, run.info.run_id), experiment_id


class RunLog(Protocol):
    """Where the loop writes a run's metrics, tags and files (an MLflow `Tracker`; no MLflow import here)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...


class AfterEpoch:
    """A run log that drops the metrics of epochs its run has logged already (a continued attempt re-trains the
    epochs after its checkpoint; the dead attempt logged some of them)."""

    def __init__(self, tracker: RunLog | None, logged: int) -> None:
        self.tracker, self.logged = tracker, logged

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None and not 0 < step <= self.logged:
            self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.tracker is not None:
            self.tracker.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.set_tags(tags)

"""MLflow logging by run id, so the driver and any Ray worker can write to the same run. MLflow is imported
when a run is first written: a config error never pays for it."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from methods import get_method
from orchestrator.errors import ConfigError, StoreUnreachable
from orchestrator.experiment.config import ExperimentConfig, teacher_label

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.experiment.data import DataConfig, Splits

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DATABASE_STORES = ("sqlite:", "postgresql:", "mysql:")  # stores `mlflow ui` serves (no server of their own)
# Terminal output is the epoch lines and the results table: no download bars, no schema-migration chatter.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Started monitoring system metrics." per run
# MLflow's HTTP client retries a server that does not answer 7 times, backoff factor 2 (about 4 minutes a call),
# and waits 120 s for each answer. kdo's bound (about 30 s a call), unless MLflow's own variables are set: every
# Ray worker imports this module before it writes a run.
for _variable, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                          ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
    os.environ.setdefault(_variable, _value)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#@:\s]*)(?P<secret>:[^/?#\s]*)?@")


def mask_uri(text: str) -> str:
    """`text` with the credentials of every URI in it masked, `http://user:token@host` -> `http://user:***@host`
    (a user part alone, often a token, is masked whole): what params, artifacts and printed lines show."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["secret"] else f"{m['scheme']}***@", text)


@functools.cache  # a store that answered once in this process (the driver asks before naming and provisioning)
def check_store(uri: str, timeout: float = 5.0, field: str = "tracking.uri") -> None:
    """Refuse (one line) an MLflow server that does not answer, before Ray starts or any run is written; any HTTP
    answer counts (a server behind a login answers 401). File and database stores are checked when opened."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    bare = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else str(host))  # credentials left out
    try:
        urllib.request.urlopen(f"{urllib.parse.urlunsplit(bare).rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"{field}: no MLflow server answers at {mask_uri(uri)} ({reason})") from None


def unreachable(err: BaseException) -> bool:
    """Whether `err` is the MLflow client giving up on a store that does not answer (refused, timed out, dropped),
    raised here or in a Ray worker (whose error reaches the driver as text)."""
    for _ in range(8):  # the exception and what it was raised from
        text = str(err)
        if "API request to" in text and "failed with exception" in text:  # MLflow's words for a transport failure
            return True
        if type(err).__module__.startswith(("requests", "urllib3")) and "Error" in type(err).__name__:
            return True
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            return False
        err = nxt
    return False


@contextmanager
def store_errors(uri: str, resume_hint: str = "") -> Iterator[None]:
    """The MLflow client giving up on `uri` becomes one line (`StoreUnreachable`, carrying `resume_hint`)."""
    try:
        yield
    except Exception as err:
        if not unreachable(err):
            raise
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        lost = StoreUnreachable(f"the MLflow store at {mask_uri(uri)} stopped answering ({retries} retries spent)")
        lost.resume_hint = resume_hint
        raise lost from None


@contextmanager
def unless_store_lost() -> Iterator[None]:
    """Go on past a store that stopped answering: what it could not record is settled once it answers again."""
    try:
        yield
    except Exception as err:
        if not unreachable(err):
            raise


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
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    all_tags = {**(source if source is not None else source_tags()), "kdo.version": kdo_version(),
                **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return Tracker(uri, run.info.run_id), experiment_id


def register_student(tracker: Tracker, run_name: str) -> str:
    """`tracking.log_models`: a finished run's `student/` checkpoint as a version of `kdo-student-<run name>`."""
    return register_checkpoint(tracker.uri, tracker.run_id, f"kdo-student-{run_name}", "student",
                               f"the student of run {run_name}")


def register_checkpoint(tracking: str, run_id: str, name: str, folder: str, description: str) -> str:
    """Register a run's checkpoint folder (`teacher/`, `student/`: kdo's own state_dict plus config, not an MLflow
    flavour) as a version of model `name` in MLflow's model registry; returns `models:/<name>/<version>`. The
    newest version reused when it is that run's folder already (a resumed sweep finishing again)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking, registry_uri=tracking)
    source = f"runs:/{run_id}/{folder}"
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        versions = client.search_model_versions(f"name = '{name}'")
        newest = max(versions, key=lambda v: int(v.version), default=None)
        if newest is not None and newest.source == source:
            return f"models:/{name}/{newest.version}"
    return f"models:/{name}/{client.create_model_version(name, source=source, run_id=run_id).version}"


def optuna_storage(uri: str, storage_path: str) -> str:
    """Where kdo keeps Optuna studies (an adaptive sweep's, a study's export): `optuna.db` beside an SQLite MLflow
    store, else in `storage_path`; `optuna-dashboard <this>` opens them."""
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """The address of a run's page in the MLflow UI: on the server itself, or on `mlflow ui` (`ui_hint`) for a
    database store."""
    uri = mask_uri(uri)
    base = "http://127.0.0.1:5000" if uri.startswith(DATABASE_STORES) else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_hint(uri: str, experiment_id: str) -> str:
    """The command that opens the MLflow UI on this store, and the direct link to the runs table.

    The MLflow 3 UI opens experiments in its GenAI view; the `/runs` link shows the training runs.
    """
    uri = mask_uri(uri)
    store = uri if uri.startswith(DATABASE_STORES) else None
    if store is None:
        return f"open {uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return (f"mlflow ui --backend-store-uri {store} --port 5000   then open "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")

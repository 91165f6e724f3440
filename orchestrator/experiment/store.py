"""The MLflow store: a client for it (MLflow's HTTP bounds and loggers set once per process, not at import),
whether it answers, its failures as one line, credentials masked in what is shown, and the addresses of its UI
and of kdo's Optuna studies beside it."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError, StoreUnreachable

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DATABASE_STORES = ("sqlite:", "postgresql:", "mysql:")  # stores `mlflow ui` serves (no server of their own)
# MLflow's HTTP client retries a server that does not answer 7 times, backoff factor 2 (about 4 minutes a call),
# and waits 120 s for each answer. kdo's bound (about 30 s a call), unless MLflow's own variables are set.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@functools.cache
def configure_mlflow() -> None:
    """Once per process, before its first MLflow client: kdo's HTTP bounds (`HTTP_BOUNDS`; a variable the user set
    wins) and a quiet terminal, which shows the epoch lines and the results table: no download bars, no
    schema-migration chatter, no "Started monitoring system metrics." per run, and on an HTTP store no "View run ...
    at:" per run nor "Waiting up to 300 seconds for model version" per registration (kdo prints its own links)."""
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    for variable, value in {**HTTP_BOUNDS, **quiet}.items():
        os.environ.setdefault(variable, value)
    for name in ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics",
                 "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(uri: str, *, registry: bool = False) -> MlflowClient:
    """An MLflow client of the store at `uri` (its model registry too when `registry`): every kdo process, the
    driver and each Ray worker, reaches MLflow through here."""
    from mlflow.tracking import MlflowClient

    configure_mlflow()
    return MlflowClient(uri, registry_uri=uri) if registry else MlflowClient(uri)


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


VIEW_TAG = "mlflow.sharedViewState."  # the MLflow UI's shared views: an experiment tag per view, opened by its key


def write_view(uri: str, experiment_id: str, kind: str, name: str, *, best_effort: bool = False) -> None:
    """A view of one sweep's or study's runs that the MLflow UI opens on (`ui_hint(..., view=name)`): its children,
    best validation accuracy first, with `selected_val_acc`, `test_acc` and the status as columns. The UI shows no
    metric column of its own accord (every run logs tens of params), so this is how a person who configures nothing
    sees the accuracy; the view is the UI's own "share" format, an experiment tag. `best_effort` (a report of older
    work): a store that refuses the write (a read-only user on an authenticated server) leaves the link plain."""
    state = {"searchFilter": f"tags.`kdo.{kind}` = '{name}' and tags.`kdo.kind` = 'trial'",
             "orderByKey": "metrics.`selected_val_acc`", "orderByAsc": False,
             "selectedColumns": ["metrics.`selected_val_acc`", "metrics.`test_acc`", "tags.`kdo.status`"]}
    from mlflow.exceptions import MlflowException

    try:
        client(uri).set_experiment_tag(experiment_id, f"{VIEW_TAG}{name}", json.dumps(state))
    except MlflowException:
        if not best_effort:
            raise


def ui_hint(uri: str, experiment_id: str, view: str | None = None) -> str:
    """The command that opens the MLflow UI on this store, and the direct link to the runs table (to a sweep's or
    study's own view, `write_view`, when `view` names one).

    The MLflow 3 UI opens experiments in its GenAI view; the `/runs` link shows the training runs.
    """
    uri = mask_uri(uri)
    store = uri if uri.startswith(DATABASE_STORES) else None
    runs = f"#/experiments/{experiment_id}/runs{f'?viewStateShareKey={view}' if view else ''}"
    if store is None:
        return f"open {uri.rstrip('/')}/{runs}"
    return f"mlflow ui --backend-store-uri {store} --port 5000   then open http://127.0.0.1:5000/{runs}"

"""The tags every run carries: `kdo.version` on runs, sweep and study children (run_tags) and parents (start_run);
credentials in a tracking URI never reach params, artifacts or printed lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.experiment.config import load_config
from orchestrator.experiment.store import mask_uri, ui_hint
from orchestrator.experiment.tracking import flatten, kdo_version, run_tags, start_run
from tests.conftest import digits_config

VERSION = "0.1.0"  # pyproject.toml's [project] version


def test_version_comes_from_the_installed_package_else_from_pyproject() -> None:
    assert kdo_version() == VERSION
    assert kdo_version("no-such-distribution-kdo") == VERSION, "the checkout's pyproject.toml"


def test_every_run_and_parent_is_tagged_with_the_version(workdir: Path) -> None:
    assert run_tags(load_config(digits_config()))["kdo.version"] == VERSION
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, _ = start_run(uri, "kdo", "a-sweep", tags={"kdo.kind": "sweep"})
    child, _ = start_run(uri, "kdo", "a-child", tags={"kdo.kind": "trial"}, parent_run_id=parent.run_id)
    client = MlflowClient(uri)
    for run_id in (parent.run_id, child.run_id):
        assert client.get_run(run_id).data.tags["kdo.version"] == VERSION


@pytest.mark.parametrize(("text", "shown"), [
    ("http://user:token@host:5000", "http://user:***@host:5000"),
    ("uri: https://me:p@ss:w0rd@mlflow.example.com/ and more", "uri: https://me:***@mlflow.example.com/ and more"),
    ("https://ghp_TOKEN@host/x", "https://***@host/x"),
    ("postgresql://kdo:secret@db:5432/mlflow", "postgresql://kdo:***@db:5432/mlflow"),
    ("http://host:5000/#/experiments/1", "http://host:5000/#/experiments/1"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_mask_uri_hides_credentials_only(text: str, shown: str) -> None:
    assert mask_uri(text) == shown


def test_a_tracking_uri_with_credentials_is_logged_and_shown_masked(workdir: Path) -> None:
    cfg = load_config(digits_config(tracking={"uri": "http://user:token@host:5000"}))
    tracker, _ = start_run(f"sqlite:///{workdir / 'mlflow.db'}", "kdo", "masked", tags={})
    tracker.log_params(flatten(cfg.model_dump(mode="json")))  # what every run, parent and child logs
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.params["tracking.uri"] == "http://user:***@host:5000"
    logged = Path(tracker.client.download_artifacts(tracker.run_id, "config.yaml", str(workdir))).read_text()
    assert "uri: http://user:***@host:5000" in logged and "token" not in logged
    assert ui_hint("http://user:token@host:5000", "3") == "open http://user:***@host:5000/#/experiments/3/runs"


def test_a_store_that_stopped_answering_is_one_line_and_other_errors_pass_through(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real MLflow client against a port nothing listens on gives up after its retries: `store_errors` makes
    that one `StoreUnreachable` line with the command to run; a store that answers "no such run" is no outage."""
    import socket

    from mlflow.exceptions import MlflowException

    from orchestrator.errors import StoreUnreachable
    from orchestrator.experiment.store import store_errors, unless_store_lost, unreachable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    uri = f"http://me:secret@127.0.0.1:{port}"
    with pytest.raises(StoreUnreachable) as lost, store_errors(uri, resume_hint="kdo resume x"):
        MlflowClient(uri).set_tag("0" * 32, "k", "v")
    assert str(lost.value) == f"the MLflow store at http://me:***@127.0.0.1:{port} stopped answering (0 retries spent)"
    assert lost.value.resume_hint == "kdo resume x"
    with unless_store_lost():  # the same failure, let pass
        MlflowClient(uri).set_tag("0" * 32, "k", "v")
    local = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    with pytest.raises(MlflowException) as missing, store_errors(uri):
        local.get_run("0" * 32)
    assert not unreachable(missing.value)
    with pytest.raises(MlflowException), unless_store_lost():
        local.get_run("0" * 32)

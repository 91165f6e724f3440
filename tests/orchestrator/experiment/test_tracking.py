"""The tags every run carries: `kdo.version` on runs, sweep and study children (run_tags) and parents (start_run)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.experiment.config import load_config
from orchestrator.experiment.tracking import kdo_version, run_tags, start_run
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

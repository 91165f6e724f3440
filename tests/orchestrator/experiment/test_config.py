"""Paths made absolute in the driver (Ray runs code elsewhere); storage URIs passed through untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.experiment.config import load_config, resolve_paths
from tests.conftest import digits_config


@pytest.mark.parametrize("storage", ["s3://bucket/x", "gs://bucket/runs/kdo", "file:///shared/kdo_runs"])
def test_a_storage_uri_passes_through(workdir: Path, storage: str) -> None:
    cfg = resolve_paths(load_config(digits_config(tracking={"storage_path": storage})))
    assert cfg.tracking.storage_path == storage
    assert list(workdir.iterdir()) == []


def test_a_storage_path_is_made_absolute(workdir: Path) -> None:
    cfg = resolve_paths(load_config(digits_config(tracking={"storage_path": "runs/here"})))
    assert cfg.tracking.storage_path == str(workdir.resolve() / "runs" / "here")

"""Shared fixtures: one Ray runtime per session, a scratch working directory, a small trained teacher."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.idx import FASHION_MNIST_DIR, fashion_mnist_files
from orchestrator.experiment.loop import train_loop

TEACHER_NET = {"architecture": "cnn", "args": {"width": 16}}


def _fashion_mnist_installed() -> bool:
    try:
        fashion_mnist_files(FASHION_MNIST_DIR)
    except ConfigError:
        return False
    return True


# Tests on the real Fashion-MNIST files skip only off CI when the files are absent; under CI (`make data` ran) they
# run, and fail if the files are missing.
needs_fashion_mnist = pytest.mark.skipif(
    not _fashion_mnist_installed() and not os.environ.get("CI"),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (run `make data`; under CI=1 this test fails)")


def digits_config(**sections: object) -> dict:
    """A small, fast digits experiment as a dict; keyword arguments replace whole sections."""
    base = {
        "name": "test",
        "data": {"name": "digits", "val_fraction": 0.2, "batch_size": 64},
        "student": {"architecture": "cnn", "args": {"width": 4}},
        "method": {"name": "ce"},
        "training": {"epochs": 3, "lr": 0.05, "seed": 0},
    }
    base.update(sections)
    return base


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own empty directory: the MLflow store, caches and Ray storage land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn teacher trained on digits by the bare loop (no Ray); its final checkpoint file is kept."""
    cfg = load_config(digits_config(student=TEACHER_NET, training={"epochs": 6, "lr": 0.05, "seed": 0}))
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"

    def keep_final(metrics: dict, checkpoint_dir: str | None) -> None:
        if "test_acc" in metrics and checkpoint_dir is not None:
            shutil.copy(Path(checkpoint_dir) / "student.pt", path)

    out = train_loop(cfg, load_splits(cfg.data), report=keep_final, log=None)
    assert out.status == "finished" and out.final["test_acc"] > 0.9
    return path

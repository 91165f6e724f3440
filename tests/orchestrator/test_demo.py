"""The main job behind `make demo`, in process on the shared Ray runtime (slow: it is a real sweep)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.usefixtures("ray_runtime")
def test_demo_prints_mean_std_table_verdict_and_sweep() -> None:
    result = CliRunner().invoke(app, ["demo", "--seeds", "0,1", "--sweep-trials", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "mean ± std over 2 seeds" in out and "teacher (cnn)" in out
    assert "kd - ce test accuracy:" in out and "Welch p=" in out
    assert "top settings by mean val_acc (4 runs)" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "#/experiments/" in out
    assert "job time (without install):" in out

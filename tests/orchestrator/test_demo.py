"""The main job behind `make demo`, in process on the shared Ray runtime (slow: it is a real study)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.usefixtures("ray_runtime")
def test_demo_prints_the_study_table_verdict_report_and_mlflow_link(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--seeds", "0,1", "--settings", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "val accuracy (points) over 4 settings × 2 seeds" in out and "teacher: val" in out
    assert "lsh more robust than kd:" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "#/experiments/" in out
    [report] = workdir.glob("demo-*-report.html")
    assert "<img" in report.read_text()
    assert "job time (without install):" in out
    # exported to Optuna like any `kdo study`: optuna-dashboard shows the demo's methods too
    import optuna

    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{workdir / 'optuna.db'}")}
    assert {n.rsplit(".", 1)[1] for n in names} == {"kd", "lsh"} and "Optuna: demo-" in out

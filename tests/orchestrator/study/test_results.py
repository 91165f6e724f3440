"""`StudyResults` on hand-built ledgers (no training): the statistics and the report survive every outcome."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from orchestrator.experiment.config import load_config
from orchestrator.search.spaces import SearchSpace
from orchestrator.study.report import write_report
from orchestrator.study.results import StudyResults
from orchestrator.study.spec import StudySpec
from tests.conftest import digits_config

T = "method.params.temperature"


def _results(rows: list[dict]) -> StudyResults:
    spec = StudySpec(name="hand", config="digits_kd", methods={"kd": None, "fitnets": None}, n_settings=2,
                     seeds=[0, 1], references=["ce"], compare=[("kd", "fitnets")])
    space = SearchSpace.model_validate({"parameters": {"temperature": {"type": "float", "low": 1, "high": 8}}})
    frame = pd.DataFrame(rows)
    frame["defaults"] = frame["role"] != "design"
    frame["seconds"], frame["run_id"] = 1.0, [f"r{i}" for i in range(len(frame))]
    base = load_config(digits_config(method={"name": "kd"}, teacher={"architecture": "cnn"}))
    return StudyResults(spec, base, {"kd": space, "fitnets": space}, frame, {"val": 99.0, "test": 98.0})


def _row(method: str, role: str, sid: str, seed: int, status: str, val: float, t: float | None = 2.0) -> dict:
    return {"method": method, "role": role, "setting_id": sid, "seed": seed, "status": status, "val_acc": val,
            "test_acc": val, T: t}


def _ledger() -> list[dict]:
    rows = []
    for sid, (t, acc) in {"k1": (2.0, 0.90), "k2": (6.0, 0.80)}.items():
        rows += [_row("kd", "design", sid, s, "finished", acc + 0.01 * s, t) for s in (0, 1)]
    rows += [_row("kd", "defaults", "kd0", s, "finished", 0.85, None) for s in (0, 1)]
    # every fitnets setting diverged, and an older ledger's word for a crash
    rows += [_row("fitnets", "design", sid, s, "diverged", math.nan) for sid in ("f1", "f2") for s in (0, 1)]
    rows += [_row("fitnets", "defaults", "fd", 0, "error", math.nan), _row("fitnets", "defaults", "fd", 1,
                                                                          "diverged", math.nan)]
    rows += [_row("ce", "reference", "ce0", s, "finished", 0.70, None) for s in (0, 1)]
    return rows


def test_a_method_whose_every_run_failed_gets_a_row_of_nans_and_the_report_is_written(tmp_path: Path) -> None:
    results = _results(_ledger())
    for failures in ("chance", "drop"):
        summary = results.summary(failures)
        assert summary.loc["fitnets", "failed_runs"] == 6 and summary.loc["fitnets", "runs"] == 6
    dropped = results.summary("drop")
    assert math.isnan(dropped.loc["fitnets"].get("tuned_val", math.nan))
    assert dropped.loc["kd", "tuned_val"] == 90.5
    at_chance = results.summary("chance")
    assert at_chance.loc["fitnets", "worst"] == 10.0  # every failed run at chance (10 classes)
    page = write_report(results, tmp_path / "hand")
    assert page.is_file() and "fitnets" in page.read_text()


def test_partial_runs_never_enter_a_statistic_and_are_named_in_a_warning() -> None:
    rows = _ledger()
    rows += [_row("kd", "design", "k3", 0, "interrupted", 0.99, 7.0), _row("kd", "design", "k3", 1,
                                                                           "early_stopped", 0.99, 7.0)]
    results = _results(rows)
    assert results.summary().loc["kd", "best"] == 90.5, "the half-trained 99s are not a result"
    warnings = " ".join(results.warnings())
    assert "1 run(s) interrupted" in warnings and "1 run(s) early_stopped" in warnings


def test_statistics_are_computed_once_and_every_caller_gets_its_own_copy(monkeypatch) -> None:
    from orchestrator.study import analysis

    results = _results(_ledger())
    calls = []
    real = analysis.importances
    monkeypatch.setattr(analysis, "importances", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = results.sensitivity()
    first.iloc[:, :] = -1.0  # a caller that writes into its table
    again = results.sensitivity("chance")  # the default, spelled out: the same statistic
    assert len(calls) == 1
    assert not (again.select_dtypes("number") == -1.0).any().any()
    verdict = results.compare("kd", "fitnets")
    verdict["verdict"] = "edited"
    assert results.compare("kd", "fitnets", failures="chance")["verdict"] not in ("edited", None)

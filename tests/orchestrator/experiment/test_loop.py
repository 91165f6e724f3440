"""The plain training loop, without Ray or MLflow: it learns, it is reproducible, it selects on val."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.experiment.checkpoints import load_checkpoint
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import iterate_epochs, train_loop
from tests.conftest import digits_config


def test_bare_loop_learns_and_reports_every_key() -> None:
    cfg = load_config(digits_config(training={"epochs": 3, "lr": 0.05, "seed": 0}))
    out = train_loop(cfg, load_splits(cfg.data), log=None)
    assert out.status == "finished" and len(out.history) == 3
    for key in ("train_loss", "loss/ce", "val_acc", "lr", "epoch_seconds", "images_per_s"):
        assert all(key in row for row in out.history), key
    assert out.history[-1]["train_loss"] < out.history[0]["train_loss"]
    assert out.final["test_acc"] > 0.5  # chance is 0.1
    best = max(out.history, key=lambda r: r["val_acc"])
    assert out.final["selected_val_acc"] == best["val_acc"]


def test_same_config_and_seed_give_the_same_metrics() -> None:
    cfg = load_config(digits_config())
    splits = load_splits(cfg.data)
    a, b = (train_loop(cfg, splits, log=None) for _ in range(2))
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert a.final["test_acc"] == b.final["test_acc"]
    c = train_loop(load_config(digits_config(), ["training.seed=1"]), splits, log=None)
    assert [r["train_loss"] for r in c.history] != [r["train_loss"] for r in a.history]


def test_the_saved_student_holds_the_selected_epoch_and_says_so(tmp_path: Path) -> None:
    # A constant, too-high learning rate: val_acc peaks at epoch 5 of 6, so the selected epoch is not the last.
    cfg = load_config(digits_config(training={"epochs": 6, "lr": 0.2, "seed": 0, "schedule": "constant"}))
    saved: list[dict] = []

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            saved.append(load_checkpoint(Path(checkpoint_dir) / "student.pt"))

    out = train_loop(cfg, load_splits(cfg.data), log=None, report=report)
    [ckpt] = saved
    best = out.final["best_epoch"]
    assert best < cfg.training.epochs, "the case must select an earlier epoch"
    assert ckpt["metrics"] == pytest.approx({"epoch": best, "val_acc": out.history[best - 1]["val_acc"],
                                             "test_acc": out.final["test_acc"]})
    assert ckpt["metrics"]["val_acc"] == out.final["selected_val_acc"]
    # The papers' protocols beside it: the last epoch's test accuracy and the best over epochs (never chose).
    tests = [row["epoch_test_acc"] for row in out.history]
    assert out.final["last_epoch_test_acc"] == tests[-1] and out.final["peak_test_acc"] == max(tests)
    assert out.final["peak_test_acc"] >= out.final["test_acc"] and tests[best - 1] == out.final["test_acc"]


def test_selection_last_tests_the_last_epoch() -> None:
    cfg = load_config(digits_config(), ["training.selection=last"])
    out = train_loop(cfg, load_splits(cfg.data), log=None)
    assert out.final["best_epoch"] == cfg.training.epochs


@pytest.mark.parametrize("precision", ["bf16"])
def test_bf16_autocast_trains(precision: str) -> None:
    cfg = load_config(digits_config(), [f"training.precision={precision}"])
    out = train_loop(cfg, load_splits(cfg.data), log=None)
    assert math.isfinite(out.history[-1]["train_loss"]) and out.final["test_acc"] > 0.3


def test_divergence_is_reported_not_hidden() -> None:
    cfg = load_config(digits_config(), ["training.lr=10", "training.momentum=0.99", "training.epochs=6",
                                        "student.architecture=mlp", "student.args={}"])
    out = train_loop(cfg, load_splits(cfg.data), log=None)
    assert out.status == "diverged" and out.final["status"] == "diverged"
    assert len(out.history) < 6, "a diverged run stops instead of training on NaN"
    assert math.isnan(out.final["test_acc"]), "no finite epoch was ever selected, so nothing is tested"


@pytest.mark.parametrize("method", [{"name": "kd", "params": {"temperature": 4.0}}, {"name": "tcs"}])
def test_a_run_resumed_from_its_loop_state_continues_exactly(teacher_checkpoint: Path, method: dict) -> None:
    from orchestrator.experiment.checkpoints import load_checkpoint

    cfg = load_config(digits_config(method=method, teacher={"checkpoint": str(teacher_checkpoint)},
                                    student={"architecture": "cnn", "args": {"width": 4}},
                                    training={"epochs": 4, "lr": 0.05, "seed": 3}))
    splits, teacher = load_splits(cfg.data), load_checkpoint(teacher_checkpoint)
    straight = list(iterate_epochs(cfg, splits, teacher, log=None, snapshot_every=2))
    assert [("loop_state" in row) for row in straight] == [False, True, False, False]
    state = straight[1]["loop_state"]
    resumed = list(iterate_epochs(cfg, splits, teacher, log=None, resume=state))
    assert [row["epoch"] for row in resumed] == [3, 4]
    for key in ("train_loss", "val_acc", "test_acc", "selected_val_acc", "best_epoch"):
        assert resumed[-1][key] == straight[-1][key], key
    assert resumed[0]["train_loss"] == straight[2]["train_loss"]


def test_a_run_that_diverges_in_its_first_epoch_selects_nothing() -> None:
    cfg = load_config(digits_config(student={"architecture": "mlp", "args": {}},
                                    training={"epochs": 3, "lr": 10.0, "momentum": 0.99, "seed": 0}))
    out = train_loop(cfg, load_splits(cfg.data), log=None)
    assert out.status == "diverged" and len(out.history) == 1
    assert math.isnan(out.final["selected_val_acc"]) and math.isnan(out.final["test_acc"])
    assert out.final["best_epoch"] == 0


def test_no_validation_split_logs_no_val_acc_and_tests_the_last_epoch(teacher_checkpoint: Path) -> None:
    cfg = load_config(digits_config(method={"name": "kd"}, teacher={"checkpoint": str(teacher_checkpoint)}),
                      ["data.val_fraction=0", "training.selection=last"])
    splits = load_splits(cfg.data)
    assert len(splits.train_y) == 1437, "all of digits' training split trains"
    reports: list[dict] = []
    out = train_loop(cfg, splits, load_checkpoint(teacher_checkpoint),
                     report=lambda metrics, _: reports.append(metrics), log=None)
    assert out.status == "finished" and [r["epoch"] for r in out.history] == [1, 2, 3]
    assert [k for row in reports for k in row if "val_acc" in k] == [], "no val_acc is reported, not even a 0"
    assert "test_acc" not in out.history[0], "the student is tested once, after the last epoch"
    assert out.final["best_epoch"] == 3 and out.final["test_acc"] > 0.3  # chance is 0.1
    assert out.final["teacher_test_acc"] > 0.9

"""The epochs of a run as the driver shows them, read from a real SQLite MLflow store while a thread logs them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.experiment.progress import logged_epochs, watch_epochs
from orchestrator.experiment.tracking import start_run


def _log_epochs(workdir: Path, epochs: int, pause: float) -> tuple[str, str, threading.Thread]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker, _ = start_run(uri, "kdo", "r", tags={})

    def train() -> None:
        for epoch in range(1, epochs + 1):
            time.sleep(pause)
            last = {"test_acc": 0.9} if epoch == epochs else {}
            tracker.log_metrics({"train_loss": 1.0 / epoch, "val_acc": 0.5 + epoch / 100, "lr": 0.1,
                                 "epoch_seconds": pause, **last}, step=epoch)

    return uri, tracker.run_id, threading.Thread(target=train)


@pytest.mark.parametrize("every_epoch", [True, False])
def test_every_epoch_is_shown_once_in_order_without_a_terminal(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                                every_epoch: bool) -> None:
    uri, run_id, train = _log_epochs(workdir, 4, 0.4)
    with watch_epochs(uri, run_id, "r", 4, every_epoch=every_epoch):
        train.start()
        train.join()
    lines = capsys.readouterr().out.splitlines()
    if every_epoch:
        assert [line.split()[:3] for line in lines] == [["[r]", "epoch", f"{e}/4"] for e in range(1, 5)], lines
        assert lines[0] == "[r] epoch 1/4 train_loss=1 val_acc=51.00% epoch_seconds=0.4"  # accuracy in points
        assert "test_acc=90.00%" in lines[-1] and "lr" not in lines[-1]
    else:  # a teacher: where it starts, and its last epoch
        assert lines[0] == "[r] training 4 epochs" and len(lines) == 2, lines
        assert lines[1].startswith("[r] epoch 4/4 train_loss=0.25 val_acc=54.00% test_acc=90.00%"), lines
    rows = logged_epochs(MlflowClient(uri), run_id, after=2)
    assert [r["epoch"] for r in rows] == [3, 4] and "test_acc" in rows[-1] and "test_acc" not in rows[0]


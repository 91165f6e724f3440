"""What the user sees of one run: the plain line of an epoch (`epoch_line`, which the loop prints too), and the
epochs of a run on Ray, read by the driver from the run's MLflow metrics (Ray workers' output is not forwarded
to the driver). A rich progress bar on a terminal; plain lines otherwise (CI, a pipe): one per epoch, or only a
first and a last line (`every_epoch=False`, a teacher)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from orchestrator.experiment.store import client as mlflow_client
from orchestrator.formatting import metric_text

if TYPE_CHECKING:
    from rich.console import Console

POLL_SECONDS = 1.0
SHOWN = ("train_loss", "val_acc", "test_acc", "epoch_seconds")  # what an epoch's line shows, in this order


def epoch_line(name: str, epoch: int, epochs: int, metrics: dict[str, Any]) -> str:
    """`[name] epoch 3/20 train_loss=0.81 val_acc=0.83 epoch_seconds=0.9`: the plain line of one epoch."""
    shown = " ".join(f"{k}={metric_text(k, metrics[k])}" for k in SHOWN if k in metrics)
    return f"[{name}] epoch {epoch}/{epochs} {shown}"


def logged_epochs(client: Any, run_id: str, after: int) -> list[dict[str, Any]]:
    """The epochs after `after` that the run has logged, one dict per epoch with the keys of `SHOWN` it has.

    `train_loss` is read first: an epoch's metrics are one MLflow batch, so the other keys of an epoch seen
    there are already in the store."""
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss") if m.step > after)
    if not steps:
        return []
    values = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in SHOWN}
    return [{"epoch": step, **{k: values[k][step] for k in SHOWN if step in values[k]}} for step in steps]


@contextmanager
def watch_epochs(uri: str, run_id: str, name: str, epochs: int, *, every_epoch: bool = True,
                 console: Console | None = None) -> Iterator[None]:
    """Show the epochs of run `run_id` while the body trains it; every epoch is shown before this returns."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    client = mlflow_client(uri)
    seen: list[dict[str, Any]] = []
    started = time.monotonic()
    bar = (Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[metrics]}"), console=console)
           if console.is_terminal else None)
    task = bar.add_task(escape(f"[{name}] epoch"), total=epochs, metrics="") if bar is not None else None

    def show(rows: list[dict[str, Any]]) -> None:
        seen.extend(rows)
        if bar is not None and task is not None and rows:
            last = rows[-1]
            bar.update(task, completed=last["epoch"],
                       metrics=" ".join(f"{k}={metric_text(k, last[k])}" for k in SHOWN if k in last))
        elif every_epoch:
            for row in rows:
                print(epoch_line(name, row["epoch"], epochs, row), flush=True)

    def poll() -> None:
        try:
            show(logged_epochs(client, run_id, seen[-1]["epoch"] if seen else 0))
        except Exception:  # a busy store: the next poll reads it again
            pass

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(POLL_SECONDS):
            poll()

    if bar is None and not every_epoch:
        print(f"[{name}] training {epochs} epochs", flush=True)
    watcher = threading.Thread(target=loop, name=f"kdo-epochs-{run_id[:8]}", daemon=True)
    if bar is not None:
        bar.start()
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        poll()
        if bar is not None:
            bar.stop()
        elif not every_epoch and seen:
            print(f"{epoch_line(name, seen[-1]['epoch'], epochs, seen[-1])} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)

"""What a sweep or study shows while it runs: Tune's trial events tell when runs start and end, the ledger tells
how each ended (its child's `kdo.status`). On a terminal, one live panel (runs done / running / failed / total,
elapsed, ETA, best val so far, the last runs to end); otherwise (CI, a pipe) one plain line per run that ends.

Imported by the Tune driver only when a sweep runs (it imports Ray Tune)."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ray.tune import Callback
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import unreachable
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.status import FAILED, HIDDEN, child_label

RECENT = 5  # finished runs the live panel lists
STORE_PAUSE = 60.0  # seconds the view leaves a store alone that did not answer (each ask costs its retries)


def run_line(run: Any, status: str, index: int, total: int) -> str:
    """`[ 5/38] kd temperature=4.1 kd_weight=0.5 seed 1: finished val 91.20 test 90.80 (12 s)` for one child."""
    tags, metrics = run.data.tags, run.data.metrics
    val, test = metrics.get("selected_val_acc", metrics.get("val_acc")), metrics.get("test_acc")
    scores = "".join(f" {name} {100 * v:.2f}" for name, v in (("val", val), ("test", test))
                     if status == "finished" and v is not None and v == v)
    why = tags.get("kdo.reason", "") if status in ("invalid", "crashed") else ""
    reason = f" ({why.splitlines()[0][:120]})" if why else ""
    seconds = ((run.info.end_time or int(time.time() * 1000)) - run.info.start_time) / 1000
    width = len(str(total))
    return f"[{index:>{width}}/{total}] {child_label(tags)}: {status}{scores}{reason} ({seconds:.0f} s)"


class RunProgress(Callback):
    """The progress view of one Tune run, as a Tune callback; `shown()` around `Tuner.fit()` draws it.

    `total` runs are expected, `runs_per_trial` per trial (an adaptive trial runs every seed of its setting; a
    list: per group, the trial of group i being the one with config `{"group": i}`); when a trial ends with
    another number of runs (a setting refused as `invalid`, seeds replayed on resume)
    the total follows. A trial that ends while its child is still RUNNING is counted as the finisher will
    close it: `early_stopped` if Tune ended it (`interrupted` when the driver was stopped), `crashed` if it
    errored. The ledger is read on a thread of its own: Tune warns about callbacks that hold up its loop.
    Only plain data is kept until `shown()`: Tune pickles its callbacks when the Tuner is built."""

    def __init__(self, ref: LedgerRef, total: int, runs_per_trial: int | list[int], *, live: bool) -> None:
        self.ref, self.total, self.runs_per_trial, self.live = ref, total, runs_per_trial, live
        self.counts: dict[str, int] = {}
        self.running: dict[str, int] = {}  # trial id: the runs it trains
        self.best: float | None = None
        self.recent: deque[str] = deque(maxlen=RECENT)
        self.started = time.monotonic()
        self._ended: queue.Queue[tuple[str, str, int] | None] | None = None
        self._lock: threading.Lock | None = None
        self._live: Live | None = None

    @contextmanager
    def shown(self) -> Iterator[None]:
        """Draw the view while the body runs Tune; every run that ended is shown before this returns."""
        self._ended, self._lock, self.started = queue.Queue(), threading.Lock(), time.monotonic()
        console = Console()
        if self.live and console.is_terminal:
            self._live = Live(get_renderable=self._panel, console=console, refresh_per_second=2)
        settler = threading.Thread(target=self._settle_ended, name="kdo-progress", daemon=True)
        settler.start()
        if self._live is not None:
            self._live.start()
        try:
            yield
        finally:
            self._ended.put(None)
            settler.join()
            if self._live is not None:
                self._live.stop()
                self._live = None

    # ------------------------------------------------------------------------------------ Tune's events
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        assert self._lock is not None
        with self._lock:
            self.running[trial.trial_id] = self._runs_of(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "early_stopped")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "crashed")

    def _runs_of(self, trial: Any) -> int:
        if isinstance(self.runs_per_trial, int):
            return self.runs_per_trial
        return self.runs_per_trial[trial.config["group"]]

    def _end(self, trial: Any, unsettled: str) -> None:
        assert self._lock is not None and self._ended is not None
        with self._lock:
            self.running.pop(trial.trial_id, None)
        self._ended.put((trial.trial_id, unsettled, self._runs_of(trial)))

    # ---------------------------------------------------------------------------------------- the view
    def _settle_ended(self) -> None:
        assert self._ended is not None
        client = mlflow_client(self.ref.tracking_uri)
        lost = -STORE_PAUSE  # when the store last failed to answer: not asked again for STORE_PAUSE seconds
        while (ended := self._ended.get()) is not None:
            if time.monotonic() - lost < STORE_PAUSE:
                self._show(f"trial {ended[0]}: ended; its runs are not read (the MLflow store is not answering)")
                continue
            try:
                self._settle(client, *ended)
            except Exception as err:  # the final table (or `kdo report` once the store answers) has every run
                lost = time.monotonic() if unreachable(err) else lost
                reason = "the MLflow store did not answer" if unreachable(err) else str(err).splitlines()[0][:120]
                self._show(f"trial {ended[0]}: its runs could not be read ({reason})")

    def _settle(self, client: Any, trial_id: str, unsettled: str, expected: int) -> None:
        """Count and show the runs of a trial that ended, with their statuses from the ledger."""
        runs = [r for r in ledger.children(client, self.ref.experiment_id, self.ref.parent_run_id, trial=trial_id)
                if ledger.status_of(r) not in HIDDEN]
        if unsettled == "early_stopped" and any(ledger.status_of(r) == "running" for r in runs):
            if client.get_run(self.ref.parent_run_id).data.tags.get("kdo.interrupted") == "true":
                unsettled = "interrupted"
        assert self._lock is not None
        with self._lock:
            self.total += len(runs) - expected
        if not runs and unsettled == "crashed":  # no child to count: the ledger will not know of it either
            self._show(f"trial {trial_id}: crashed before its run started")
        for run in sorted(runs, key=lambda r: int(r.data.tags.get("kdo.seed", 0))):
            status = ledger.status_of(run)
            status = unsettled if status == "running" else status
            val = run.data.metrics.get("selected_val_acc", run.data.metrics.get("val_acc"))
            with self._lock:
                self.counts[status] = self.counts.get(status, 0) + 1
                if status == "finished" and val is not None and val == val and (self.best is None or val > self.best):
                    self.best = val
                line = run_line(run, status, self.done, max(self.total, self.done))
            self._show(line)

    def _show(self, line: str) -> None:
        if self._live is None:
            print(line, flush=True)
        assert self._lock is not None
        with self._lock:
            self.recent.append(line)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def _panel(self) -> Group:
        assert self._lock is not None
        with self._lock:
            elapsed = time.monotonic() - self.started
            failed = sum(n for s, n in self.counts.items() if s in FAILED)
            stopped = sum(n for s, n in self.counts.items() if s in ("early_stopped", "interrupted"))
            done, total = self.done, max(self.total, self.done)
            running, recent, best = sum(self.running.values()), list(self.recent), self.best
        eta = _clock(elapsed / done * (total - done)) if done else "-"
        head = Text.assemble((f"{self.ref.name}: ", "bold"), f"{done}/{total} done, {running} running, ",
                             (f"{failed} failed", "red" if failed else ""), f", {stopped} stopped" if stopped else "",
                             f"; elapsed {_clock(elapsed)}, ETA {eta}, best val "
                             f"{f'{100 * best:.2f}' if best is not None else '-'}")
        return Group(*(Text(line, style="dim") for line in recent), head)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"

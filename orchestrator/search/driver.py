"""One live driver per sweep or study: names are claimed once, and `kdo resume` never runs beside a live driver.

The driver holds an OS lock (`flock` on `<storage_path>/<name>/driver.lock`, released by the kernel when the
process dies, however it dies) and tags its parent run with its host, its pid and a heartbeat every
`HEARTBEAT_SECONDS`. A resume on the driver's host trusts the lock alone (a SIGKILLed driver's sweep resumes at
once); on another host it trusts the heartbeat (older than `STALE_SECONDS`: the driver is gone).
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import ConfigError
from orchestrator.experiment.tracking import Tracker
from orchestrator.search import ledger

if TYPE_CHECKING:
    from mlflow.entities import Run

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS


def lock_path(storage_path: str, name: str) -> Path | None:
    """Where the driver of `name` holds its lock (None for a storage URI: the heartbeat alone tells)."""
    return None if "://" in storage_path else Path(storage_path) / name / "driver.lock"


def free_name(kind: str, name: str, uri: str, experiment: str, *, explicit: bool) -> str:
    """`name` if no sweep or study (`kind`) has it yet in this store; a taken name given explicitly is refused,
    a default one (a study file's name) gets the first free suffix `-2`, `-3`, ..."""
    taken = ledger.parent_names(kind, uri, experiment)
    if name not in taken:
        return name
    if explicit:
        raise ConfigError(f"--name: a {kind} named '{name}' exists already: `kdo resume {name}` finishes it, "
                          "`kdo report` shows it; choose another name for a new one")
    return next(f"{name}-{i}" for i in range(2, len(taken) + 3) if f"{name}-{i}" not in taken)


def driver_alive(parent: Run) -> bool:
    """Whether the driver a RUNNING parent's tags name still runs: its lock is held (same host), else its
    heartbeat is fresh."""
    tags = parent.data.tags
    if parent.info.status != "RUNNING" or "kdo.driver_pid" not in tags:
        return False
    lock = Path(tags["kdo.driver_lock"]) if tags.get("kdo.driver_lock") else None
    if tags.get("kdo.driver_host") == socket.gethostname() and lock is not None:
        return lock.is_file() and not _try_lock(lock)
    return time.time() - float(tags.get("kdo.heartbeat", 0)) < STALE_SECONDS


def check_not_running(parent: Run) -> None:
    """Refuse (one line) to resume a sweep or study whose driver is alive (the lock its parent's tags name)."""
    if not driver_alive(parent):
        return
    tags = parent.data.tags
    name = tags.get("kdo.sweep") or tags.get("kdo.study")
    alive = f"its driver (pid {tags['kdo.driver_pid']} on {tags.get('kdo.driver_host')}) is still running"
    beat = f" (heartbeat {tags['kdo.heartbeat']})" if tags.get("kdo.driver_host") != socket.gethostname() else ""
    raise ConfigError(f"NAME: '{name}' {alive}{beat}; stop it first, or pass --force")


def settle_abandoned(uri: str, parent: Run) -> None:
    """A parent left RUNNING by a driver that is gone (killed, or it lost its store): its children still RUNNING
    end `crashed` and the parent FAILED, as `kdo report` shows them and `kdo resume` redoes them."""
    if parent.info.status != "RUNNING" or driver_alive(parent):
        return
    ledger.close_running(uri, parent.info.experiment_id, parent.info.run_id, "crashed")
    tracker = Tracker(uri, parent.info.run_id)
    tracker.set_tags({"kdo.status": "failed"})
    tracker.finish("FAILED")


def _try_lock(path: Path) -> bool:
    """Whether the lock is free now (taken and released at once)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


@contextmanager
def live_driver(parent: Tracker, lock: Path | None) -> Iterator[None]:
    """Hold the driver lock and beat the heartbeat on `parent` while the sweep or study runs."""
    handle = None
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"NAME: another driver holds {lock}; stop it first") from None
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                parent.set_tags({"kdo.heartbeat": f"{time.time():.0f}"})
            except Exception:  # noqa: BLE001 - a store outage must not kill the driver; the next beat retries
                pass
            if stop.wait(HEARTBEAT_SECONDS):
                return

    parent.set_tags({"kdo.driver_host": socket.gethostname(), "kdo.driver_pid": str(os.getpid()),
                     "kdo.driver_lock": str(lock or "")})
    thread = threading.Thread(target=beat, name="kdo-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if handle is not None:
            handle.close()  # releases the lock

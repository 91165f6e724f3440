"""A trial's members in the ledger: the MLflow child of each, opened once (continuing its newest unfinished
attempt, or new) and closed once with how the member ended, the trial's checkpoints, and a member's newest whole
loop state (`newest_state`: the one place that finds it, for a retry or a resume, grouped or data-parallel)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from orchestrator.errors import reason
from orchestrator.experiment.checkpoints import load_states, newest_checkpoints
from orchestrator.experiment.group import Member
from orchestrator.experiment.store import unless_store_lost
from orchestrator.experiment.tracking import Tracker
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point


def newest_state(key: str, attempts: list[Any], folder: str | None = None) -> dict[str, Any] | None:
    """A member's newest whole loop state (`key` its file in a checkpoint), given its unfinished attempts (newest
    first): in this trial's Tune checkpoint (a retry), else in the newest checkpoint of the trial folder its newest
    attempt names (a resume, whatever group it ran in then), or of `folder` (a data-parallel run's Ray Train
    folder). None: it starts afresh."""
    from ray import tune

    if not attempts:
        return None
    if folder is not None:
        folders = newest_checkpoints(folder)
    elif (ckpt := tune.get_checkpoint()) is not None:
        folders = [Path(ckpt.path)]
    else:
        tagged = attempts[0].data.tags.get("kdo.checkpoint")
        folders = newest_checkpoints(Path(tagged).parent if tagged else None)
    for states in (load_states(folder, [key]) for folder in folders):
        if states is not None:
            return states[key]
    return None


class TrialChildren:
    """The MLflow child of each member a trial trains: opened once (continuing its newest attempt when the member
    resumes from a state, else a new child that supersedes the attempts), closed once with how the member ended."""

    def __init__(self, ref: LedgerRef, client: Any) -> None:
        self.ref, self.client, self.open = ref, client, dict[str, Tracker]()

    def start(self, point: Point, member: Member, attempts: list[Any]) -> int:
        """Open the member's child; returns the last epoch it has logged already (0 for a new child)."""
        from ray import tune

        # Where the attempt runs: its Tune trial (the finisher tells a stopped trial from a dead one by it) and
        # process.
        where = {"kdo.trial_id": tune.get_context().get_trial_id() or "", "kdo.host": socket.gethostname(),
                 "kdo.pid": str(os.getpid())}
        if member.resume is not None:
            keep, *older = attempts
            tracker = ledger.reopen(self.ref.tracking_uri, keep)
            tracker.set_tags(where)
            logged = ledger.logged_epochs(self.client, keep.info.run_id)
        else:
            older, logged = attempts, 0
            tracker = ledger.start_child(self.ref, member.config, point.setting, point.setting_id,
                                         {**point.tags, **where})
        for run in older:
            ledger.supersede(self.ref.tracking_uri, run)
        self.open[member.key] = tracker
        return logged

    def close(self, members: list[Member], status: str | None = None, reason: str = "") -> None:
        """Close the members' children still open as `status` (None: each its own), with `reason` (`kdo.reason`;
        default: the member's own). A store that stopped answering is asked once, not once per child: `kdo resume`
        or `kdo report` settles them."""
        with unless_store_lost():
            for m in members:
                tracker = self.open.pop(m.key, None)
                if tracker is not None:
                    if reason or m.reason:
                        tracker.set_tags({"kdo.reason": reason or m.reason})
                    ledger.close_child(tracker, status or m.status, m.config)
        for m in members:
            self.open.pop(m.key, None)

    @contextmanager
    def closed_on_exit(self, members: list[Member]) -> Iterator[None]:
        """However the trial's body ends, each member's child still open is closed with how it ended: `interrupted`
        or `early_stopped` when Tune stops the trial (it exits it at a report; ASHA, or its driver was
        interrupted), `interrupted` on Ctrl-C, `crashed` with the reason on an error, else `early_stopped`."""
        try:
            yield
        except SystemExit:
            self.close(members, "interrupted" if ledger.driver_interrupted(self.client, self.ref) else "early_stopped")
            raise
        except KeyboardInterrupt:  # Ctrl-C reached the trial's process too
            self.close(members, "interrupted")
            raise
        except BaseException as exc:
            self.close(members, "crashed", reason=reason(exc))
            raise
        finally:
            self.close(members, "early_stopped")

    def save(self, states: dict[str, dict[str, Any]], report: dict[str, Any], storage: str) -> None:
        """Report `report` to Tune with one checkpoint holding every training member's state; tag each open child
        with where Tune keeps it (only the newest is kept: `CheckpointConfig(num_to_keep=1)`)."""
        from ray import tune

        scratch = None if "://" in storage else Path(storage) / self.ref.name / ".kdo-scratch"  # a URI: /tmp
        os.makedirs(scratch or tempfile.gettempdir(), exist_ok=True)  # removed with Tune's state of this sweep
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            for key, state in states.items():
                torch.save(state, Path(folder) / f"{key}.pt")
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
        persisted = tune.get_checkpoint()
        for tracker in self.open.values():
            if persisted is not None:
                tracker.set_tags({"kdo.checkpoint": persisted.path})

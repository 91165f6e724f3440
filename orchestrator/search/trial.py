"""The trial functions Tune runs: one fixed point (a design's or a study's (setting, seed)), or one setting an
adaptive sampler proposed, its seeds advanced in lockstep. Each run is an MLflow child the trial logs itself.

A diverged seed fails the whole setting (status `diverged`, its accuracy counted at chance level in the
reported mean), never averaged away. Seeds the ledger holds as final are replayed from MLflow, not retrained.
A trial checkpoints every run it trains through Tune's checkpoint API (`checkpoint_seconds` apart; a
data-parallel run through Ray Train's, in a folder its child names); a retried trial (`tune.get_checkpoint()`)
or a resumed one (the newest checkpoint in the trial folder of the child's `kdo.checkpoint` tag) continues from
it in the same child, logging only the epochs that child has not logged
yet; attempts that cannot continue are `superseded` by a fresh child.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from orchestrator.errors import format_validation_error
from orchestrator.experiment.checkpoints import load_states, newest_checkpoints
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.launch import one_line
from orchestrator.experiment.loop import iterate_epochs
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import store_errors, unless_store_lost
from orchestrator.experiment.tracking import AfterEpoch, Tracker
from orchestrator.experiment.workers import fit_data_parallel, launch_for, train_folder, worker_device
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point, TrialOptions, point_config
from orchestrator.search.spaces import SearchSpace


@dataclass(frozen=True)
class AdaptiveSearch:
    """What an adaptive trial needs to turn a proposal into configs: the space, the base config, the seeds."""

    space: SearchSpace
    base: ExperimentConfig  # checked in the driver
    seeds: list[int]

    @staticmethod
    def tune_key(path: str) -> str:
        return path.replace(".", "__")


@dataclass
class RunMember:
    """One (setting, seed) of a trial: a config to train (fresh, or continued from a checkpoint in the same child),
    or a finished child of the ledger to replay."""

    config: ExperimentConfig
    setting: dict[str, Any]
    tags: dict[str, str]
    replay: Any = None  # a final child
    attempts: list[Any] = field(default_factory=list)  # unfinished attempts, newest first
    state: dict[str, Any] | None = None  # the loop state to continue from
    tracker: Tracker | None = None
    status: str = "running"
    name: str = ""  # its file in a trial checkpoint; default `seed-N` (a group's members share a seed)

    @property
    def seed(self) -> int:
        return self.config.training.seed

    @property
    def key(self) -> str:
        return self.name or f"seed-{self.seed}"


def run_point(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
              use_gpu: bool, points: list[Point], options: TrialOptions) -> None:
    """One Tune trial of a fixed design or a study: the point `tune_config["point"]`."""
    point = points[tune_config["point"]]
    with store_errors(ref.tracking_uri):  # the store stopped answering: one line, and Tune goes on with the others
        _run(ref, point.setting_id, [RunMember(point.config, point.setting, point.tags)], splits, teacher, use_gpu,
             options)


def run_setting(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
                use_gpu: bool, search: AdaptiveSearch, options: TrialOptions) -> None:
    """One Tune trial of an adaptive sweep: the proposed setting, validated here (once), over every seed."""
    keys = {search.tune_key(p): p for p in search.space.parameters}
    setting = {keys[k]: v for k, v in tune_config.items() if k in keys}
    sid = ledger.setting_id(setting)
    try:
        cfg = search.space.apply(search.base, setting)
    except ValidationError as err:  # a point inside the ranges the schema rejects: recorded, and Optuna moves on
        with store_errors(ref.tracking_uri):
            _invalid(ref, search.base, setting, sid, format_validation_error(err, "", ExperimentConfig))
        return
    configs = [point_config(cfg, ref.name, sid, seed) for seed in search.seeds]
    with store_errors(ref.tracking_uri):
        _run(ref, sid, [RunMember(cfg, setting, {}) for cfg in configs], splits, teacher, use_gpu, options)


def _invalid(ref: LedgerRef, base: ExperimentConfig, setting: dict[str, Any], sid: str, reason: str) -> None:
    """A child with status `invalid` and the reason (once per setting; the base config's params, the setting in
    `kdo.setting`); Tune hears NaN, which Optuna records as a failed trial."""
    from ray import tune

    if not ledger.final_seeds(mlflow_client(ref.tracking_uri), ref.experiment_id, ref.parent_run_id, sid):
        cfg = point_config(base, ref.name, sid, base.training.seed)
        tracker = ledger.start_child(ref, cfg, setting, sid, {"kdo.reason": reason[:5000]})
        ledger.close_child(tracker, "invalid")
    tune.report({"val_acc": float("nan"), "epoch": 1, "setting_id": sid, "status": "invalid"})


def _run(ref: LedgerRef, sid: str, members: list[RunMember], splits: Splits, teacher: dict[str, Any] | None,
         use_gpu: bool, options: TrialOptions) -> None:
    client = mlflow_client(ref.tracking_uri)
    final = ledger.final_seeds(client, ref.experiment_id, ref.parent_run_id, sid)
    unfinished = ledger.unfinished_attempts(client, ref.experiment_id, ref.parent_run_id, sid)
    for m in members:
        m.replay, m.attempts = final.get(m.seed), unfinished.get(m.seed, [])
    torch.set_num_threads(max(1, int(members[0].config.scaling.cpus_per_worker)))
    if members[0].config.scaling.num_workers > 1:  # one seed per trial (checked by the sweep), DDP through Ray Train
        _data_parallel(ref, sid, members[0], client, splits, teacher, use_gpu, options)
    else:
        _lockstep(ref, sid, members, client, splits, teacher, use_gpu, options)


def open_child(ref: LedgerRef, m: RunMember, sid: str, start_epoch: int, client: Any) -> int:
    """Open the member's child: the newest unfinished attempt when continuing from a checkpoint, else a new child
    (older attempts superseded). Returns the last epoch the child has logged already."""
    from ray import tune

    # Where the attempt runs: its Tune trial (the finisher tells a stopped trial from a dead one by it) and process.
    trial_id = {"kdo.trial_id": tune.get_context().get_trial_id() or "", "kdo.host": socket.gethostname(),
                "kdo.pid": str(os.getpid())}
    if m.state is not None and start_epoch > 0:
        keep, *older = m.attempts
        m.tracker = ledger.reopen(ref.tracking_uri, keep)
        m.tracker.set_tags(trial_id)
        logged = ledger.logged_epochs(client, keep.info.run_id)
    else:
        older, logged = m.attempts, 0
        m.state = None
        m.tracker = ledger.start_child(ref, m.config, m.setting, sid, {**m.tags, **trial_id})
    for run in older:
        ledger.supersede(ref.tracking_uri, run)
    return logged


def find_states(members: list[RunMember], client: Any) -> int:
    """Find each trained member's loop state: Tune's checkpoint of this trial (a retry) or the newest one in the
    trial folder its newest unfinished attempt names (a resume). All of them continue from one epoch, or none
    does (0)."""
    from ray import tune

    trained = [m for m in members if m.replay is None]
    if not trained or not all(m.attempts for m in trained):
        return 0
    if (ckpt := tune.get_checkpoint()) is not None:
        folders = [Path(ckpt.path)]
    else:
        tagged = trained[0].attempts[0].data.tags.get("kdo.checkpoint")
        folders = newest_checkpoints(Path(tagged).parent if tagged else None)
    for states in (load_states(folder, [m.key for m in trained]) for folder in folders):
        if states is not None and len({s["epoch"] for s in states.values()}) == 1:
            for m in trained:
                m.state = states[m.key]
            return trained[0].state["epoch"]
    return 0


def save_checkpoint(ref: LedgerRef, members: list[RunMember], states: dict[str, dict[str, Any]],
                    report: dict[str, Any], storage: str) -> None:
    """Report `report` to Tune with one checkpoint holding every trained member's state; tag each child with
    where Tune keeps it (only the newest is kept: `CheckpointConfig(num_to_keep=1)`)."""
    from ray import tune

    scratch = None if "://" in storage else Path(storage) / ref.name / ".kdo-scratch"  # a URI: the system's tmp
    os.makedirs(scratch or tempfile.gettempdir(), exist_ok=True)  # removed with Tune's state of this sweep
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        for key, state in states.items():
            torch.save(state, Path(folder) / f"{key}.pt")
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
    persisted = tune.get_checkpoint()
    for m in members:
        if m.tracker is not None and persisted is not None:
            m.tracker.set_tags({"kdo.checkpoint": persisted.path})


def _data_parallel(ref: LedgerRef, sid: str, member: RunMember, client: Any, splits: Splits,
                   teacher: dict[str, Any] | None, use_gpu: bool, options: TrialOptions) -> None:
    """A trial whose run is a TorchTrainer; rank 0's epochs reach Tune through `TuneReportCallback`. Rank 0
    checkpoints the loop state through Ray Train (`checkpoint_seconds` apart) in a folder named by the child,
    under the sweep's Tune state: a retried or resumed trial continues from the newest whole one in that child."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if member.replay is not None:  # resume: this (setting, seed) is in the ledger already
        for row in ledger.replay(client, member.replay):
            tune.report({**row, "setting_id": sid})
        return
    cfg = member.config
    storage = f"{cfg.tracking.storage_path}/{ref.name}/train"  # a path or a URI alike
    if member.attempts:
        folder = train_folder(storage, cfg, member.attempts[0].info.run_id)
        for states in (load_states(f, [member.key]) for f in newest_checkpoints(folder)):
            if states is not None:
                member.state = states[member.key]
                break
    logged = open_child(ref, member, sid, member.state["epoch"] if member.state else 0, client)
    assert member.tracker is not None
    launch = dataclasses.replace(launch_for(cfg, splits, teacher, member.tracker.run_id, gpu=use_gpu), logged=logged,
                                 resume=ray.put(member.state) if member.state is not None else None,
                                 checkpoint_seconds=options.checkpoint_seconds)
    try:
        member.status = fit_data_parallel(launch, storage=storage, callbacks=[TuneReportCallback()]).status
    except BaseException as exc:  # SystemExit: Tune stopped the trial at a report
        member.status = "crashed"
        if isinstance(exc, SystemExit):
            member.status = "interrupted" if ledger.driver_interrupted(client, ref) else "early_stopped"
        raise
    finally:
        with unless_store_lost():  # then the next `kdo resume` or `kdo report` settles the child
            if member.status == "early_stopped":  # the stop may come with the last report, after the loop recorded it
                ledger.settle_child(ref.tracking_uri, client.get_run(member.tracker.run_id), "early_stopped")
            else:
                ledger.close_child(member.tracker, member.status, member.config)


def _lockstep(ref: LedgerRef, sid: str, members: list[RunMember], client: Any, splits: Splits,
              teacher: dict[str, Any] | None, use_gpu: bool, options: TrialOptions) -> None:
    """The members' epochs advance together; Tune hears the seed mean of each epoch."""
    from ray import tune

    chance = 1.0 / splits.info.num_classes
    start_epoch = find_states(members, client)
    last_checkpoint = time.monotonic()
    with closed_on_exit(members, client, ref):
        logged = {m.seed: open_child(ref, m, sid, start_epoch, client) for m in members if m.replay is None}
        device = worker_device(use_gpu)  # once the children exist: a worker without CUDA is on their record
        runs: list[Iterator[dict[str, Any]]] = [
            itertools.islice(ledger.replay(client, m.replay), start_epoch, None) if m.replay is not None else
            iterate_epochs(m.config, splits, teacher, device=device, log=None, snapshot_every=1,
                           tracker=AfterEpoch(m.tracker, logged[m.seed]), resume=m.state) for m in members]
        for epoch, rows in enumerate(zip(*runs, strict=False), start=start_epoch + 1):  # seeds share their epochs
            states = {m.key: row.pop("loop_state") for m, row in zip(members, rows, strict=True)
                      if "loop_state" in row}
            diverged = [row.get("status") == "diverged" for row in rows]
            vals = [chance if d else row["val_acc"] for row, d in zip(rows, diverged, strict=True)]
            report: dict[str, Any] = {"val_acc": sum(vals) / len(vals), "epoch": epoch,
                                      "setting_id": sid, "seeds_diverged": sum(diverged),
                                      "train_loss": sum(r["train_loss"] for r in rows) / len(rows)}
            last = "test_acc" in rows[0] or any(diverged)
            if last:
                tests = [chance if d else row["test_acc"] for row, d in zip(rows, diverged, strict=True)]
                report.update(test_acc=sum(tests) / len(tests), status="diverged" if any(diverged) else "finished")
                # Closed before the last report: Tune may tear this process down as soon as it has it.
                for m, row, d in zip(members, rows, diverged, strict=True):  # a sibling's divergence stops the rest
                    m.status = "diverged" if d else ("finished" if "test_acc" in row else "early_stopped")
                ledger.close_members(members, None)
            if not last and states and time.monotonic() - last_checkpoint >= options.checkpoint_seconds:
                save_checkpoint(ref, members, states, report, members[0].config.tracking.storage_path)
                last_checkpoint = time.monotonic()
            else:
                tune.report(report)
            if last:
                break


@contextmanager
def closed_on_exit(members: list[RunMember], client: Any, ref: LedgerRef) -> Iterator[None]:
    """However the trial's body ends, each member's child still open is closed with how it ended: `interrupted` or
    `early_stopped` when Tune stops the trial (it exits it at a report; ASHA, or its driver was interrupted),
    `interrupted` on Ctrl-C, `crashed` with the reason on an error, else `early_stopped`."""
    try:
        yield
    except SystemExit:
        ledger.close_members(members, "interrupted" if ledger.driver_interrupted(client, ref) else "early_stopped")
        raise
    except KeyboardInterrupt:  # Ctrl-C reached the trial's process too
        ledger.close_members(members, "interrupted")
        raise
    except BaseException as exc:
        ledger.close_members(members, "crashed", reason=one_line(exc))
        raise
    finally:
        ledger.close_members(members, "early_stopped")

"""The trial functions Tune runs, one loop for all: a trial trains a list of points as the members of one group
(`experiment.group.iterate_group`): a group of a fixed design or study (points of one seed, data and teacher
sharing their batches), a lone point (a group of one), or the seeds of a setting an adaptive sampler proposed,
advanced in lockstep. Each point is an MLflow child the trial logs itself; a data-parallel point trains alone
through a TorchTrainer.

In lockstep a diverged seed fails the whole setting (status `diverged`, its accuracy counted at chance level in
the reported mean), never averaged away, and seeds the ledger holds as final are replayed from MLflow, not
retrained; in a group each member ends on its own. A trial checkpoints every member it trains through Tune's
checkpoint API (`checkpoint_seconds` apart; a data-parallel run through Ray Train's, in a folder its child names);
a retried trial (`tune.get_checkpoint()`) or a resumed one (the newest checkpoint in the trial folder of the
child's `kdo.checkpoint` tag) continues each member from its newest state (`newest_state`) in the same child,
logging only the epochs that child has not logged yet; attempts that cannot continue are `superseded` by a fresh
child.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from orchestrator.errors import format_validation_error
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.group import Member, iterate_group
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import store_errors, unless_store_lost
from orchestrator.experiment.tracking import AfterEpoch
from orchestrator.experiment.workers import fit_data_parallel, launch_for, train_folder, worker_device
from orchestrator.search import ledger
from orchestrator.search.attempts import TrialChildren, newest_state
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point, TrialOptions, point_config
from orchestrator.search.spaces import SearchSpace
from orchestrator.search.status import FINAL


@dataclass(frozen=True)
class AdaptiveSearch:
    """What an adaptive trial needs to turn a proposal into configs: the space, the base config, the seeds."""

    space: SearchSpace
    base: ExperimentConfig  # checked in the driver
    seeds: list[int]

    @staticmethod
    def tune_key(path: str) -> str:
        return path.replace(".", "__")


def run_group(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
              use_gpu: bool, points: list[Point], groups: list[list[int]], options: TrialOptions) -> None:
    """One Tune trial of a fixed design or a study: the points of group `tune_config["group"]`."""
    with store_errors(ref.tracking_uri):  # the store stopped answering: one line, and Tune goes on with the others
        _train(ref, [points[i] for i in groups[tune_config["group"]]], splits, teacher, use_gpu, options,
               lockstep=False)


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
    points = [Point(setting, seed, sid, point_config(cfg, ref.name, sid, seed)) for seed in search.seeds]
    with store_errors(ref.tracking_uri):
        _train(ref, points, splits, teacher, use_gpu, options, lockstep=True)


def _invalid(ref: LedgerRef, base: ExperimentConfig, setting: dict[str, Any], sid: str, reason: str) -> None:
    """A child with status `invalid` and the reason (once per setting; the base config's params, the setting in
    `kdo.setting`); Tune hears NaN, which Optuna records as a failed trial."""
    from ray import tune

    if not ledger.final_seeds(mlflow_client(ref.tracking_uri), ref.experiment_id, ref.parent_run_id, sid):
        cfg = point_config(base, ref.name, sid, base.training.seed)
        tracker = ledger.start_child(ref, cfg, setting, sid, {"kdo.reason": reason[:5000]})
        ledger.close_child(tracker, "invalid")
    tune.report({"val_acc": float("nan"), "epoch": 1, "setting_id": sid, "status": "invalid"})


def _train(ref: LedgerRef, points: list[Point], splits: Splits, teacher: dict[str, Any] | None, use_gpu: bool,
           options: TrialOptions, *, lockstep: bool) -> None:
    """Train the trial's points the ledger does not hold as final (one query for them all); in lockstep the final
    ones are replayed into the seed means."""
    client = mlflow_client(ref.tracking_uri)
    listed = ledger.children(client, ref.experiment_id, ref.parent_run_id,
                             setting=points[0].setting_id if lockstep else None)
    final = {ledger.point_of(r): r for r in listed if ledger.status_of(r) in FINAL}
    redo = ledger.redo_attempts(listed)
    todo = [p for p in points if (p.setting_id, p.seed) not in final]
    replays = [final[(p.setting_id, p.seed)] for p in points if (p.setting_id, p.seed) in final] if lockstep else []
    torch.set_num_threads(max(1, int(points[0].config.scaling.cpus_per_worker)))
    children = TrialChildren(ref, client)
    if points[0].config.scaling.num_workers > 1:  # one point per trial (the planners see to it), DDP on Ray Train
        _data_parallel(children, points[0], replays, redo.get((points[0].setting_id, points[0].seed), []), splits,
                       teacher, use_gpu, options)
    elif todo or replays:
        _members(children, points[0].setting_id, todo, replays, redo, splits, teacher, use_gpu, options,
                 lockstep=lockstep)


def _members(children: TrialChildren, sid: str, todo: list[Point], replays: list[Any], redo: dict[Any, list[Any]],
             splits: Splits, teacher: dict[str, Any] | None, use_gpu: bool, options: TrialOptions, *,
             lockstep: bool) -> None:
    """Train `todo` as one group, each member from its newest state. In lockstep (an adaptive setting's seeds) the
    seeds share their epochs: all continue from one epoch or none does, Tune hears the seed mean of each epoch
    (`replays` folded in), and a diverged or crashed seed ends the setting; else each member ends on its own."""
    from ray import tune

    members = [Member(p.config, name=f"{p.setting_id}-seed-{p.seed}") for p in todo]
    attempts = [redo.get((p.setting_id, p.seed), []) for p in todo]
    for m, tried in zip(members, attempts, strict=True):
        m.resume = newest_state(m.key, tried)
    if lockstep and len({m.resume["epoch"] if m.resume else 0 for m in members}) > 1:
        for m in members:
            m.resume = None
    start = max((m.resume["epoch"] for m in members if m.resume), default=0)
    replayed = [{row["epoch"]: row for row in ledger.replay(children.client, run)} for run in replays]
    chance = 1.0 / splits.info.num_classes
    last_checkpoint = time.monotonic()
    with children.closed_on_exit(members):
        for p, m, tried in zip(todo, members, attempts, strict=True):
            logged = children.start(p, m, tried)
            m.tracker = AfterEpoch(children.open[m.key], logged)
        device = worker_device(use_gpu)  # once the children exist: a worker without CUDA is on their record
        epochs = (iterate_group(members, splits, teacher, device=device, snapshot_every=1) if members else
                  ([] for _ in range(start, max(max(r, default=0) for r in replayed))))
        for epoch, rows in enumerate(epochs, start=start + 1):
            states = {m.key: row.pop("loop_state") for m, row in zip(members, rows, strict=False)
                      if row is not None and "loop_state" in row}
            ended = [m for m, row in zip(members, rows, strict=False) if row is not None and m.status != "running"]
            if lockstep:
                if crashed := [m for m in members if m.status == "crashed"]:  # the setting fails: Tune retries it,
                    children.close(crashed)  # or `kdo resume` redoes it; the others end crashed too
                    raise RuntimeError(crashed[0].reason)
                report, last = _seed_mean(epoch, sid, members, rows, replayed, chance)
                if last:  # closed before the last report: Tune may tear this process down as soon as it has it
                    children.close(members, None)
            else:
                report, last = _group_mean(rows, states), False
                children.close(ended)
            if report is None:
                continue
            if not last and states and time.monotonic() - last_checkpoint >= options.checkpoint_seconds:
                children.save(states, report, members[0].config.tracking.storage_path)
                last_checkpoint = time.monotonic()
            else:
                tune.report(report)
            if last:
                break


def _seed_mean(epoch: int, sid: str, members: list[Member], rows: list[dict[str, Any] | None],
               replayed: list[dict[int, dict[str, Any]]], chance: float) -> tuple[dict[str, Any], bool]:
    """Lockstep's report of one epoch: the seed mean of val_acc (a diverged seed at `chance`; the replayed seeds'
    epochs folded in), and whether the setting ends here: its epochs are done, or a seed diverged (the others
    stop, `early_stopped` unless they ended)."""
    trained = [(m.status, row) for m, row in zip(members, rows, strict=False) if row is not None]
    seen = trained + [(row.get("status", "running"), row) for rows_of in replayed if (row := rows_of.get(epoch))]
    diverged = [status == "diverged" for status, _ in seen]
    vals = [chance if d else row["val_acc"] for (_, row), d in zip(seen, diverged, strict=True)]
    report: dict[str, Any] = {"val_acc": sum(vals) / len(vals), "epoch": epoch, "setting_id": sid,
                              "seeds_diverged": sum(diverged),
                              "train_loss": sum(row["train_loss"] for _, row in seen) / len(seen)}
    last = any(diverged) or all(status != "running" for status, _ in seen)
    if last:
        tests = [chance if d else row["test_acc"] for (_, row), d in zip(seen, diverged, strict=True)]
        report.update(test_acc=sum(tests) / len(tests), status="diverged" if any(diverged) else "finished")
        for m in members:
            m.status = "early_stopped" if m.status == "running" else m.status
    return report, last


def _group_mean(rows: list[dict[str, Any] | None], states: dict[str, Any]) -> dict[str, Any] | None:
    """A group's report of one epoch: the mean val_acc of the members that trained it (None: none did)."""
    done = [row for row in rows if row is not None and "epoch" in row]
    if not done:
        return None
    vals = [row["val_acc"] for row in done if "val_acc" in row]
    return {"epoch": max(row["epoch"] for row in done), "val_acc": sum(vals) / len(vals) if vals else float("nan"),
            "members_training": len(states)}


def _data_parallel(children: TrialChildren, point: Point, replays: list[Any], attempts: list[Any], splits: Splits,
                   teacher: dict[str, Any] | None, use_gpu: bool, options: TrialOptions) -> None:
    """A trial whose run is a TorchTrainer; rank 0's epochs reach Tune through `TuneReportCallback`. Rank 0
    checkpoints the loop state through Ray Train (`checkpoint_seconds` apart) in a folder named by the child,
    under the sweep's Tune state: a retried or resumed trial continues from the newest whole one in that child."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    ref, client = children.ref, children.client
    if replays:  # resume: this (setting, seed) is in the ledger already
        for row in ledger.replay(client, replays[0]):
            tune.report({**row, "setting_id": point.setting_id})
        return
    cfg = point.config
    member = Member(cfg)  # its Ray Train checkpoint file is `seed-N.pt` (`workers._train_worker`)
    storage = f"{cfg.tracking.storage_path}/{ref.name}/train"  # a path or a URI alike
    if attempts:
        member.resume = newest_state(member.key, attempts, train_folder(storage, cfg, attempts[0].info.run_id))
    logged = children.start(point, member, attempts)
    launch = dataclasses.replace(
        launch_for(cfg, splits, teacher, children.open[member.key].run_id, gpu=use_gpu), logged=logged,
        resume=ray.put(member.resume) if member.resume is not None else None,
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
                tracker = children.open.pop(member.key)
                ledger.settle_child(ref.tracking_uri, client.get_run(tracker.run_id), "early_stopped")
            else:
                children.close([member])

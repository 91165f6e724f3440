"""Fixed points trained in groups: the points of a design or a study that share a seed, the data and the teacher
(`experiment.group.group_key`) run as one Tune trial on shared batches and teacher passes.

The group is an implementation detail of speed: each member is its own MLflow child with its own status, closed
when it ends (a member that diverges or crashes leaves, the others go on); the trial's checkpoint holds one loop
state per member (`<setting>-seed-N.pt`), and a retried or resumed member continues from its own newest state.
Adaptive sweeps (ASHA) keep one setting per trial."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.experiment.checkpoints import load_states, newest_checkpoints
from orchestrator.experiment.data import Splits
from orchestrator.experiment.group import Member, group_key, iterate_group, member_bytes
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.store import store_errors
from orchestrator.experiment.tracking import AfterEpoch
from orchestrator.experiment.workers import worker_device
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.points import Point, TrialOptions
from orchestrator.search.trial import RunMember, closed_on_exit, open_child, run_point, save_checkpoint

AUTO_GROUP_MAX = 16  # the largest group `group_size: 0` (auto) forms
MEMORY_SHARE = 0.25  # of the memory available when planning, what one group's members may take


def plan_groups(points: list[Point], splits: Splits, group_size: int, concurrency: int) -> list[list[int]]:
    """The points' indices in groups: points with one `group_key` in groups of at most `group_size` (0: auto, each
    key's share of the `concurrency` trial slots, at most `AUTO_GROUP_MAX` a group), bounded by a memory estimate;
    points that train alone in groups of one. Groups of one key are of near-equal sizes."""
    import psutil

    configs = [point.config for point in points]
    keyed: dict[str | None, list[int]] = {}
    for i, cfg in enumerate(configs):
        keyed.setdefault(group_key(cfg) if group_size != 1 else None, []).append(i)
    groups = [[i] for i in keyed.pop(None, [])]
    available = psutil.virtual_memory().available
    if torch.cuda.is_available():
        available = min(available, torch.cuda.mem_get_info()[0])
    total = sum(len(indices) for indices in keyed.values())
    students = {i: configs[i].student.model_dump_json() for indices in keyed.values() for i in indices}
    one_each = {student: i for i, student in students.items()}  # a point per distinct student: one build each
    sizes = {student: member_bytes(configs[i], splits) for student, i in one_each.items()}
    for indices in keyed.values():
        slots = max(1, round(concurrency * len(indices) / total))
        limit = group_size or min(AUTO_GROUP_MAX, math.ceil(len(indices) / slots))
        largest = max(sizes[students[i]] for i in indices)
        limit = max(1, min(limit, int(available * MEMORY_SHARE // max(1, largest))))
        count = math.ceil(len(indices) / limit)
        groups += [indices[k::count] for k in range(count)]
    return sorted(groups)


def run_group(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
              use_gpu: bool, points: list[Point], groups: list[list[int]], options: TrialOptions) -> None:
    """One Tune trial of a fixed design or a study: the points of group `tune_config["group"]`."""
    chosen = groups[tune_config["group"]]
    kwargs = {"splits": splits, "teacher": teacher, "ref": ref, "use_gpu": use_gpu, "options": options}
    if len(chosen) == 1:
        run_point({"point": chosen[0]}, points=points, **kwargs)
        return
    with store_errors(ref.tracking_uri):
        _grouped(ref, [points[i] for i in chosen], splits, teacher, use_gpu, options)


def _grouped(ref: LedgerRef, chosen: list[Point], splits: Splits, teacher: dict[str, Any] | None, use_gpu: bool,
             options: TrialOptions) -> None:
    from ray import tune

    client = mlflow_client(ref.tracking_uri)
    members: list[tuple[Point, RunMember]] = []
    listed = ledger.children(client, ref.experiment_id, ref.parent_run_id)  # one query for the whole group
    done = ledger.final_points(client, ref.experiment_id, ref.parent_run_id, runs=listed)
    redo = ledger.redo_attempts(listed)
    for point in chosen:
        if (point.setting_id, point.seed) in done:  # a retried trial: its dead attempt finished this member
            continue
        m = RunMember(point.config, point.setting, point.tags,
                      name=f"{point.setting_id}-seed-{point.seed}")
        m.attempts = redo.get((point.setting_id, point.seed), [])
        m.state = _own_state(m)
        members.append((point, m))
    if not members:
        return
    runs = [m for _, m in members]
    torch.set_num_threads(max(1, int(runs[0].config.scaling.cpus_per_worker)))
    last_checkpoint = time.monotonic()
    with closed_on_exit(runs, client, ref):
        logged = [open_child(ref, m, p.setting_id, m.state["epoch"] if m.state else 0, client) for p, m in members]
        device = worker_device(use_gpu)  # once the children exist: a worker without CUDA is on their record
        group = [Member(m.config, AfterEpoch(m.tracker, n), m.state) for m, n in zip(runs, logged, strict=True)]
        for rows in iterate_group(group, splits, teacher, device=device, snapshot_every=1):
            states = {m.key: row.pop("loop_state") for m, row in zip(runs, rows, strict=True)
                      if row is not None and "loop_state" in row}
            for m, row in zip(runs, rows, strict=True):
                if row is not None and "status" in row:  # this member is done: its child closes now
                    m.status = row["status"]
                    ledger.close_members([m], None, reason=row.get("reason", ""))
            epochs = [row["epoch"] for row in rows if row is not None and "epoch" in row]
            if not epochs:
                continue
            vals = [row["val_acc"] for row in rows if row is not None and "val_acc" in row]
            report = {"epoch": max(epochs), "val_acc": sum(vals) / len(vals) if vals else float("nan"),
                      "members_training": len(states)}
            if states and time.monotonic() - last_checkpoint >= options.checkpoint_seconds:
                save_checkpoint(ref, runs, states, report, runs[0].config.tracking.storage_path)
                last_checkpoint = time.monotonic()
            else:
                tune.report(report)


def _own_state(m: RunMember) -> dict[str, Any] | None:
    """The member's newest loop state: in this trial's checkpoint (a retry), else in the trial folder its newest
    unfinished attempt names (a resume, whatever group it ran in then); None: it starts afresh."""
    from ray import tune

    if not m.attempts:
        return None
    if (ckpt := tune.get_checkpoint()) is not None:
        folders = [Path(ckpt.path)]
    else:
        tagged = m.attempts[0].data.tags.get("kdo.checkpoint")
        folders = newest_checkpoints(Path(tagged).parent if tagged else None)
    for states in (load_states(folder, [m.key]) for folder in folders):
        if states is not None:
            return states[m.key]
    return None

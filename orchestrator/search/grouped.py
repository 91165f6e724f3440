"""Fixed points planned in groups: the points of a design or a study that share a seed, the data and the teacher
(`experiment.group.group_key`) run as one Tune trial on shared batches and teacher passes (`trial.run_group`).

The group is an implementation detail of speed: each member is its own MLflow child with its own status, closed
when it ends (a member that diverges or crashes leaves, the others go on); the trial's checkpoint holds one loop
state per member (`<setting>-seed-N.pt`), and a retried or resumed member continues from its own newest state.
Adaptive sweeps (ASHA) keep one setting per trial."""

from __future__ import annotations

import math

import torch

from orchestrator.experiment.data import Splits
from orchestrator.experiment.group import group_key, member_bytes
from orchestrator.search.points import Point

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

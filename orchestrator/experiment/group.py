"""Students of one seed trained as one group: each batch is drawn once and the teacher's outputs for it are
computed once (`methods.registry.TeacherPass`), and every member takes its own step with its own method,
hyperparameters, optimizer and run log.

A member's results are its solo run's (`iterate_epochs`): it is built from the same seed, sees the same
batches, and draws from its own RNG stream (each member's generator state is swapped in around its work). A
member that diverges or raises leaves the group with its own outcome while the others go on."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from methods import get_method
from methods.registry import TeacherPass
from orchestrator.errors import reason
from orchestrator.experiment.checkpoints import build_from_checkpoint
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.device_data import DeviceData
from orchestrator.experiment.factories import build_student
from orchestrator.experiment.loop import Training
from orchestrator.experiment.tracking import RunLog

# What a group keeps per member besides its network: weights, gradients, two optimizer moments, the selected
# student and a loop-state copy (activations are freed after each member's step, so only one is alive at once).
STATE_COPIES = 6


def group_key(cfg: ExperimentConfig) -> str | None:
    """What the members of one group share: the seed, the data (its batches), the teacher, the precision and the
    memory layout. None for a run that trains alone: a method that is not `groupable` (it makes its own batches)
    or a data-parallel run."""
    if not get_method(cfg.method.name).groupable or cfg.scaling.num_workers > 1:
        return None
    shared = cfg.model_dump(mode="json", include={"data", "teacher", "scaling"})
    shared["training"] = cfg.model_dump(mode="json", include={"training": {"seed", "precision", "channels_last"}})
    return json.dumps(shared, sort_keys=True)


def member_bytes(cfg: ExperimentConfig, splits: Splits) -> int:
    """A member's memory beyond the shared data and teacher: its student's parameters `STATE_COPIES` times.
    The student is built on the CPU (the meta device's first use imports torch's reference kernels: 3-5 s of a
    driver's start-up), in a forked RNG so the caller's draws are untouched."""
    with torch.random.fork_rng(devices=[]):
        params = sum(p.numel() * p.element_size() for p in build_student(cfg, splits).parameters())
    return params * STATE_COPIES


@dataclass
class Member:
    """One run of a group: its config, its run log, the loop state it continues from (None: from the start) and its
    name in a trial's checkpoint (`key`). `iterate_group` sets `status` (and `reason`) when the member ends."""

    config: ExperimentConfig
    tracker: RunLog | None = None
    resume: dict[str, Any] | None = None
    name: str = ""
    status: str = "running"  # then finished, diverged or crashed
    reason: str = ""  # why it crashed

    @property
    def key(self) -> str:
        return self.name or f"seed-{self.config.training.seed}"


def iterate_group(members: list[Member], splits: Splits, teacher_ckpt: dict[str, Any] | None, *,
                  device: torch.device, snapshot_every: int = 0) -> Iterator[list[dict[str, Any] | None]]:
    """Train the members together; yields, per epoch, each member's metrics in order (`iterate_epochs`'), or None
    for one that is not training that epoch (it ended before). Members of one `group_key` share each batch and its
    teacher pass; a member of no key (or the only one of its key) draws its own batches, on its own RNG. A member
    whose work raises ends with `{"status": "crashed", "reason": ...}`. Each member starts after its `resume`
    state's epoch (or at 1) and joins its batches there."""
    teacher = build_from_checkpoint(teacher_ckpt).to(device) if teacher_ckpt is not None else None
    data: dict[bool, DeviceData] = {}  # by memory layout: one copy of the splits on the device for all
    passes: dict[str, TeacherPass] = {}  # by group key: one teacher forward per shared batch
    runs: list[Training | None] = []
    keys: list[str] = []
    rngs: list[Any] = []
    results: list[dict[str, Any] | None] = [None] * len(members)
    scores: dict[str, float] = {}
    for i, m in enumerate(members):
        layout = m.config.training.channels_last
        shared = data.setdefault(layout, DeviceData(splits, device, channels_last=layout))
        keys.append(group_key(m.config) or f"alone-{i}")
        try:
            run = Training(m.config, splits, teacher_ckpt, device=device, tracker=m.tracker, log=None,
                           snapshot_every=snapshot_every, resume=m.resume, data=shared, teacher=teacher,
                           teacher_scores=scores)
            scores = scores or run.static  # the teacher's val and test accuracy, computed once
        except Exception as exc:  # e.g. its pre-phase failed: this member alone
            run, results[i] = None, _crashed(m, exc)
        if run is not None and run.distiller.teacher is not None and teacher is not None:
            run.distiller.teacher_pass = passes.setdefault(keys[i], TeacherPass(teacher))
        runs.append(run)
        rngs.append(_rng_state(device) if run is not None else None)
    start = min((r.first for r in runs if r is not None), default=1)
    if any(results):
        yield results
    last = max(m.config.training.epochs for m in members)

    def work(i: int, out: list[dict[str, Any] | None], what: Callable[..., Any], *args: Any) -> Any:
        """`what(member i's run, *args)` on its own RNG; what it raises ends that member alone."""
        run = runs[i]
        if run is None:
            return None
        with _own_rng(rngs, i, device):
            try:
                return what(run, *args)
            except Exception as exc:
                runs[i], out[i] = None, _crashed(members[i], exc)
                return None

    for epoch in range(start, last + 1):
        live = [i for i, r in enumerate(runs) if r is not None and r.first <= epoch <= r.cfg.training.epochs]
        if not live:
            continue
        results = [None] * len(members)
        for i in live:
            work(i, results, Training.start_epoch, epoch)
        for key in dict.fromkeys(keys[i] for i in live):  # each batch source, in the members' order
            sharing = [i for i in live if keys[i] == key]

            def lead() -> int:  # the first member of the source still training (one that crashed left it)
                return next((i for i in sharing if runs[i] is not None), sharing[0])  # noqa: B023 - used at once

            batches = work(lead(), results, _batches, epoch)
            while batches is not None and (batch := work(lead(), results, _next_batch, batches)) is not None:
                for i in sharing:
                    work(i, results, Training.step, *batch)
        for i in live:
            results[i] = work(i, results, Training.end_epoch, epoch) or results[i]
            run = runs[i]
            if run is not None and run.ended:
                members[i].status, runs[i] = run.status, None
        yield results


def _batches(run: Training, epoch: int) -> Iterator[tuple[Any, ...]]:
    return iter(run.distiller.batches(epoch, run.ctx))


def _next_batch(run: Training, batches: Iterator[tuple[Any, ...]]) -> tuple[Any, ...] | None:
    """The next batch of `batches` (None when the epoch's are done), drawn on the lead member's RNG: a data-free
    method's generator draws from it."""
    return next(batches, None)


def _crashed(member: Member, exc: BaseException) -> dict[str, Any]:
    """The member ends `crashed`, with the error's one line (`errors.reason`) as its reason."""
    member.status, member.reason = "crashed", reason(exc, 500)
    return {"status": member.status, "reason": member.reason}


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _own_rng(states: list[Any], i: int, device: torch.device) -> Iterator[None]:
    """Member `i`'s generator states in place while it works (the CPU's and its CUDA device's), kept after."""
    cpu, cuda = states[i]
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    try:
        yield
    finally:
        states[i] = _rng_state(device)

"""Students of one seed trained as one group: each batch is drawn once and the teacher's outputs for it are
computed once (`methods.registry.TeacherPass`), and every member takes its own step with its own method,
hyperparameters, optimizer and run log.

A member's results are its solo run's (`iterate_epochs`): it is built from the same seed, sees the same
batches, and draws from its own RNG stream (each member's generator state is swapped in around its work). A
member that diverges or raises leaves the group with its own outcome while the others go on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from methods import get_method
from methods.registry import TeacherPass
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
    """One run of a group: its config, its run log, and the loop state it continues from (None: from the start)."""

    config: ExperimentConfig
    tracker: RunLog | None = None
    resume: dict[str, Any] | None = None


def iterate_group(members: list[Member], splits: Splits, teacher_ckpt: dict[str, Any] | None, *,
                  device: torch.device, snapshot_every: int = 0) -> Iterator[list[dict[str, Any] | None]]:
    """Train the members together; yields, per epoch, each member's metrics in order (`iterate_epochs`'), or None
    for one that is not training that epoch (it ended before). A member whose work raises ends with
    `{"status": "crashed", "reason": ...}`. Each member starts after its `resume` state's epoch (or at 1) and joins
    the group's batches there."""
    first = members[0].config.training
    data = DeviceData(splits, device, channels_last=first.channels_last)
    teacher = build_from_checkpoint(teacher_ckpt).to(device) if teacher_ckpt is not None else None
    shared = TeacherPass(teacher) if teacher is not None else None
    runs: list[Training | None] = []
    rngs: list[Any] = []
    results: list[dict[str, Any] | None] = [None] * len(members)
    scores: dict[str, float] = {}
    for i, m in enumerate(members):
        try:
            run = Training(m.config, splits, teacher_ckpt, device=device, tracker=m.tracker, log=None,
                           snapshot_every=snapshot_every, resume=m.resume, data=data, teacher=teacher,
                           teacher_scores=scores)
            scores = scores or run.static  # the teacher's val and test accuracy, computed once
        except Exception as exc:  # e.g. its pre-phase failed: this member alone
            run, results[i] = None, _crashed(exc)
        if run is not None and run.distiller.teacher is not None:
            run.distiller.teacher_pass = shared
        runs.append(run)
        rngs.append(_rng_state(device) if run is not None else None)
    start = min((r.first for r in runs if r is not None), default=1)
    if any(results):
        yield results
    last = max(m.config.training.epochs for m in members)

    def work(i: int, out: list[dict[str, Any] | None], what: str, *args: Any) -> None:
        """Member i's `start_epoch`, `step` or `end_epoch` on its own RNG; what it raises ends it alone."""
        run = runs[i]
        if run is None:
            return
        with _own_rng(rngs, i, device):
            try:
                metrics = getattr(run, what)(*args)
            except Exception as exc:
                runs[i], out[i] = None, _crashed(exc)
                return
        if what == "end_epoch":
            out[i] = metrics
            if "status" in metrics:
                runs[i] = None

    for epoch in range(start, last + 1):
        live = [i for i, r in enumerate(runs) if r is not None and r.first <= epoch <= r.cfg.training.epochs]
        if not live:
            continue
        results = [None] * len(members)
        for i in live:
            work(i, results, "start_epoch", epoch)
        lead = next((runs[i] for i in live if runs[i] is not None), None)
        for x, y in lead.ctx.train_batches(epoch) if lead is not None else ():  # one seed, one data config
            for i in live:
                work(i, results, "step", x, y)
        for i in live:
            work(i, results, "end_epoch", epoch)
        yield results


def _crashed(exc: BaseException) -> dict[str, Any]:
    lines = str(exc).strip().splitlines()
    return {"status": "crashed", "reason": f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]}


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

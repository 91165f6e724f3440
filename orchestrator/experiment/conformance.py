"""The conformance kit: does a method (built in or a plugin's) behave as kdo needs it to? On tiny synthetic data, in
seconds, without Ray or MLflow, it checks and reports each property a sweep, a study and a resume rely on:

- schema: the Params defaults validate; every numeric field is bounded, every choice lists its values (a Literal),
  every field has a description (fields that name a layer, `methods.registry.LAYER`, are checked by `check_setup`);
- setup: the tiny config validates (the method's own `check_setup` accepts the networks);
- step: one training step gives a finite loss and finite named parts;
- gradients: the loss reaches the student's parameters and never the teacher's (its weights and BN statistics
  stay as they were over a whole run);
- deterministic: two runs with one seed give identical metrics;
- resume: a run continued from its loop state after epoch k (pickled and read back, as a trial checkpoint is)
  equals the uninterrupted run: the method's `method_state` round-trips;
- grouped: a method that says it is `groupable` gives the same results trained in a group as alone.

`check_method(name)` returns the results (a user's pytest can assert on them); `kdo check-method NAME` prints them.
"""

from __future__ import annotations

import io
import math
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
import torch

from methods import get_method
from methods.networks import build_network
from orchestrator.errors import ConfigError, reason
from orchestrator.experiment.config import ExperimentConfig, load_config
from orchestrator.experiment.config_files import import_plugins
from orchestrator.experiment.data import Splits, load_splits
from orchestrator.experiment.group import Member, iterate_group
from orchestrator.experiment.loop import Training, iterate_epochs

TINY: dict[str, Any] = {
    "name": "conformance",
    "data": {"name": "synthetic", "val_fraction": 0.25, "batch_size": 16,
             "synthetic": {"num_train": 96, "num_test": 32, "channels": 1, "image_size": 8, "num_classes": 4}},
    "student": {"architecture": "cnn", "args": {"width": 4}},
    "teacher": {"architecture": "cnn", "args": {"width": 8}},  # built untrained, never trained: its outputs suffice
    "training": {"epochs": 3, "lr": 0.05, "seed": 0},
    "tracking": {"system_metrics_seconds": 0},
}
_CLOCKS = ("seconds", "per_s")  # wall-clock metrics differ between identical runs


@dataclass(frozen=True)
class Check:
    """One property: passed (True), failed (False) or not applicable / not reached (None), and why."""

    name: str
    passed: bool | None
    detail: str
    seconds: float = 0.0


def check_method(name: str, *, overrides: Iterable[str] = (), plugins: Iterable[str] = (),
                 epochs: int = 3) -> list[Check]:
    """Every check of the kit for method `name` (see the module docstring); `overrides` (a.b=value) change the tiny
    config (e.g. `student.architecture=...` for a method that needs a particular network), `plugins` are imported
    first. A check that cannot run because an earlier one failed is reported with `passed=None`."""
    import_plugins(plugins)
    try:
        method = get_method(name)
    except KeyError as err:
        raise ConfigError(f"METHOD: {err.args[0]}") from None
    checks = [_timed("schema", lambda: _schema(method.Params))]
    try:
        raw = {**TINY, "method": {"name": name}, "training": {**TINY["training"], "epochs": epochs}}
        cfg = load_config(raw, list(overrides))
    except ConfigError as err:
        return [*checks, Check("setup", False, str(err))]
    if cfg.method.name != name:
        return [*checks, Check("setup", False, f"the overrides run method '{cfg.method.name}', not '{name}'")]
    checks.append(Check("setup", True, f"student {cfg.student.architecture}, data {cfg.data.name}"))
    splits = load_splits(cfg.data)
    teacher = _untrained_teacher(cfg, splits) if method.needs_teacher else None
    checks.append(_timed("step", lambda: _step(cfg, splits, teacher)))
    if checks[-1].passed is False:
        return checks
    checks.append(_timed("gradients", lambda: _gradients(cfg, splits, teacher)))
    runs: dict[str, list[dict[str, Any]]] = {}
    checks.append(_timed("deterministic", lambda: _deterministic(cfg, splits, teacher, runs)))
    if "first" not in runs:
        return [*checks, Check("resume", None, "no run to resume"), Check("grouped", None, "no run to compare")]
    checks.append(_timed("resume", lambda: _resume(cfg, splits, teacher, runs["first"])))
    if not method.groupable:
        checks.append(Check("grouped", None, "not groupable: trains alone"))
    else:
        checks.append(_timed("grouped", lambda: _grouped(cfg, splits, teacher, runs["first"])))
    return checks


def _timed(name: str, check: Callable[[], tuple[bool, str]]) -> Check:
    start = time.perf_counter()
    try:
        passed, detail = check()
    except Exception as err:  # the method's own code may raise anything: that is the finding
        passed, detail = False, f"raised {reason(err)}"
    return Check(name, passed, detail, time.perf_counter() - start)


def _schema(params: type) -> tuple[bool, str]:
    problems = []
    try:
        params()
    except Exception as err:  # a default the schema itself rejects
        problems.append(f"its defaults do not validate ({str(err).splitlines()[0]})")
    for field, info in params.model_fields.items():  # type: ignore[attr-defined]
        if not info.description:
            problems.append(f"{field}: no description")
        if (info.json_schema_extra or {}).get("kdo_layer"):
            continue
        kinds = [a for a in (typing.get_args(info.annotation) or (info.annotation,)) if a is not type(None)]
        if any(k in (int, float) for k in kinds):
            low = any(isinstance(m, annotated_types.Ge | annotated_types.Gt) for m in info.metadata)
            high = any(isinstance(m, annotated_types.Le | annotated_types.Lt) for m in info.metadata)
            if not (low and high):
                problems.append(f"{field}: numeric without {'a lower' if not low else 'an upper'} bound "
                                "(Field(ge=..., le=...))")
        if any(k is str for k in kinds):
            problems.append(f"{field}: a free string; list its values with Literal[...]")
        if any(typing.get_origin(k) is Literal and not typing.get_args(k) for k in kinds):
            problems.append(f"{field}: an empty Literal")
    return not problems, "; ".join(problems) or f"{len(params.model_fields)} fields"  # type: ignore[attr-defined]


def _untrained_teacher(cfg: ExperimentConfig, splits: Splits) -> dict[str, Any]:
    """A teacher checkpoint of the config's teacher architecture with seeded random weights (kdo's own format)."""
    t, info = cfg.teacher, splits.info
    if t is None or t.architecture is None:
        raise ConfigError("teacher: the kit builds an untrained teacher of teacher.architecture; give that instead")
    torch.manual_seed(1234)
    net = build_network(t.architecture, num_classes=info.num_classes, in_channels=info.channels,
                        image_size=info.image_size, features=t.features, **t.args)
    return {"architecture": t.architecture, "args": dict(t.args), "features": t.features,
            "num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size,
            "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def _first_batch(run: Training) -> tuple[torch.Tensor, torch.Tensor | None]:
    run.start_epoch(1)
    x, y = next(iter(run.distiller.batches(1, run.ctx)))
    return x, y


def _step(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None) -> tuple[bool, str]:
    run = Training(cfg, splits, teacher, log=None)
    loss, parts = run.model(*_first_batch(run))
    values = {"loss": loss, **parts}
    bad = [k for k, v in values.items() if not torch.is_tensor(v) or v.numel() != 1 or not torch.isfinite(v).all()]
    if bad:
        return False, f"not a finite scalar: {', '.join(bad)} ({', '.join(f'{k}={values[k]}' for k in bad)[:200]})"
    return True, ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in values.items())


def _gradients(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None) -> tuple[bool, str]:
    run = Training(cfg, splits, teacher, log=None)
    t = run.distiller.teacher
    before = {k: v.clone() for k, v in t.state_dict().items()} if t is not None else {}
    loss, _ = run.model(*_first_batch(run))
    loss.backward()
    student = [p for p in run.distiller.student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    if not student:
        return False, "no student parameter receives a gradient"
    if t is None:
        return True, f"{len(student)} student tensors get gradients; no teacher"
    touched = [n for n, p in t.named_parameters() if p.requires_grad or p.grad is not None]
    if touched:
        return False, f"the teacher receives gradients: {', '.join(touched[:5])}"
    for epoch in range(1, cfg.training.epochs + 1):  # a whole run: the teacher's weights and BN statistics stay
        if epoch > 1:
            run.start_epoch(epoch)
        for x, y in run.distiller.batches(epoch, run.ctx):
            run.step(x, y)
        run.end_epoch(epoch)
        if run.ended:
            break
    moved = [k for k, v in t.state_dict().items() if not torch.equal(v, before[k])]
    if moved:
        return False, f"a run changed the teacher: {', '.join(moved[:5])}"
    return True, f"{len(student)} student tensors get gradients; the teacher's none, its state unchanged"


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not any(c in k for c in _CLOCKS)}


def _differ(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """'' when the two histories agree (to float rounding), else the first metric that differs."""
    if len(a) != len(b):
        return f"{len(a)} epochs against {len(b)}"
    for epoch, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        mx, my = _metrics(x), _metrics(y)
        for key in sorted(set(mx) | set(my)):
            u, v = mx.get(key, math.nan), my.get(key, math.nan)
            if not (math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-7) or (math.isnan(u) and math.isnan(v))):
                return f"epoch {x.get('epoch', epoch)} {key}: {u:.6g} against {v:.6g}"
    return ""


def _deterministic(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None,
                   runs: dict[str, list[dict[str, Any]]]) -> tuple[bool, str]:
    first = list(iterate_epochs(cfg, splits, teacher, log=None, snapshot_every=1))
    runs["first"] = first
    second = list(iterate_epochs(cfg, splits, teacher, log=None))
    differ = _differ(first, second)
    return not differ, differ or f"{len(first)} epochs identical"


def _resume(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None,
            first: list[dict[str, Any]]) -> tuple[bool, str]:
    states = [row.get("loop_state") for row in first]
    k = max(1, len(first) // 2)
    if k >= len(first) or states[k - 1] is None:
        return False, f"no loop state after epoch {k} (a run of {len(first)} epochs)"
    buffer = io.BytesIO()
    torch.save(states[k - 1], buffer)  # as a trial checkpoint is written and read back
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    rest = list(iterate_epochs(cfg, splits, teacher, log=None, resume=state))
    differ = _differ(first[k:], rest)
    return not differ, differ or f"stopped after epoch {k}, resumed: epochs {k + 1}..{len(first)} identical"


def _grouped(cfg: ExperimentConfig, splits: Splits, teacher: dict[str, Any] | None,
             first: list[dict[str, Any]]) -> tuple[bool, str]:
    other = cfg.model_copy(update={"training": cfg.training.model_copy(update={"lr": cfg.training.lr / 2})})
    members = [Member(cfg, name="a"), Member(other, name="b")]
    rows = list(iterate_group(members, splits, teacher, device=torch.device("cpu")))
    alone = [row[0] for row in rows if row[0] is not None]
    differ = _differ(first, alone)
    return not differ, differ or "a member of a group of two (the other at half the lr) equals its run alone"

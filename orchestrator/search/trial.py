"""The trial functions Tune runs: one fixed point (a design's or a study's (setting, seed)), or one setting an
adaptive sampler proposed, its seeds advanced in lockstep. Each run is an MLflow child the trial logs itself.

A diverged seed fails the whole setting (status `diverged`, its accuracy counted at chance level in the
reported mean), never averaged away. Seeds the ledger already holds are replayed from MLflow, not retrained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import Splits
from orchestrator.experiment.launch import fit_data_parallel, payload
from orchestrator.experiment.loop import iterate_epochs
from orchestrator.experiment.tracking import Tracker
from orchestrator.search import ledger
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.spaces import SearchSpace

Sampler = Literal["tpe", "random", "sobol", "grid"]
FIXED_DESIGNS = ("sobol", "grid")


@dataclass(frozen=True)
class TrialOptions:
    """How a sweep or study runs its trials; stored on the parent as the `kdo.options` tag (JSON) for resume."""

    sampler: Sampler = "tpe"
    scheduler: Literal["asha", "none"] = "none"
    trials: int = 8  # settings to draw (a grid's size is fixed by its space)
    concurrency: int = 2
    metric: str = "val_acc"
    seeds: list[int] = field(default_factory=lambda: [0])
    max_failures: int = 0
    design_seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialOptions:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Point:
    """One fixed run: its setting, seed, setting id, the checked config that runs it and its ledger tags."""

    setting: dict[str, Any]
    seed: int
    setting_id: str
    config: dict[str, Any]  # ExperimentConfig as JSON, seed and run name applied
    tags: dict[str, str] = field(default_factory=dict)


def point_config(cfg: ExperimentConfig, name: str, sid: str, seed: int) -> dict[str, Any]:
    """A point's config: `cfg` with its seed and the child's run name `<name>-<setting id>-s<seed>`."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{name}-{sid[:6]}-s{seed}"
    raw["training"]["seed"] = seed
    return raw


@dataclass(frozen=True)
class AdaptiveSearch:
    """What an adaptive trial needs to turn a proposal into configs: the space, the base config, the seeds."""

    space: SearchSpace
    base: dict[str, Any]
    seeds: list[int]

    @staticmethod
    def tune_key(path: str) -> str:
        return path.replace(".", "__")


@dataclass
class _Member:
    """One (setting, seed) of a trial: a config to train, or a finished child of the ledger to replay."""

    config: ExperimentConfig
    setting: dict[str, Any]
    tags: dict[str, str]
    previous: Any = None


def run_point(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
              use_gpu: bool, points: list[Point]) -> None:
    """One Tune trial of a fixed design or a study: the point `tune_config["point"]`."""
    point = points[tune_config["point"]]
    cfg = ExperimentConfig.model_validate(point.config)
    _run(ref, point.setting_id, [_Member(cfg, point.setting, point.tags)],
         splits, teacher, use_gpu)


def run_setting(tune_config: dict[str, Any], *, splits: Splits, teacher: dict[str, Any] | None, ref: LedgerRef,
                use_gpu: bool, search: AdaptiveSearch) -> None:
    """One Tune trial of an adaptive sweep: the proposed setting, validated here, over every seed."""
    keys = {search.tune_key(p): p for p in search.space.parameters}
    setting = {keys[k]: v for k, v in tune_config.items() if k in keys}
    sid = ledger.setting_id(setting)
    base = ExperimentConfig.model_validate(search.base)
    members = [_Member(ExperimentConfig.model_validate(point_config(search.space.apply(base, setting), ref.name,
                                                                    sid, seed)), setting, {}) for seed in search.seeds]
    _run(ref, sid, members, splits, teacher, use_gpu)


def _run(ref: LedgerRef, sid: str, members: list[_Member], splits: Splits, teacher: dict[str, Any] | None,
         use_gpu: bool) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ref.tracking_uri)
    done = ledger.done_seeds(client, ref.experiment_id, ref.parent_run_id, sid)
    for member in members:
        member.previous = done.get(member.config.training.seed)
    torch.set_num_threads(max(1, int(members[0].config.scaling.cpus_per_worker)))
    if members[0].config.scaling.num_workers > 1:  # one seed per trial (checked by the sweep), DDP through Ray Train
        _data_parallel(ref, sid, members[0], client, splits, teacher, use_gpu)
    else:
        _lockstep(ref, sid, members, client, splits, teacher, use_gpu)


def _data_parallel(ref: LedgerRef, sid: str, member: _Member, client: Any, splits: Splits,
                   teacher: dict[str, Any] | None, use_gpu: bool) -> None:
    """A trial whose run is a TorchTrainer; rank 0's epochs reach Tune through `TuneReportCallback`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if member.previous is not None:  # resume: this (setting, seed) is in the ledger already
        for row in ledger.replay(client, member.previous):
            tune.report({**row, "setting_id": sid})
        return
    cfg = member.config
    tracker = ledger.start_child(ref, cfg, member.setting, sid, member.tags)
    status = "running"
    try:
        status = fit_data_parallel(cfg, payload(cfg, splits, teacher, tracker.run_id, gpu=use_gpu),
                                   callbacks=[TuneReportCallback()]).status
    except BaseException as exc:  # SystemExit: Tune stopped the trial at a report
        status = "early_stopped" if isinstance(exc, SystemExit) else "error"
        raise
    finally:
        if status == "early_stopped":  # the stop may come with the last report, after the loop recorded its outcome
            ledger.settle_child(ref.tracking_uri, client.get_run(tracker.run_id), "early_stopped")
        else:
            ledger.close_child(tracker, status)


def _lockstep(ref: LedgerRef, sid: str, members: list[_Member], client: Any, splits: Splits,
              teacher: dict[str, Any] | None, use_gpu: bool) -> None:
    """The members' epochs advance together; Tune hears the seed mean of each epoch."""
    from ray import tune

    chance = 1.0 / splits.info.num_classes
    device = torch.device("cuda" if use_gpu else "cpu")
    trackers: list[Tracker | None] = []
    runs: list[Iterator[dict[str, Any]]] = []
    for m in members:
        if m.previous is not None:
            trackers.append(None)
            runs.append(ledger.replay(client, m.previous))
            continue
        tracker = ledger.start_child(ref, m.config, m.setting, sid, m.tags)
        trackers.append(tracker)
        runs.append(iterate_epochs(m.config, splits, teacher, device=device, tracker=tracker, log=None))
    statuses = ["running"] * len(members)
    try:
        for epoch, rows in enumerate(zip(*runs, strict=False), start=1):  # seeds share their epochs
            diverged = [row.get("status") == "diverged" for row in rows]
            vals = [chance if d else row["val_acc"] for row, d in zip(rows, diverged, strict=True)]
            report: dict[str, Any] = {"val_acc": sum(vals) / len(vals), "epoch": epoch,
                                      "setting_id": sid, "seeds_diverged": sum(diverged),
                                      "train_loss": sum(r["train_loss"] for r in rows) / len(rows)}
            last = "test_acc" in rows[0] or any(diverged)
            if last:
                tests = [chance if d else row["test_acc"] for row, d in zip(rows, diverged, strict=True)]
                report.update(test_acc=sum(tests) / len(tests), status="diverged" if any(diverged) else "finished")
                statuses = ["diverged" if d else ("finished" if "test_acc" in row else "stopped")
                            for row, d in zip(rows, diverged, strict=True)]
                # Closed before the last report: Tune may tear this process down as soon as it has it.
                for i, (tracker, status) in enumerate(zip(trackers, statuses, strict=True)):
                    if tracker is not None:
                        ledger.close_child(tracker, status)
                        trackers[i] = None
            tune.report(report)
            if last:
                break
    except SystemExit:  # Tune stops a trial (ASHA) by exiting it at its next report
        statuses = ["early_stopped" if s == "running" else s for s in statuses]
        raise
    except BaseException:
        statuses = ["error" if s == "running" else s for s in statuses]
        raise
    finally:
        for tracker, status in zip(trackers, statuses, strict=True):
            if tracker is not None:
                ledger.close_child(tracker, "early_stopped" if status == "running" else status)

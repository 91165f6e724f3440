"""What a sweep or study plans before Ray starts: how its trials run (`TrialOptions`, stored on the parent for
resume) and its fixed points, one (setting, seed) each with the checked config that runs it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from orchestrator.experiment.config import ExperimentConfig

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
    checkpoint_seconds: float = 30.0  # a trial checkpoints its runs after the first epoch this long after the last
    group_size: int = 0  # fixed points of one seed per trial (`grouped.plan_groups`); 0: auto, 1: one per trial

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialOptions:
        """From the `kdo.options` tag; keys an older ledger lacks take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass(frozen=True)
class Point:
    """One fixed run: its setting, seed, setting id, its ledger tags and the config that runs it, validated and
    checked once in the driver and never again: trials, groups and the ledger take this object (Ray pickles the
    config as it is), and nothing mutates it."""

    setting: dict[str, Any]
    seed: int
    setting_id: str
    config: ExperimentConfig  # seed and run name applied
    tags: dict[str, str] = field(default_factory=dict)

    def named(self, name: str) -> Point:
        """The same point in the sweep or study named `name` (its run name and `kdo.study` tag follow it)."""
        tags = {**self.tags, "kdo.study": name} if "kdo.study" in self.tags else self.tags
        return replace(self, config=point_config(self.config, name, self.setting_id, self.seed), tags=tags)


def point_config(cfg: ExperimentConfig, name: str, sid: str, seed: int) -> ExperimentConfig:
    """A point's config: `cfg` (validated) with its seed and the child's run name `<name>-<setting id>-s<seed>`; a
    copy, not validated again (neither changes what the schema checks)."""
    return cfg.model_copy(update={"name": f"{name}-{sid[:6]}-s{seed}",
                                  "training": cfg.training.model_copy(update={"seed": seed})})

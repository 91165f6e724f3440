"""`run(config) -> RunResult`, in two steps every wing uses: `check` (every user-caused error, no Ray, no
training) and `provision` (Ray started, data loaded, the teacher trained or fetched once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.experiment.config import ExperimentConfig, load_config, resolve_paths
from orchestrator.experiment.data import Splits, load_splits
from orchestrator.experiment.launch import RunResult, check_resources, execute, init_ray
from orchestrator.experiment.store import check_store
from orchestrator.experiment.teachers import check_teacher_checkpoint, ensure_teacher

ConfigSource = str | Path | dict[str, Any] | ExperimentConfig


def check(config: ConfigSource, overrides: list[str] | None = None, *,
          checkpoints: dict[str, dict[str, Any]] | None = None, plugins: list[str] | tuple[str, ...] = ()
          ) -> ExperimentConfig:
    """The validated config with every path and URI absolute; a given teacher checkpoint is read and checked
    against the data and the method. Never starts Ray and trains nothing; raises ConfigError (one line).
    `checkpoints` caches teacher checkpoints by source when many points share one; `plugins` join the config's."""
    cfg = resolve_paths(load_config(config, overrides or [], plugins))
    check_teacher_checkpoint(cfg, checkpoints)
    return cfg


@dataclass
class Prepared:
    """A checked config with its data and teacher, ready to launch (one per distinct data and teacher)."""

    config: ExperimentConfig
    splits: Splits
    teacher: dict[str, Any] | None


def provision(cfg: ExperimentConfig, *, address: str | None = None,
              checkpoints: dict[str, dict[str, Any]] | None = None, verbose: bool = False) -> Prepared:
    """Load the data (before Ray: a missing dataset is still a one-line error), start or join Ray (its workers'
    output forwarded only when `verbose`), and take the teacher from its checkpoint or train it once per cache
    key. Resources no node can grant are refused here."""
    splits = load_splits(cfg.data)
    teacher = check_teacher_checkpoint(cfg, checkpoints)
    assert cfg.tracking.uri is not None
    check_store(cfg.tracking.uri)
    init_ray(address, verbose=verbose, plugins=cfg.plugins)
    check_resources(cfg)  # what the cluster can never grant is an error, not a request pending for ever
    if cfg.teacher is not None and cfg.teacher.architecture is not None:
        teacher, _ = ensure_teacher(cfg, splits)
    return Prepared(cfg, splits, teacher)


def run(config: ConfigSource, overrides: list[str] | None = None, *, address: str | None = None,
        plugins: list[str] | tuple[str, ...] = ()) -> RunResult:
    """Run one experiment (a YAML path, a shipped config name, a dict or an `ExperimentConfig`); `plugins` (module
    names or paths) are imported first, here and in every Ray process."""
    checkpoints: dict[str, dict[str, Any]] = {}
    p = provision(check(config, overrides, checkpoints=checkpoints, plugins=plugins), address=address,
                  checkpoints=checkpoints)
    return execute(p.config, p.splits, p.teacher)

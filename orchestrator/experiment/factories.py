"""What the loop builds from a config: the student network, the optimizer, the learning-rate schedule, and the
autocast context of its precision."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from methods.networks import FeatureNet, build_network
from orchestrator.experiment.config import ExperimentConfig, TrainingConfig
from orchestrator.experiment.data import Splits


def make_optimizer(params: Any, cfg: TrainingConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return sched.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "multistep":
        return sched.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    return sched.LambdaLR(opt, lambda _: 1.0)


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_student(cfg: ExperimentConfig, splits: Splits) -> FeatureNet:
    info = splits.info
    return build_network(cfg.student.architecture, num_classes=info.num_classes, in_channels=info.channels,
                         image_size=info.image_size, features=cfg.student.features, **cfg.student.args)


"""Vanilla knowledge distillation: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
Network" (arXiv 1503.02531), section 2: L = ce_weight * CE(y, z_s) + kd_weight * T^2 * KL(p_t^T || p_s^T).

`logit_standardization: true` is Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024
(arXiv 2403.01427), Algorithm 1: both sides' logits are z-scored per sample (`losses.standardize_logits`) before
the softmax at the base temperature T, and the KL keeps the T^2 factor, as `kd_loss` in the authors' code
(sunshangquan/logit-standardization-KD) applies it. Where it is on, the parameters not given default to that
code's CIFAR-100 values (`tools/train.py --logit-stand`, `mdistiller/engine/cfg.py`): base temperature 2,
kd_weight 9, ce_weight 0.1.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from methods.losses import kd_kl_loss, standardize_logits
from methods.registry import Distiller, MethodParams, register

LS_DEFAULTS = {"temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1}


def fill_ls_defaults(params: MethodParams, defaults: dict[str, float]) -> None:
    """Where `params.logit_standardization` is on, give each of `defaults` not set explicitly its LS value."""
    if getattr(params, "logit_standardization", False):
        for name, value in defaults.items():
            if name not in params.model_fields_set:
                setattr(params, name, value)


class KDParams(MethodParams):
    temperature: float = Field(
        4.0, gt=0.0, le=100.0, description="softmax temperature T (mdistiller/RepDistiller default 4; "
                                           "the base temperature with logit_standardization, default 2)"
    )
    kd_weight: float = Field(
        0.9, ge=0.0, le=100.0, description="weight a of the T^2-scaled soft-target KL term (mdistiller 0.9; "
                                           "with logit_standardization 9)"
    )
    ce_weight: float | None = Field(
        None, ge=0.0, le=100.0, description="weight of the hard-label CE term; default 1 - kd_weight "
                                            "(with logit_standardization 0.1)"
    )
    logit_standardization: bool = Field(
        False, description="z-score each sample's logits before the softmax (Sun et al. 2024)"
    )

    @model_validator(mode="after")
    def _defaults(self) -> KDParams:
        fill_ls_defaults(self, LS_DEFAULTS)
        if self.ce_weight is None and self.kd_weight > 1.0:
            raise ValueError(f"method.params.ce_weight: give it when kd_weight > 1 (the default 1 - kd_weight "
                             f"would be {1.0 - self.kd_weight:g})")
        return self


@register("kd")
class KnowledgeDistillation(Distiller):
    Params = KDParams

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        ce_weight = 1.0 - p.kd_weight if p.ce_weight is None else p.ce_weight
        student_logits = self.student(x)
        teacher_logits = self.teacher_logits(x)
        ce = F.cross_entropy(student_logits.float(), y)
        if p.logit_standardization:
            kl = kd_kl_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), p.temperature)
        else:
            kl = kd_kl_loss(student_logits, teacher_logits, p.temperature)
        loss = ce_weight * ce + p.kd_weight * kl
        return loss, {"ce": ce.detach(), "kd": kl.detach()}

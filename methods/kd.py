"""Vanilla knowledge distillation: Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
Network" (arXiv 1503.02531), section 2: L = ce_weight * CE(y, z_s) + kd_weight * T^2 * KL(p_t^T || p_s^T).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from methods.losses import kd_kl_loss
from methods.registry import Distiller, MethodParams, register


class KDParams(MethodParams):
    temperature: float = Field(
        4.0, gt=0.0, le=100.0, description="softmax temperature T (mdistiller/RepDistiller default 4)"
    )
    kd_weight: float = Field(
        0.9, ge=0.0, le=1.0, description="weight a of the T^2-scaled soft-target KL term (mdistiller 0.9)"
    )
    ce_weight: float | None = Field(
        None, ge=0.0, le=1.0, description="weight of the hard-label CE term; default 1 - kd_weight"
    )


@register("kd")
class KnowledgeDistillation(Distiller):
    Params = KDParams

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        ce_weight = 1.0 - p.kd_weight if p.ce_weight is None else p.ce_weight
        student_logits = self.student(x)
        teacher_logits = self.teacher_logits(x)
        ce = F.cross_entropy(student_logits.float(), y)
        kl = kd_kl_loss(student_logits, teacher_logits, p.temperature)
        loss = ce_weight * ce + p.kd_weight * kl
        return loss, {"ce": ce.detach(), "kd": kl.detach()}

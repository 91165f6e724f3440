"""DIST: Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv 2205.10536), a kdo plugin: the method lives in this file, not in kdo.

DIST matches relations instead of exact probabilities. With p = softmax(z / T) for the student and the teacher,
it asks each image's class distribution to be linearly correlated with the teacher's (inter-class relation, a
row of the batch x classes matrix) and each class's scores over the batch likewise (intra-class relation, a
column), by the Pearson correlation rho:
  L = ce_weight * CE + beta * T^2 * (1 - mean_i rho(p_s[i], p_t[i])) + gamma * T^2 * (1 - mean_c rho(p_s[:, c], p_t[:, c]))
Defaults are the paper's CIFAR-100 ones (Table 9 / its code's `dist_t4`): T 4, beta 2, gamma 2.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from orchestrator import Distiller, MethodParams, register_method


def pearson_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - the Pearson correlation of a and b along the last dimension, averaged over the others."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    rho = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
    return 1.0 - rho.mean()


class DISTParams(MethodParams):
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature T (paper: 4 on CIFAR-100)")
    beta: float = Field(2.0, ge=0.0, le=100.0, description="weight of the inter-class relation loss")
    gamma: float = Field(2.0, ge=0.0, le=100.0, description="weight of the intra-class relation loss")
    ce_weight: float = Field(1.0, ge=0.0, le=10.0, description="weight of the cross-entropy on the labels")


@register_method("dist")
class DIST(Distiller):
    Params = DISTParams

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        logits = self.student(x).float()
        t = p.temperature
        ps = F.softmax(logits / t, dim=1)
        pt = F.softmax(self.teacher_logits(x).float() / t, dim=1)
        inter = t * t * pearson_distance(ps, pt)
        intra = t * t * pearson_distance(ps.transpose(0, 1), pt.transpose(0, 1))
        ce = F.cross_entropy(logits, y)
        loss = p.ce_weight * ce + p.beta * inter + p.gamma * intra
        return loss, {"ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}



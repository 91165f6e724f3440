"""Decoupled knowledge distillation: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022
(arXiv 2203.08679; code megvii-research/mdistiller `mdistiller/distillers/DKD.py`).

Section 3.1 splits the KD loss at temperature T with the binary probabilities b = [p_t, p_\\t] of the target
class t against the rest (Eq. 1) and the distribution p^ over the non-target classes alone (Eq. 2):
  KD = KL(b^T || b^S) + (1 - p_t^T) * KL(p^^T || p^^S) = TCKD + (1 - p_t^T) * NCKD,
whose weight (1 - p_t^T) suppresses NCKD exactly where the teacher is confident. DKD (section 3.2, Algorithm 1)
weights the two terms freely: L = ce_weight * CE + w(epoch) * (alpha * TCKD + beta * NCKD), each term T^2-scaled as
the code does (`losses.decoupled_kd_terms`). w(epoch) = min(epoch / warmup, 1) is the code's linear warm-up of the
KD terms (`min(kwargs["epoch"] / self.warmup, 1.0)`, 1-based epochs), over `warmup_epochs`, or by default over the
code's fraction of training (20 of 240 epochs on CIFAR-100) of `training.epochs`.

Defaults are the code's CIFAR-100 values (`mdistiller/engine/cfg.py`): alpha 1, beta 8, T 4, CE weight 1, warm-up
20 of 240 epochs; the per-pair configs change only beta (2 for resnet56/110 -> resnet20/32, 6 for the WRN and VGG
pairs); ImageNet uses beta 0.5, T 1, one warm-up epoch.

`logit_standardization: true` z-scores both sides' logits first (Sun et al., CVPR 2024, arXiv 2403.01427; see
`methods/kd.py`). Where it is on, the parameters not given default to that paper's code for DKD
(`tools/train.py --logit-stand --base-temp 2 --kd-weight 9`): T 2, alpha 1 * 9, beta 8 * 9.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from methods.kd import fill_ls_defaults
from methods.losses import decoupled_kd_terms, standardize_logits
from methods.registry import Distiller, LoopContext, MethodParams, register

LS_DEFAULTS = {"temperature": 2.0, "alpha": 9.0, "beta": 72.0}


class DKDParams(MethodParams):
    alpha: float = Field(1.0, ge=0.0, le=1000.0, description="weight of TCKD (code 1; with logit_standardization 9)")
    beta: float = Field(8.0, ge=0.0, le=1000.0,
                        description="weight of NCKD (code 8 for resnet32x4 -> resnet8x4; with logit_standardization "
                                    "72)")
    temperature: float = Field(4.0, gt=0.0, le=100.0,
                               description="softmax temperature T (code 4; the base temperature with "
                                           "logit_standardization, default 2)")
    ce_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of the hard-label CE term (code 1)")
    warmup_epochs: int | None = Field(
        None, ge=0.0, le=100_000, description="epochs over which the KD terms' weight rises linearly to 1; "
                                              "default warmup_fraction * training.epochs")
    warmup_fraction: float = Field(20 / 240, ge=0.0, le=1.0,
                                   description="the warm-up as a fraction of training.epochs (code 20 of 240)")
    logit_standardization: bool = Field(
        False, description="z-score each sample's logits before the softmax (Sun et al. 2024)")

    @model_validator(mode="after")
    def _defaults(self) -> DKDParams:
        fill_ls_defaults(self, LS_DEFAULTS)
        return self


def warmup_factor(epoch: int, params: DKDParams, epochs: int) -> float:
    """w at 1-based student epoch `epoch` of `epochs`: min(epoch / warm-up epochs, 1); 1 without a warm-up."""
    warmup = params.warmup_epochs if params.warmup_epochs is not None else params.warmup_fraction * epochs
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


@register("dkd")
class DecoupledKD(Distiller):
    Params = DKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: DKDParams) -> None:
        super().__init__(student, teacher, params)
        self.warmup = 1.0  # set per epoch by `start_epoch`; a bare forward call (a notebook) is past the warm-up

    def start_epoch(self, epoch: int, ctx: LoopContext) -> None:
        self.warmup = warmup_factor(epoch, self.params, ctx.epochs)

    def epoch_metrics(self) -> dict[str, float]:
        return {"dkd/warmup": float(self.warmup)}

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        student_logits = self.student(x)
        teacher_logits = self.teacher_logits(x)
        ce = F.cross_entropy(student_logits.float(), y)
        if p.logit_standardization:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        tckd, nckd = decoupled_kd_terms(student_logits, teacher_logits, y, p.temperature)
        loss = p.ce_weight * ce + self.warmup * (p.alpha * tckd + p.beta * nckd)
        return loss, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}

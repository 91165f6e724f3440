"""Cross-entropy baseline: the student trained alone on the labels (no teacher needed)."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from methods.registry import Distiller, MethodParams, register


class CEParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing of the CE target")


@register("ce")
class CrossEntropy(Distiller):
    Params = CEParams
    needs_teacher = False

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.student(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.params.label_smoothing)
        return loss, {"ce": loss.detach()}

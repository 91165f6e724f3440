"""Loss functions shared by several methods."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# Added to the standard deviation before dividing, as `normalize` in sunshangquan/logit-standardization-KD.
LOGIT_STD_EPS = 1e-7


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax_T(teacher) || softmax_T(student)), batch mean.

    The T^2 factor keeps the soft term's gradient magnitude comparable across temperatures (its
    gradient scales as 1/T^2 otherwise). Computed in fp32 because log_softmax in bf16 loses the
    small probabilities that carry the dark knowledge.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def standardize_logits(logits: Tensor) -> Tensor:
    """Sun et al. 2024 (arXiv 2403.01427), the Z-score pre-process: each sample's logits minus their mean over
    the classes, divided by their standard deviation plus `LOGIT_STD_EPS`, in fp32.

    The standard deviation is torch's default (unbiased, n - 1), as the authors' code computes it; the paper
    writes the biased one. The two differ by the constant sqrt(C / (C - 1)), a rescaled temperature.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + LOGIT_STD_EPS)


"""Loss functions shared by several methods."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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

"""Loss functions shared by several methods."""

from __future__ import annotations

import torch
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


def decoupled_kd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                       temperature: float) -> tuple[Tensor, Tensor]:
    """Zhao et al. 2022 (arXiv 2203.08679): (TCKD, NCKD), each T^2-scaled and a batch mean, in fp32.

    TCKD = KL(b_t || b_s) over the binary distribution b = [p_target, 1 - p_target] at temperature T;
    NCKD = KL(p^_t || p^_s) over the softmax_T of the non-target logits alone (the target class removed, not
    merely given a tiny probability). Log-probabilities throughout, so neither term overflows where mdistiller's
    `torch.log` of a probability would.
    """
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    is_target = F.one_hot(target, s.shape[1]).bool()
    log_ps, log_pt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)

    def binary(log_p: Tensor) -> Tensor:  # [log p_target, log (1 - p_target)] per sample
        others = log_p.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_p[is_target], others], dim=1)

    tckd = F.kl_div(binary(log_ps), binary(log_pt), reduction="batchmean", log_target=True)
    shape = (s.shape[0], s.shape[1] - 1)  # a boolean mask keeps each row's non-target logits in order
    nckd = F.kl_div(F.log_softmax(s[~is_target].view(shape), dim=1),
                    F.log_softmax(t[~is_target].view(shape), dim=1), reduction="batchmean", log_target=True)
    return tckd * temperature**2, nckd * temperature**2

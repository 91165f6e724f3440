"""LSHFM: Wang, Ge, Wu, "Distilling Knowledge by Mimicking Features" (arXiv 2011.01424, TPAMI 2022; code
DoctorKey/LSHFM.singleclassification `distiller_zoo/LSH.py`, `L2.py`, `train_student.py`).

The student mimics the teacher's penultimate feature f_t in R^D (after ReLU and global pooling):
- L_mse = mean over batch and D of (f_s - f_t)^2 (switch `with_l2`).
- LSH: a frozen projection W in R^{N x D}, W_ij ~ N(0, sigma^2), and a frozen bias b in R^N; teacher codes
  h = 1[W f_t + b > 0]; L_lsh = mean over batch and N of BCEWithLogits(W f_s + b, h), in fp32.
- L = ce_weight * CE + kd_weight * T^2 * KL(T) + feature_weight * (L_mse + L_lsh) (code defaults 1, 0, beta=6).
- `correct_only` (the code's default `lshl2_s`): the per-sample (L_mse + L_lsh) is averaged only over the samples
  the teacher classifies correctly.
- If the student's feature width d differs from D, a linear raw->D layer (`feat_fc`, no activation) is inserted
  and a new classifier D->classes sits on top ("2FC"). Both are linear, so `inference_student()` folds them into the
  student's own classifier: the evaluated/checkpointed network is a plain student architecture.
W and b are buffers (checkpointed with the distiller, never optimized or weight-decayed). `sigma` defaults to the
std of the teacher classifier's weights; `bias` is zero, or minus the mean / median over one teacher pass of the
un-augmented training set of (W f_t)_j (median: each bit ~50% on). N = `lsh_bits`, or `lsh_bits_per_dim` * D
(default 32 D, the CIFAR code default), capped by `max_projection_mib`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from methods.feature_utils import fold_linear, write_classifier
from methods.losses import kd_kl_loss
from methods.networks import FeatureNet
from methods.registry import Distiller, LoopContext, MethodParams, register

DEFAULT_BITS_PER_DIM = 32


class LSHParams(MethodParams):
    lsh_bits: int | None = Field(None, ge=1, le=1 << 24, description="number of hash bits N (absolute)")
    lsh_bits_per_dim: float | None = Field(
        None, gt=0.0, le=1024.0, description="N as a multiple of the teacher feature width D (default 32, CIFAR)")
    feature_weight: float = Field(6.0, ge=0.0, le=1000.0, description="beta on L_mse + L_lsh (CIFAR-100 6)")
    bias: Literal["zero", "mean", "median"] = Field(
        "median", description="hash bias b: 0, or -mean / -median of W f_t over the training set (CIFAR median)")
    sigma: float | None = Field(
        None, gt=0.0, le=100.0, description="std sigma of W; default the std of the teacher classifier's weights")
    with_l2: bool = Field(True, description="add the L2 feature loss L_mse (LSHL2)")
    correct_only: bool = Field(True, description="average the feature losses over teacher-correct samples (_s)")
    kd_weight: float = Field(0.0, ge=0.0, le=10.0, description="a on the T^2-scaled KL term (code default 0)")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="KD temperature T (code 4)")
    ce_weight: float = Field(1.0, ge=0.0, le=10.0, description="g on the hard-label CE (code 1)")
    max_projection_mib: float = Field(
        512.0, gt=0.0, le=65536.0, description="cap on the size of W (N x D fp32) in MiB")

    @model_validator(mode="after")
    def _one_bits(self) -> LSHParams:
        if self.lsh_bits is not None and self.lsh_bits_per_dim is not None:
            raise ValueError("give one of lsh_bits and lsh_bits_per_dim, not both")
        return self

    def bits(self, feature_dim: int) -> int:
        if self.lsh_bits is not None:
            return self.lsh_bits
        per_dim = DEFAULT_BITS_PER_DIM if self.lsh_bits_per_dim is None else self.lsh_bits_per_dim
        return max(1, round(per_dim * feature_dim))


def lsh_loss(student_feature: Tensor, codes: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-sample mean over bits of BCEWithLogits(W f_s + b, h), in fp32."""
    logits = student_feature.float() @ weight.float().t() + bias.float()
    return F.binary_cross_entropy_with_logits(logits, codes, reduction="none").mean(1)


@register("lsh")
class LSHFeatureMimicking(Distiller):
    Params = LSHParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: LSHParams) -> None:
        super().__init__(student, teacher, params)
        assert isinstance(student, FeatureNet) and isinstance(teacher, FeatureNet)
        dim = teacher.feature_dim
        sigma = params.sigma if params.sigma is not None else float(teacher.classifier.weight.detach().float().std())
        self.sigma = sigma
        self.register_buffer("projection", torch.randn(params.bits(dim), dim) * sigma)
        self.register_buffer("bias", torch.zeros(params.bits(dim)))
        self.feat_fc: nn.Linear | None = None
        self.head: nn.Linear | None = None
        if student.feature_dim != dim:
            # 2FC: raw -> D (no activation), then a new classifier; the student's own one is rewritten at inference.
            self.feat_fc = nn.Linear(student.feature_dim, dim)
            self.head = nn.Linear(dim, student.classifier.out_features)
            student.classifier.requires_grad_(False)

    @classmethod
    def check_setup(cls, params: LSHParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        if not isinstance(teacher, FeatureNet) or not isinstance(student, FeatureNet):
            raise ValueError("method.params: lsh needs zoo networks with a penultimate feature")
        dim = teacher.feature_dim
        bits = params.bits(dim)
        mib = bits * dim * 4 / 2**20
        if mib > params.max_projection_mib:
            raise ValueError(f"method.params.lsh_bits: N={bits} bits x D={dim} makes a {mib:.0f} MiB projection, "
                             f"over max_projection_mib={params.max_projection_mib:g}; lower lsh_bits/lsh_bits_per_dim")

    @torch.no_grad()
    def setup(self, ctx: LoopContext) -> None:
        p = self.params
        ctx.log({"lsh/bits": float(self.projection.shape[0]), "lsh/sigma": self.sigma}, 0)
        if p.bias == "zero":
            return
        feats = torch.cat([self.teacher(x, features=True)[1]["penultimate"].float()
                           for x, _ in ctx.clean_batches(1024)])
        for start in range(0, self.projection.shape[0], 1024):  # chunks keep N_train x N bounded
            proj = feats @ self.projection[start:start + 1024].t()
            center = proj.median(dim=0).values if p.bias == "median" else proj.mean(dim=0)
            self.bias[start:start + 1024] = -center
        codes = (feats @ self.projection.t() + self.bias > 0).float()
        ctx.log({"lsh/teacher_bit_on_rate": float(codes.mean())}, 0)

    def student_feature(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, f_s): the student's penultimate, through feat_fc when its width differs from D."""
        logits, feats = self.student(x, features=True)
        feature = feats["penultimate"]
        if self.feat_fc is not None:
            assert self.head is not None
            feature = self.feat_fc(feature)
            logits = self.head(feature)
        return logits, feature

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        logits, feature = self.student_feature(x)
        with torch.no_grad():
            teacher_logits, teacher_feats = self.teacher_features(x)
            target = teacher_feats["penultimate"].float()
            codes = (target @ self.projection.float().t() + self.bias.float() > 0).float()
        per_sample = lsh_loss(feature, codes, self.projection, self.bias)
        parts: dict[str, Tensor] = {}
        lsh_mean = per_sample.mean()
        if p.with_l2:
            mse = (feature.float() - target).pow(2).mean(1)
            per_sample = per_sample + mse
            parts["mse"] = mse.mean().detach()
        if p.correct_only:
            keep = (teacher_logits.argmax(1) == y).float()
            feature_loss = (per_sample * keep).sum() / keep.sum().clamp_min(1.0)
        else:
            feature_loss = per_sample.mean()
        ce = F.cross_entropy(logits.float(), y)
        loss = p.ce_weight * ce + p.feature_weight * feature_loss
        parts.update(ce=ce.detach(), lsh=lsh_mean.detach(), feature=feature_loss.detach())
        if p.kd_weight > 0:
            kl = kd_kl_loss(logits, teacher_logits, p.temperature)
            loss = loss + p.kd_weight * kl
            parts["kd"] = kl.detach()
        return loss, parts

    def inference_student(self) -> nn.Module:
        if self.feat_fc is None:
            return self.student
        assert self.head is not None
        return write_classifier(self.student, *fold_linear(self.feat_fc, self.head))

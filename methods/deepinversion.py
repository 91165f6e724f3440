"""DeepInversion / ADI: Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion",
CVPR 2020 (arXiv 1912.08795), following NVlabs/DeepInversion `cifar10/deepinversion_cifar10.py` (docs/METHODS.md
section 7). A batch x ~ N(0, 1) with balanced labels y is optimized against the frozen teacher (eval mode):
    L(x) = CE(T(x~), y) + a_f * sum_l (||mu_l - mu_l^BN||_2 + ||var_l - var_l^BN||_2)   (DI: the BN prior)
           + a_tv * TV_L2(x~) + a_l2 * ||x~||_2 [+ a_c * (1 - JS_3(p_T, p_S))]        (image priors; ADI)
x~ = x rolled by up to +-`jitter` pixels (and flipped if `flip`); mu_l, var_l are the batch statistics of each
BN layer's *input* (forward hooks); TV_L2 sums the L2 norms of the 4 neighbour-difference maps; the ADI term is
the Jensen-Shannon divergence at T=3 with probabilities clamped to [0.01, 0.99]. Images are clipped to the valid
pixel range after each step.

Ours, not the paper's (docs/METHODS.md marks it [choice]): the compact data-free KD loop. Each student epoch first
synthesizes `synthesis_batches` batches against the current student (matters for ADI) into a pool that keeps the
newest `pool_size` images, then runs `iterations_per_epoch` student steps on random pool batches with
T^2 * KL(softmax_T(teacher) || softmax_T(student)) at T = 4. `first_bn_multiplier` (ImageNet code: 10) and
`flip` (ImageNet only) are named switches; the image optimizer is Adam with default betas.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from methods.datafree import DataFreeDistiller, DataFreeParams
from methods.networks import has_batchnorm
from methods.registry import LoopContext, MethodParams, register


class DeepInversionParams(DataFreeParams):
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="student KD temperature T (compact loop: 4)")
    bn_weight: float = Field(10.0, ge=0.0, le=1e4, description="a_f on the BN-statistics loss (CIFAR-10: 10)")
    first_bn_multiplier: float = Field(1.0, ge=0.0, le=1e3,
                                       description="extra factor on the first BN layer's term (ImageNet code 10)")
    tv_weight: float = Field(2.5e-5, ge=0.0, le=1e3, description="a_tv on the TV-L2 prior (CIFAR-10: 2.5e-5)")
    l2_weight: float = Field(0.0, ge=0.0, le=1e3, description="a_l2 on ||x|| (CIFAR-10: 0; ImageNet 1e-5)")
    competition_weight: float = Field(0.0, ge=0.0, le=1e3,
                                      description="a_c of ADI's competition term; 0 = plain DeepInversion")
    competition_temperature: float = Field(3.0, gt=0.0, le=100.0, description="temperature of ADI's JS (3)")
    generator_lr: float = Field(0.05, gt=0.0, le=1e3, description="Adam lr on the images (CIFAR-10: 0.05)")
    synthesis_iterations: int = Field(2000, ge=1, le=1_000_000,
                                      description="optimization steps per synthesized batch (CIFAR-10: 2000)")
    jitter: int = Field(2, ge=0, le=512, description="max random roll in pixels (CIFAR-10: 2)")
    flip: bool = Field(False, description="random horizontal flip of x~ (ImageNet code only)")
    synthesis_batches: int = Field(1, ge=1, le=10_000, description="batches added to the pool per student epoch")
    pool_size: int = Field(100_000, ge=1, le=100_000_000, description="newest pool images kept (ours)")


def bn_statistics_loss(module: _BatchNorm, inputs: Tensor) -> Tensor:
    """||mu - running_mean||_2 + ||var - running_var||_2 of a BN layer's input batch (biased variance)."""
    x = inputs.float()
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    return (torch.linalg.vector_norm(var - module.running_var.float())
            + torch.linalg.vector_norm(mean - module.running_mean.float()))


@contextmanager
def bn_hooks(model: nn.Module) -> Iterator[list[Tensor]]:
    """While active, every forward of `model` appends each BN layer's statistics loss (in layer order)."""
    losses: list[Tensor] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: losses.append(bn_statistics_loss(mod, inp[0])))
               for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()


def total_variation_l2(x: Tensor) -> Tensor:
    """Sum of the L2 norms of the 4 neighbour differences (right, down, and the two diagonals)."""
    return (torch.linalg.vector_norm(x[:, :, :, :-1] - x[:, :, :, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.linalg.vector_norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def competition_loss(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """ADI: 1 - clamp(JS(p_S, p_T), 0, 1) at `temperature`, probabilities clamped to [0.01, 0.99] as the code."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


class ImagePool:
    """DeepInversion's synthesizer: batches optimized against the teacher (and student for ADI), pooled."""

    def __init__(self, teacher: nn.Module, student: nn.Module, params: DeepInversionParams, *,
                 image_shape: tuple[int, int, int], num_classes: int, batch_size: int, device: torch.device,
                 pixel_range: tuple[Tensor, Tensor] | None) -> None:
        self.teacher, self.student, self.params = teacher, student, params
        self.image_shape, self.num_classes, self.batch_size, self.device = image_shape, num_classes, batch_size, device
        self.pixel_range = pixel_range
        self.images = torch.empty(0, *image_shape, device=device)

    def _view(self, x: Tensor) -> Tensor:
        p = self.params
        if p.jitter:
            dy, dx = torch.randint(-p.jitter, p.jitter + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if p.flip and torch.rand(()) < 0.5:
            x = x.flip(3)
        return x

    def _clip(self, x: Tensor) -> None:
        if self.pixel_range is not None:
            low, high = self.pixel_range
            x.data = torch.maximum(torch.minimum(x.data, high), low)

    def synthesize(self) -> dict[str, Tensor]:
        p = self.params
        x = torch.randn(self.batch_size, *self.image_shape, device=self.device, requires_grad=True)
        y = torch.arange(self.batch_size, device=self.device) % self.num_classes
        optimizer = torch.optim.Adam([x], lr=p.generator_lr)
        student_mode = self.student.training
        self.student.eval()
        parts: dict[str, Tensor] = {}
        with bn_hooks(self.teacher) as bn_losses:
            for _ in range(p.synthesis_iterations):
                view = self._view(x)
                bn_losses.clear()
                logits = self.teacher(view)
                ce = F.cross_entropy(logits.float(), y)
                bn = bn_losses[0] * p.first_bn_multiplier + sum(bn_losses[1:], torch.zeros((), device=x.device))
                tv = total_variation_l2(view)
                l2 = torch.linalg.vector_norm(view)
                loss = ce + p.bn_weight * bn + p.tv_weight * tv + p.l2_weight * l2
                parts = {"ce": ce, "bn": bn, "tv": tv, "l2": l2}
                if p.competition_weight > 0:
                    comp = competition_loss(logits, self.student(view), p.competition_temperature)
                    loss = loss + p.competition_weight * comp
                    parts["competition"] = comp
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self._clip(x)
        self.student.train(student_mode)
        self.images = torch.cat([self.images, x.detach()])[-p.pool_size:]
        return {"total": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = state["images"].to(self.device)

    def sample(self, batch_size: int) -> Tensor:
        index = torch.randint(0, self.images.shape[0], (batch_size,), device=self.device)
        return self.images[index]


@register("deepinversion")
class DeepInversion(DataFreeDistiller):
    Params = DeepInversionParams
    synthesis_modules = ()  # the pool holds plain tensors; nothing of the distiller is excluded

    @classmethod
    def check_setup(cls, params: MethodParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        super().check_setup(params, student=student, teacher=teacher, num_workers=num_workers)
        if teacher is not None and not has_batchnorm(teacher):
            raise ValueError("teacher.architecture: deepinversion matches BatchNorm statistics but the teacher has "
                             "no BatchNorm layer; use one that has (e.g. lenet5_bn, cnn, resnet20)")

    def setup(self, ctx: LoopContext) -> None:
        p = self.params
        assert isinstance(p, DeepInversionParams) and self.teacher is not None
        pixel_range = None
        if ctx.data_mean and ctx.data_std:
            mean = torch.tensor(ctx.data_mean, device=ctx.device).view(1, -1, 1, 1)
            std = torch.tensor(ctx.data_std, device=ctx.device).view(1, -1, 1, 1)
            pixel_range = ((0.0 - mean) / std, (1.0 - mean) / std)
        self.synthesizer = ImagePool(self.teacher, self.student, p, image_shape=ctx.image_shape,
                                     num_classes=ctx.num_classes, batch_size=ctx.batch_size, device=ctx.device,
                                     pixel_range=pixel_range)

    def synthesis_due(self, epoch: int, iteration: int) -> bool:
        return iteration < self.params.synthesis_batches  # type: ignore[attr-defined]

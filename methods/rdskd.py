"""RDSKD: Han, Park, Wang, Liu, "Robustness and Diversity Seeking Data-Free Knowledge Distillation",
ICASSP 2021 (arXiv 2011.03749). Formulas follow the official code PengchaoHan/RDSKD (docs/METHODS.md section 5):

Generator phase (`generator-train.py`), per iteration, with x = G(z) split into halves x1, x2:
    L_G = lam_oh * exp(L_oh - L~_oh) + lam_ie * exp(L_ie - L~_ie) + lam_ds * L_ds
    L_oh = CE(o, argmax o); L_ie = sum_k pbar_k ln pbar_k (natural log); L_ds = ||p2 - p1|| / ||x2 - x1||
L~ are detached snapshots, 0 at the start, refreshed with the current iteration's values whenever the global
generator iteration g satisfies g = 1 (mod snapshot_interval): the code's `if i == 1` in epochs of 120
iterations. d exp(L - L~)/dL = exp(L - L~): increases are amplified, decreases damped.
Student phase (`student-train.py`): G frozen in eval mode, a fresh batch x = G(z) per step,
L_S = T^2 * KL(softmax_T(teacher(x)) || softmax_T(student(x))) with T = 10.

Ours, not the paper's: lam_oh, lam_ie, lam_ds (default 1 = pure RDSKD) are optional named weights for the
robustness protocol. Everything runs in fp32 without a clamp: an overflow (inf/nan) in the generator phase makes
the first student epoch's `gen/*` metrics non-finite, so the loop ends the run as `diverged`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from methods.datafree import (
    DataFreeDistiller,
    DataFreeParams,
    GeneratorSynthesizer,
    diversity_loss,
    mean_entropy_loss,
    onehot_loss,
)
from methods.generators import DAFLGenerator
from methods.registry import LoopContext, register


class RDSKDParams(DataFreeParams):
    temperature: float = Field(10.0, gt=0.0, le=100.0, description="student KD temperature T (code: 10)")
    generator_lr: float = Field(1e-3, gt=0.0, le=10.0,
                                description="lr_G of the generator's Adam (code 1e-3; sweep [1e-4, 1e-1])")
    generator_epochs: int = Field(20, ge=1, le=100_000, description="generator-phase epochs (code 20)")
    snapshot_interval: int = Field(120, ge=1, le=1_000_000,
                                   description="refresh period of the detached snapshots L~_oh, L~_ie (code 120)")
    latent_dim: int = Field(100, ge=1, le=100_000, description="dimension of z (code 100)")
    base_channels: int = Field(128, ge=2, le=4096, description="generator width C0 (code 128)")
    onehot_weight: float = Field(1.0, ge=0.0, le=100.0, description="lam_oh on exp(L_oh - L~_oh) (ours; 1 = RDSKD)")
    entropy_weight: float = Field(1.0, ge=0.0, le=100.0, description="lam_ie on exp(L_ie - L~_ie) (ours; 1 = RDSKD)")
    diversity_weight: float = Field(1.0, ge=0.0, le=100.0, description="lam_ds on L_ds (ours; 1 = RDSKD)")


class RDSKDGeneratorLoss:
    """L_G with the detached snapshots; call once per generator iteration (it counts the iterations)."""

    def __init__(self, params: RDSKDParams) -> None:
        self.params = params
        self.iteration = 0
        self.onehot_reference: Tensor | float = 0.0
        self.entropy_reference: Tensor | float = 0.0

    def refreshes_at(self, iteration: int) -> bool:
        return iteration % self.params.snapshot_interval == 1 % self.params.snapshot_interval

    def __call__(self, images: Tensor, logits: Tensor, features: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        oh = onehot_loss(logits)
        ie = mean_entropy_loss(logits)  # natural log, as RDSKD's code
        ds = diversity_loss(images, logits)
        total = (p.onehot_weight * torch.exp(oh - self.onehot_reference)
                 + p.entropy_weight * torch.exp(ie - self.entropy_reference) + p.diversity_weight * ds)
        if self.refreshes_at(self.iteration):
            self.onehot_reference, self.entropy_reference = oh.detach(), ie.detach()
        self.iteration += 1
        return total, {"onehot": oh.detach(), "entropy": ie.detach(), "diversity": ds.detach()}


@register("rdskd")
class RDSKD(DataFreeDistiller):
    Params = RDSKDParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: RDSKDParams) -> None:
        super().__init__(student, teacher, params)
        self._frozen = False
        self._phase_means: dict[str, float] = {}

    def setup(self, ctx: LoopContext) -> None:
        """The generator phase: `generator_epochs` x `iterations_per_epoch` steps of L_G, logged per epoch."""
        p = self.params
        assert isinstance(p, RDSKDParams) and self.teacher is not None
        self.generator = DAFLGenerator(p.latent_dim, ctx.image_shape, p.base_channels).to(ctx.device)
        self.generator_loss = RDSKDGeneratorLoss(p)
        synthesizer = GeneratorSynthesizer(self.generator, self.teacher, self.generator_loss, lr=p.generator_lr,
                                           batch_size=ctx.batch_size, reuse_last=False)
        self.synthesizer = synthesizer
        for epoch in range(1, p.generator_epochs + 1):
            for _ in range(p.iterations_per_epoch):
                self.record(synthesizer.synthesize())
            self._phase_means = self.pop_means()
            ctx.log({f"generator/{k}": v for k, v in self._phase_means.items()}, epoch)
            if not all(math.isfinite(v) for v in self._phase_means.values()):
                break  # diverged: the first student epoch reports it
        self.generator.requires_grad_(False)
        self._frozen = True
        self.generator.eval()
        ctx.log_images(synthesizer.sample(64), "samples/epoch_0000.png")

    def train(self, mode: bool = True) -> RDSKD:
        super().train(mode)
        if self._frozen:  # G stays in eval mode (running BN statistics) for the whole student phase
            self.generator.eval()
        return self

    def load_method_state(self, state: dict[str, Any]) -> None:
        super().load_method_state(state)
        self._phase_means = {}  # reported with student epoch 1, before the state was saved: not again on resume

    def epoch_metrics(self) -> dict[str, float]:
        """The generator phase's last-epoch means, once, with the first student epoch."""
        phase, self._phase_means = self._phase_means, {}
        return {f"gen/{k}": v for k, v in phase.items()}

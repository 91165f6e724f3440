"""The data-free seam: a synthesizer (generator or optimized image pool) feeds the student steps.

`DataFreeDistiller` yields `(sample, None)` batches drawn from its synthesizer and never reads a real
training image; the loop still evaluates on val/test. Shared losses of DAFL (arXiv 1904.01186)
and RDSKD (arXiv 2011.03749) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from methods.generators import DAFLGenerator
from methods.losses import kd_kl_loss
from methods.registry import Distiller, LoopContext, MethodParams

GeneratorLoss = Callable[[Tensor, Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


class Synthesizer(Protocol):
    """Where a data-free student's inputs come from."""

    def synthesize(self) -> dict[str, Tensor]:
        """One update of the generator (or one optimized batch for the pool); its detached loss parts."""
        ...

    def sample(self, batch_size: int) -> Tensor:
        """Inputs for one student step, in the normalized image space, without a graph."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue synthesizing (optimizer state, kept images)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------- losses
def onehot_loss(logits: Tensor) -> Tensor:
    """L_oh = CE(o, argmax o): the teacher should be confident on generated images (DAFL's one-hot loss)."""
    logits = logits.float()
    return F.cross_entropy(logits, logits.detach().argmax(dim=1))


def mean_entropy_loss(logits: Tensor, base: float = math.e) -> Tensor:
    """L_ie = sum_k pbar_k log pbar_k with pbar the batch-mean softmax: the negative entropy of the mean
    prediction, minimal (-log K) when classes are balanced (DAFL's information entropy). RDSKD uses ln,
    DAFL's code log10.
    `xlogy` gives 0 for an underflowed pbar_k = 0 where p*log(p) would give NaN."""
    mean = F.softmax(logits.float(), dim=1).mean(dim=0)
    return torch.xlogy(mean, mean).sum() / math.log(base)


def activation_loss(features: Tensor) -> Tensor:
    """L_a = -mean |f_T| (DAFL's activation loss, -(1/n) sum_i ||f_T^i||_1 up to the feature dimension)."""
    return -features.float().abs().mean()


def diversity_loss(images: Tensor, logits: Tensor) -> Tensor:
    """RDSKD's L_ds = ||p(x2) - p(x1)||_F / ||x2 - x1||_F over the two halves of the batch.

    The reference computes 1 / (lz + 1e-20) with lz = ||x2 - x1|| / ||p2 - p1||; we write the same value as
    dp / (dx + 1e-20 * dp), which never divides by dp, so p2 = p1 gives 0 (not NaN) and a finite gradient.
    The tiny floor keeps x2 = x1 and p2 = p1 together finite as well (0).
    """
    half = images.shape[0] // 2
    probs = F.softmax(logits.float(), dim=1)
    dx = torch.linalg.vector_norm(images[half:2 * half].float() - images[:half].float())
    dp = torch.linalg.vector_norm(probs[half:2 * half] - probs[:half])
    return dp / (dx + 1e-20 * dp + torch.finfo(torch.float32).tiny)


# ------------------------------------------------------------------------------------- synthesizer
class GeneratorSynthesizer:
    """A DAFL generator trained against the frozen teacher with a method's loss `L_G(x, logits, features)`.

    `synthesize()` draws z ~ N(0, I), runs G in train mode and the teacher in eval mode, and steps G's own
    Adam on L_G; the batch it made is kept (DAFL trains the student on exactly those images). `sample()`
    returns that batch when `reuse_last` (DAFL), else a fresh batch from G in its current mode (RDSKD freezes
    G in eval mode for the student phase). Runs in fp32: the losses hold exponentials and logarithms.
    """

    def __init__(self, generator: DAFLGenerator, teacher: nn.Module, loss: GeneratorLoss, *, lr: float,
                 batch_size: int, reuse_last: bool) -> None:
        self.generator = generator
        self.teacher = teacher
        self.loss = loss
        self.batch_size = batch_size
        self.reuse_last = reuse_last
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        self.last: Tensor | None = None

    def _latent(self, n: int) -> Tensor:
        device = next(self.generator.parameters()).device
        return torch.randn(n, self.generator.latent_dim, device=device)

    def synthesize(self) -> dict[str, Tensor]:
        self.generator.train()
        images = self.generator(self._latent(self.batch_size))
        logits, feats = self.teacher(images, features=True)
        loss, parts = self.loss(images, logits, feats)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last = images.detach()
        return {"total": loss.detach(), **parts}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.last = state["last"]

    @torch.no_grad()
    def sample(self, batch_size: int) -> Tensor:
        if self.reuse_last and self.last is not None:
            return self.last
        return self.generator(self._latent(batch_size))


# ---------------------------------------------------------------------------------------- distiller
class DataFreeParams(MethodParams):
    """The knobs every data-free method has: the student's KD temperature (each method restates its paper's
    default) and the student steps per epoch on synthesized batches."""

    temperature: float = Field(4.0, gt=0.0, le=100.0, description="student KD temperature T")
    iterations_per_epoch: int = Field(120, ge=1, le=1_000_000, description="student steps per epoch (code: 120)")


class DataFreeDistiller(Distiller):
    """A distiller whose batches come from `self.synthesizer` (built in `setup`), never from real data.

    Subclasses set `self.synthesizer` in `setup` and say, through `synthesis_due`, when `batches` should
    call `synthesize()`. Parameters of modules named in `synthesis_modules` (the generator) are trained
    by the synthesizer's own optimizer and left out of `optimized_parameters`. The student loss is
    temperature KD on the sample: T^2 * KL(softmax_T(teacher) || softmax_T(student)).
    """

    data_free = True
    groupable = False  # its batches come from its own generator
    synthesis_modules: tuple[str, ...] = ("generator",)

    params: DataFreeParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: DataFreeParams) -> None:
        super().__init__(student, teacher, params)
        self.synthesizer: Synthesizer | None = None
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    @classmethod
    def check_setup(cls, params: MethodParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        if num_workers > 1:
            raise ValueError(f"scaling.num_workers: data-free method '{getattr(cls, 'method_name', cls.__name__)}' "
                             f"runs on 1 worker (generator updates are not synchronised across DDP ranks); "
                             f"got {num_workers}")

    def synthesis_due(self, epoch: int, iteration: int) -> bool:
        """Whether `batches` calls `synthesize()` before student step `iteration` (0-based) of `epoch`."""
        return False

    def record(self, parts: dict[str, Tensor]) -> None:
        """Add one synthesis step's loss parts to this epoch's means (`gen/<part>` in `epoch_metrics`)."""
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._count += 1

    def pop_means(self) -> dict[str, float]:
        means = {name: float(total) / self._count for name, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means

    def epoch_metrics(self) -> dict[str, float]:
        return {f"gen/{name}": value for name, value in self.pop_means().items()}

    def batches(self, epoch: int, ctx: LoopContext) -> Iterator[tuple[Tensor, None]]:
        assert self.synthesizer is not None, "setup() builds the synthesizer"
        log_epochs = {1, (ctx.epochs + 1) // 2, ctx.epochs}
        for iteration in range(self.params.iterations_per_epoch):
            if self.synthesis_due(epoch, iteration):
                self.record(self.synthesizer.synthesize())
            x = self.synthesizer.sample(ctx.batch_size)
            if iteration == 0 and epoch in log_epochs:
                ctx.log_images(x[:64], f"samples/epoch_{epoch:04d}.png")
            yield x, None

    def method_state(self) -> dict[str, Any]:
        return {"synthesizer": self.synthesizer.state_dict()} if self.synthesizer is not None else {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        if self.synthesizer is not None and "synthesizer" in state:
            self.synthesizer.load_state_dict(state["synthesizer"])

    def optimized_parameters(self) -> list[nn.Parameter]:
        excluded = {id(p) for name in self.synthesis_modules if hasattr(self, name)
                    for p in getattr(self, name).parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in excluded]

    def forward(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        kd = kd_kl_loss(self.student(x), self.teacher_logits(x), self.params.temperature)
        return kd, {"kd": kd.detach()}

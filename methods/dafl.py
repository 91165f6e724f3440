"""DAFL: Chen et al., "Data-Free Learning of Student Networks", ICCV 2019 (arXiv 1904.01186), following
`DAFL-train.py` of huawei-noah/Data-Efficient-Model-Compression (docs/METHODS.md section 7); the paper's
one-hot, activation and information-entropy losses and their weighted sum (section 3) as the code writes them.

Each iteration draws x = G(z) (the generator of section 5, in train mode) and
    L_G = l_oh * L_oh + alpha * L_a + beta * L_ie
    L_oh = CE(y_T, argmax y_T); L_a = -mean |f_T|; L_ie = sum_k pbar_k log10 pbar_k (log10 as in the code)
with f_T the teacher's features at `activation_layer`, and the student loss KL(softmax(y_T) || softmax(y_S)) at T = 1 on
x.detach(). The reference does one backward of L_G + L_KD and steps G and S; as L_KD reads x.detach() and L_G
does not touch S, stepping G on L_G (synthesize) and then S on L_KD over the same batch is the same update.

f_T: the reference LeNet-5 returns `feature = relu(conv3(x)).view(-1, 120)`, the 120-unit conv3 output that feeds
its FC layers (not the 84-unit FC output); its ResNets return the pooled features that feed the classifier. So
`activation_layer: auto` reads `stage3` of a LeNet-5 teacher and `penultimate` (the classifier's input) of any
other; a stage name or `penultimate` picks a layer explicitly.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from methods.datafree import (
    DataFreeDistiller,
    DataFreeParams,
    GeneratorSynthesizer,
    activation_loss,
    mean_entropy_loss,
    onehot_loss,
)
from methods.generators import DAFLGenerator
from methods.networks import FeatureNet, LeNet5
from methods.registry import LAYER, LoopContext, MethodParams, register


class DAFLParams(DataFreeParams):
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="student KD temperature T (code: 1)")
    onehot_weight: float = Field(1.0, ge=0.0, le=100.0, description="l_oh on the one-hot loss (MNIST 1)")
    activation_weight: float = Field(0.1, ge=0.0, le=100.0, description="alpha on the activation loss (MNIST 0.1)")
    entropy_weight: float = Field(5.0, ge=0.0, le=1000.0,
                                  description="beta on the information-entropy loss (MNIST 5)")
    generator_lr: float = Field(0.2, gt=0.0, le=10.0, description="lr_G of the generator's Adam (MNIST 0.2)")
    latent_dim: int = Field(100, ge=1, le=100_000, description="dimension of z (MNIST 100, CIFAR 1000)")
    base_channels: int = Field(128, ge=2, le=4096, description="generator width C0 (code 128)")
    activation_layer: str = Field(
        "auto", description="teacher feature f_T of the activation loss: a stage name, 'penultimate', or 'auto' "
                            "(LeNet-5: stage3, the 120-unit conv3 output as DAFL's code; others: penultimate)",
        json_schema_extra=LAYER)


def activation_layer(teacher: nn.Module, spec: str) -> str:
    """The feature name `activation_layer: spec` reads on `teacher` (see the module docstring)."""
    if spec == "auto":
        return "stage3" if isinstance(teacher, LeNet5) else "penultimate"
    allowed = [*teacher.stage_names, "penultimate"] if isinstance(teacher, FeatureNet) else ["penultimate"]
    if spec not in allowed:
        raise ValueError(f"method.params.activation_layer: unknown layer '{spec}'; allowed: auto, "
                         f"{', '.join(allowed)}")
    return spec


@register("dafl")
class DAFL(DataFreeDistiller):
    Params = DAFLParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: DAFLParams) -> None:
        super().__init__(student, teacher, params)
        assert teacher is not None
        self.activation_layer = activation_layer(teacher, params.activation_layer)

    @classmethod
    def check_setup(cls, params: MethodParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        super().check_setup(params, student=student, teacher=teacher, num_workers=num_workers)
        assert isinstance(params, DAFLParams)
        if teacher is not None:
            activation_layer(teacher, params.activation_layer)

    def setup(self, ctx: LoopContext) -> None:
        p = self.params
        assert isinstance(p, DAFLParams) and self.teacher is not None
        ctx.set_tags({"kdo.dafl.activation_layer": self.activation_layer})
        self.generator = DAFLGenerator(p.latent_dim, ctx.image_shape, p.base_channels).to(ctx.device)
        self.synthesizer = GeneratorSynthesizer(self.generator, self.teacher, self.generator_loss,
                                                lr=p.generator_lr, batch_size=ctx.batch_size, reuse_last=True)

    def generator_loss(self, images: Tensor, logits: Tensor, features: dict[str, Tensor]) -> tuple[
            Tensor, dict[str, Tensor]]:
        p = self.params
        assert isinstance(p, DAFLParams)
        oh = onehot_loss(logits)
        act = activation_loss(features[self.activation_layer])
        ie = mean_entropy_loss(logits, base=10.0)
        total = p.onehot_weight * oh + p.activation_weight * act + p.entropy_weight * ie
        return total, {"onehot": oh.detach(), "activation": act.detach(), "entropy": ie.detach()}

    def synthesis_due(self, epoch: int, iteration: int) -> bool:
        return True  # G and S are updated together, every iteration

"""EKD: embedded knowledge distillation in a depth-level dynamic network. Lyu, Xu, Cheng (later versions add
Q. Zhao and Z. Zhang), arXiv 2103.00793. Only the abstract and introduction were retrieved, so the loss is the
reconstruction of docs/METHODS.md section 6 [recon]: the full net (index 0 of a `methods.ddnn.DDNNResNet`) teaches
every weight-sharing sub-net k online, in one step on the shared weights:

    L = CE(z_F, y) + sum_k [ subnet_ce_weight * CE(z_k, y)
                             + kl_weight * T^2 * KL(softmax_T(z_F) || softmax_T(z_k))
                             + attention_weight * sum_s mean (a(F_F^s) - a(F_k^s))^2 ],
    a(F) = L2-normalize(vec(mean_c F_c^2))   (the AT/SAD attention map, mdistiller's AT convention),

over the same-resolution stage outputs s. Named, logged switches for the [recon]/[choice] parts:
`detach_teacher` (stop the KL/attention gradients into the full net's signals), `temperature`, `kl_weight`,
`attention_weight`, `subnet_ce_weight`, and `bn_mode`: shared BN recalibrated per sub-net before every evaluation
("recalibrate": cumulative BN statistics from `recalibration_batches` training batches, `recalibration_data`
clean or augmented) or a private BN per sub-net ("private", which needs the network's `private_bn: true`).
The headline net (val_acc/test_acc, checkpoint) is the network's `headline` (the full net by default); every
sub-net's accuracy is reported as `<split>_acc/<name>` (`full`, `sub_2-2-2-2`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from methods.ddnn import DDNNResNet
from methods.losses import kd_kl_loss
from methods.registry import Distiller, LoopContext, MethodParams, register


class EKDParams(MethodParams):
    temperature: float = Field(1.0, gt=0.0, le=100.0,
                               description="softmax temperature T of the full-net -> sub-net KL (default 1 [choice])")
    kl_weight: float = Field(1.0, ge=0.0, le=100.0,
                             description="l_kl: weight of each sub-net's T^2-scaled KL to the full net's posterior")
    attention_weight: float = Field(1000.0, ge=0.0, le=1e6,
                                    description="l_at: weight of the self-attention distillation, summed over "
                                                "stages (mdistiller's AT weight 1000 for this normalization)")
    subnet_ce_weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of each sub-net's CE(z_k, y)")
    detach_teacher: bool = Field(True, description="detach the full net's posterior and attention maps in the "
                                                   "KL/attention terms [recon]: softmax_T(z_F).detach()")
    bn_mode: Literal["recalibrate", "private"] = Field(
        "recalibrate", description="BN per sub-net: shared and recalibrated before each evaluation, or private "
                                   "(needs student.args.private_bn: true)")
    recalibration_batches: int = Field(20, ge=1, le=1_000_000,
                                       description="training batches whose cumulative BN statistics a sub-net "
                                                   "is evaluated with (bn_mode=recalibrate)")
    recalibration_data: Literal["clean", "augmented"] = Field(
        "clean", description="recalibrate BN on un-augmented training images or on augmented training batches")


def attention_map(feature: Tensor) -> Tensor:
    """a(F) = L2-normalize(vec(mean_c F_c^2)), per sample (Zagoruyko & Komodakis' AT with p = 2)."""
    return F.normalize(feature.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """mean (a(F_T) - a(F_S))^2, mdistiller's `single_stage_at_loss`."""
    return (attention_map(teacher) - attention_map(student)).pow(2).mean()


def _bn_layers(net: nn.Module) -> list[_BatchNorm]:
    return [m for m in net.modules() if isinstance(m, _BatchNorm)]


def bn_statistics(net: nn.Module) -> list[dict[str, Tensor]]:
    """A copy of every BN layer's running statistics (in module order)."""
    return [{k: v.clone() for k, v in bn.state_dict().items() if k.startswith(("running", "num_batches"))}
            for bn in _bn_layers(net)]


def load_bn_statistics(net: nn.Module, stats: list[dict[str, Tensor]]) -> None:
    for bn, saved in zip(_bn_layers(net), stats, strict=True):
        bn.load_state_dict({**bn.state_dict(), **saved})


@torch.no_grad()
def recalibrate_bn(net: DDNNResNet, subnet: int, batches: Iterator[tuple[Tensor, Tensor]], num_batches: int,
                   precision: str = "fp32") -> None:
    """Replace the running statistics of the BN layers `subnet` uses by their cumulative average over
    `num_batches` batches run through `subnet` in train mode; the layers it does not use keep theirs."""
    before = bn_statistics(net)
    layers = _bn_layers(net)
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
    was_training = net.training
    net.train()
    device = next(net.parameters()).device
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    try:
        with cast:
            for _, (x, _) in zip(range(num_batches), batches, strict=False):
                net.forward_subnet(x, subnet)
    finally:
        for bn, momentum, saved in zip(layers, momenta, before, strict=True):
            bn.momentum = momentum
            if int(bn.num_batches_tracked) == 0:  # not on this sub-net's path
                bn.load_state_dict({**bn.state_dict(), **saved})
        net.train(was_training)


@register("ekd")
class EmbeddedKD(Distiller):
    Params = EKDParams
    needs_teacher = False
    params: EKDParams
    student: DDNNResNet

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MethodParams) -> None:
        super().__init__(student, teacher, params)
        self._ctx: LoopContext | None = None

    @classmethod
    def check_setup(cls, params: MethodParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        assert isinstance(params, EKDParams)
        if not isinstance(student, DDNNResNet):
            raise ValueError(f"student.architecture: ekd needs a DDNN student (ddnn_resnet, ddnn_resnet56, "
                             f"ddnn_resnet18/34/50_cifar, ddnn_resnet34, ddnn_resnet50); got {type(student).__name__}")
        if len(student.configs) < 2:
            raise ValueError("student.args.subnets: ekd needs at least one sub-net")
        if (params.bn_mode == "private") != student.private_bn:
            raise ValueError(f"method.params.bn_mode: '{params.bn_mode}' needs student.args.private_bn: "
                             f"{str(params.bn_mode == 'private').lower()}")

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Every term of L, unweighted and with its graph: `ce/<name>`, `kl/<sub>`, `at/<sub>`."""
        p = self.params
        net = self.student
        logits_full, feats_full = net.forward_subnet(x, 0, features=True)
        parts = {"ce/full": F.cross_entropy(logits_full.float(), y)}
        teacher_logits = logits_full.detach() if p.detach_teacher else logits_full
        stages = net.stage_names
        teacher_feats = {s: feats_full[s].detach() if p.detach_teacher else feats_full[s] for s in stages}
        for k in range(1, len(net.configs)):
            name = net.subnet_names[k]
            logits, feats = net.forward_subnet(x, k, features=True)
            parts[f"ce/{name}"] = F.cross_entropy(logits.float(), y)
            parts[f"kl/{name}"] = kd_kl_loss(logits, teacher_logits, p.temperature)
            parts[f"at/{name}"] = sum((attention_loss(feats[s], teacher_feats[s]) for s in stages),
                                      torch.zeros((), device=x.device))
        return parts

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        parts = self.losses(x, y)
        weights = {"ce": p.subnet_ce_weight, "kl": p.kl_weight, "at": p.attention_weight}
        loss = parts["ce/full"]
        for key, value in parts.items():
            if key != "ce/full":
                loss = loss + weights[key.split("/")[0]] * value
        return loss, {k: v.detach() for k, v in parts.items()}

    def setup(self, ctx: LoopContext) -> None:
        self._ctx = ctx

    def _recalibration_batches(self, ctx: LoopContext) -> Iterator[tuple[Tensor, Tensor]]:
        if self.params.recalibration_data == "augmented":
            return iter(ctx.train_batches(0))  # epoch 0: the draw before the first student epoch (`batch_order_seed`)
        return iter(ctx.clean_batches(ctx.batch_size))

    def _calibrate(self, subnet: int, ctx: LoopContext) -> None:
        if self.params.bn_mode == "recalibrate":
            recalibrate_bn(self.student, subnet, self._recalibration_batches(ctx), self.params.recalibration_batches,
                           ctx.precision)

    def inference_student(self) -> nn.Module:
        """The DDNN, its plain forward running the headline net with BN statistics calibrated for it."""
        if self.params.bn_mode == "recalibrate":
            if self._ctx is None:
                raise RuntimeError("ekd: call setup(ctx) before evaluating (BN recalibration needs training data)")
            self._calibrate(self.student.headline, self._ctx)
        return self.student

    def extra_accuracies(self, split: str, ctx: LoopContext) -> dict[str, float]:
        """Every sub-net (the full net included) on `split`, each with its own calibrated BN statistics; the
        headline's statistics are restored afterwards (they are what is checkpointed)."""
        net = self.student
        saved = bn_statistics(net)
        out: dict[str, Any] = {}
        try:
            for k, name in enumerate(net.subnet_names):
                self._calibrate(k, ctx)
                with net.use_subnet(k):
                    out[name] = ctx.accuracy(net, split)
        finally:
            load_bn_statistics(net, saved)
        return out

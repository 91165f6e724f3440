"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (arXiv 1412.6550; code
adri-romsor/FitNets), and the one-stage variant of mdistiller/RepDistiller.

`stages=2` (the paper):
- Stage 1 (hint training, in `setup`): the student's layers up to the guided layer g plus a regressor r minimize
  L_HT = 1/2 ||u_h(x) - r(v_g(x); W_r)||^2 (eq. 3), summed over units and averaged over the batch (code
  `costs/HintCost.py`). u_h is the teacher's hint layer after its nonlinearity; r is a valid convolution with kernel
  (Ng1-Nh1+1) x (Ng2-Nh2+1) and Oh output channels ending in the hint layer's nonlinearity (ReLU). No labels; only
  the lower student layers and r are trained; the layers above g never run. The regressor is then dropped.
- Stage 2 (eq. 2): L_KD = CE(y, P_S) + lam * CE(P_T^tau, P_S^tau), soft cross-entropy with NO tau^2 factor.
  lam follows `extensions/TeacherDecayOverEpoch.py`: lam0 until epoch `anneal_start_epoch`, then minus
  (lam0 - lam_final) / (saturate - start + 1) per epoch, lam_final from `saturate` on, with
  saturate = round(anneal_end_fraction * epochs) (the paper's CIFAR-10 run: 400 / 288).

`stages=1` (modern variant, mdistiller `FitNet.py`): L = ce_weight * CE + hint_weight * mean MSE(ConvReg(v_g), u_h),
ConvReg = conv + BN + ReLU. `regressor_kernel: auto` is mdistiller's `_common.ConvReg` for a guided map of side
s_H and a hint of side t_H: a 1x1 conv when the sizes match; a 3x3 stride-2 conv when s_H = 2 t_H; a 4x4 stride-2
transposed conv when 2 s_H = t_H; otherwise, when s_H > t_H, a valid conv of kernel (1 + s_H - t_H) x
(1 + s_W - t_W). `regressor_kernel: 1 | 3` is a same-padded conv of that size; either is resized to the hint's size
when they still differ (and so is `auto` where mdistiller has no rule, s_H < t_H).

[choice] params (docs/METHODS.md section 2): `stage1_fraction` (stage-1 epochs as a fraction of the student epochs,
default 0.3, or `stage1_epochs` absolute); `stage1_lr_scale` (stage 1 steps the configured optimizer at this multiple
of training.lr, default 0.1: the summed hint loss is large); `guided_layer` / `hint_layer` (a stage name or a
relative depth, default the middle); the resize of the one-stage ConvReg where mdistiller's rule has no conv.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from methods.feature_utils import forward_to, parameters_up_to, resolve_stage
from methods.networks import FeatureNet
from methods.registry import LAYER, Distiller, LoopContext, MethodParams, register

# Stage 1 draws its epochs' batch orders from seeds apart from stage 2's.


class FitNetsParams(MethodParams):
    stages: Literal[1, 2] = Field(2, description="2: the paper's hint stage then annealed KD; 1: CE + hint MSE")
    guided_layer: str | float = Field(
        0.5, description="student guided layer g: a stage name (stage2) or relative depth in (0, 1] [choice]",
        json_schema_extra=LAYER)
    hint_layer: str | float = Field(
        0.5, description="teacher hint layer h: a stage name (stage2) or relative depth in (0, 1] [choice]",
        json_schema_extra=LAYER)
    stage1_epochs: int | None = Field(
        None, ge=0, le=10_000, description="stage-1 (hint) epochs; default stage1_fraction * epochs")
    stage1_fraction: float = Field(
        0.3, ge=0.0, le=2.0, description="stage-1 epochs as a fraction of the student epochs [choice]")
    stage1_lr_scale: float = Field(
        0.1, gt=0.0, le=10.0, description="stage-1 learning rate as a multiple of training.lr: the summed hint loss "
                                          "is ~C*H*W times a mean one (paper: RMSProp 5e-3 / 5e-4) [choice]")
    temperature: float = Field(3.0, gt=0.0, le=100.0, description="softmax temperature tau of stage 2 (paper 3)")
    kd_weight: float = Field(4.0, ge=0.0, le=100.0, description="initial soft-target weight lam0 (paper 4)")
    kd_weight_final: float = Field(1.0, ge=0.0, le=100.0, description="final weight lam_final (CIFAR 1, MNIST 0)")
    anneal_start_epoch: int = Field(5, ge=1, le=100_000, description="epoch `start` from which lam decreases (5)")
    anneal_end_fraction: float = Field(
        400 / 288, gt=0.0, le=10.0, description="epoch `saturate` where lam reaches lam_final, as a fraction "
                                                "of the epochs (paper 400/288)")
    hint_weight: float = Field(100.0, ge=0.0, le=1e5, description="one-stage hint weight (mdistiller 100)")
    ce_weight: float = Field(1.0, ge=0.0, le=10.0, description="weight of the hard-label CE term")
    regressor_kernel: Literal["auto", 1, 3] = Field(
        "auto", description="one-stage ConvReg conv: auto = mdistiller's (1x1 when the sizes match), or a same-padded "
                            "1x1 / 3x3 conv")


def kd_weight_at(epoch: int, params: FitNetsParams, epochs: int) -> float:
    """lam at 1-based student epoch `epoch` (FitNets `TeacherDecayOverEpoch`)."""
    start = params.anneal_start_epoch
    saturate = max(start, round(params.anneal_end_fraction * epochs))
    lam0, lam_final = params.kd_weight, params.kd_weight_final
    if epoch < start:
        return lam0
    if epoch >= saturate:
        return lam_final
    step = (lam0 - lam_final) / (saturate - start + 1)
    return lam0 - step * (epoch - start + 1)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """CE(P_T^tau, P_S^tau) = -sum_k p_t,k log p_s,k at temperature tau, batch mean, fp32, no tau^2."""
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=1)
    return -(p_teacher * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


def hint_loss(prediction: Tensor, hint: Tensor) -> Tensor:
    """L_HT = 1/2 ||u_h - r||^2, summed over units, averaged over the batch."""
    return 0.5 * (prediction.float() - hint.float()).pow(2).flatten(1).sum(1).mean()


def paper_regressor(guided_shape: tuple[int, ...], hint_shape: tuple[int, ...]) -> nn.Module:
    """The paper's regressor from a guided feature (C, H, W) or (D,) to a hint of the given shape, ending in ReLU:
    a valid conv with kernel (Ng1-Nh1+1) x (Ng2-Nh2+1) and Oh channels, or a linear layer for vectors."""
    if len(guided_shape) == 1 and len(hint_shape) == 1:
        return nn.Sequential(nn.Linear(guided_shape[0], hint_shape[0]), nn.ReLU())
    if len(guided_shape) != 3 or len(hint_shape) != 3:
        raise ValueError(f"method.params.hint_layer: cannot regress a {guided_shape} feature onto a {hint_shape} hint")
    (og, ng1, ng2), (oh, nh1, nh2) = guided_shape, hint_shape
    if ng1 < nh1 or ng2 < nh2:
        raise ValueError(f"method.params.guided_layer: the guided map {ng1}x{ng2} is smaller than the hint "
                         f"{nh1}x{nh2}; a valid-conv regressor needs it at least as large (use stages=1 or "
                         "an earlier guided layer)")
    return nn.Sequential(nn.Conv2d(og, oh, kernel_size=(ng1 - nh1 + 1, ng2 - nh2 + 1)), nn.ReLU())


def convreg_conv(guided_shape: tuple[int, ...], hint_shape: tuple[int, ...],
                 kernel: Literal["auto", 1, 3]) -> nn.Module:
    """The conv of the one-stage ConvReg from a (C, H, W) guided map to a (C', H', W') hint (module docstring)."""
    (sc, sh, sw), (tc, th, tw) = guided_shape, hint_shape
    if kernel != "auto":
        return nn.Conv2d(sc, tc, kernel, padding=kernel // 2)
    if sh == 2 * th:
        return nn.Conv2d(sc, tc, kernel_size=3, stride=2, padding=1)
    if 2 * sh == th:
        return nn.ConvTranspose2d(sc, tc, kernel_size=4, stride=2, padding=1)
    if sh >= th and sw >= tw:
        return nn.Conv2d(sc, tc, kernel_size=(1 + sh - th, 1 + sw - tw))
    return nn.Conv2d(sc, tc, kernel_size=1)  # no mdistiller rule (it raises): 1x1, then resized


class ConvReg(nn.Module):
    """mdistiller-style ConvReg: conv (or linear) + BN + ReLU mapping channels, resized to the hint's size."""

    def __init__(self, guided_shape: tuple[int, ...], hint_shape: tuple[int, ...],
                 kernel: Literal["auto", 1, 3] = "auto") -> None:
        super().__init__()
        self.size = tuple(hint_shape[1:])
        if len(guided_shape) == 1 and len(hint_shape) == 1:
            self.body: nn.Module = nn.Sequential(nn.Linear(guided_shape[0], hint_shape[0]),
                                                 nn.BatchNorm1d(hint_shape[0]), nn.ReLU())
        elif len(guided_shape) == 3 and len(hint_shape) == 3:
            self.body = nn.Sequential(convreg_conv(guided_shape, hint_shape, kernel), nn.BatchNorm2d(hint_shape[0]),
                                      nn.ReLU())
        else:
            raise ValueError(f"method.params.hint_layer: cannot regress a {guided_shape} feature onto a "
                             f"{hint_shape} hint")

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if out.dim() == 4 and tuple(out.shape[2:]) != self.size:
            if out.shape[2] >= self.size[0] and out.shape[3] >= self.size[1]:
                out = F.adaptive_avg_pool2d(out, self.size)
            else:
                out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return out


@register("fitnets")
class FitNets(Distiller):
    Params = FitNetsParams

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: FitNetsParams) -> None:
        super().__init__(student, teacher, params)
        assert isinstance(student, FeatureNet) and isinstance(teacher, FeatureNet)
        self.guided = resolve_stage(student, params.guided_layer)
        self.hint = resolve_stage(teacher, params.hint_layer)
        self.regressor: nn.Module | None = None  # the one-stage ConvReg (stage 1's regressor is never kept)
        self.epochs = 0
        self.lam = params.kd_weight
        self.stage1_history: list[float] = []

    @classmethod
    def check_setup(cls, params: FitNetsParams, *, student: nn.Module, teacher: nn.Module | None,
                    num_workers: int) -> None:
        for field, net, spec in (("guided_layer", student, params.guided_layer),
                                 ("hint_layer", teacher, params.hint_layer)):
            if not isinstance(net, FeatureNet):
                raise ValueError(f"method.params.{field}: fitnets needs a zoo network with named stages")
            try:
                resolve_stage(net, spec)
            except ValueError as error:
                raise ValueError(f"method.params.{field}: {error}") from None

    def stage1_epoch_count(self, epochs: int) -> int:
        p = self.params
        return p.stage1_epochs if p.stage1_epochs is not None else round(p.stage1_fraction * epochs)

    def _shapes(self, x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        with torch.no_grad():
            was_training = self.student.training
            self.student.eval()
            guided = forward_to(self.student, self.guided, x[:2])
            self.student.train(was_training)
            hint = forward_to(self.teacher, self.hint, x[:2])
        return tuple(guided.shape[1:]), tuple(hint.shape[1:])

    def setup(self, ctx: LoopContext) -> None:
        p = self.params
        self.epochs = ctx.epochs
        example = next(iter(ctx.clean_batches(8)))[0]
        guided_shape, hint_shape = self._shapes(example)
        if p.stages == 1:
            self.regressor = ConvReg(guided_shape, hint_shape, p.regressor_kernel).to(ctx.device)
            ctx.set_tags({"kdo.fitnets.stages": "1"})
            return
        epochs = self.stage1_epoch_count(ctx.epochs)
        ctx.set_tags({"kdo.fitnets.stages": "2", "kdo.fitnets.layers": f"{self.guided}<-{self.hint}"})
        ctx.log({"stage1/epochs": float(epochs)}, 0)
        if epochs == 0:
            return
        regressor = paper_regressor(guided_shape, hint_shape).to(ctx.device)
        lower = parameters_up_to(self.student, self.guided, example)
        optimizer = ctx.make_optimizer([*lower, *regressor.parameters()])
        for group in optimizer.param_groups:
            group["lr"] *= p.stage1_lr_scale
        self.student.train()
        for epoch in range(1, epochs + 1):
            total, batches = 0.0, 0
            for x, _ in ctx.train_batches(epoch, "hint"):
                with torch.no_grad():
                    hint = forward_to(self.teacher, self.hint, x)
                loss = hint_loss(regressor(forward_to(self.student, self.guided, x)), hint)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                batches += 1
            self.stage1_history.append(total / max(1, batches))
            ctx.log({"stage1/hint_loss": self.stage1_history[-1]}, epoch)
        # Stage 1's optimizer left .grad on the lower layers; stage 2 starts clean.
        self.student.zero_grad(set_to_none=True)

    def start_epoch(self, epoch: int, ctx: LoopContext) -> None:
        self.lam = kd_weight_at(epoch, self.params, ctx.epochs)

    def epoch_metrics(self) -> dict[str, float]:
        if self.params.stages == 1:
            return {}
        return {"fitnets/kd_weight": float(self.lam)}

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        if p.stages == 1:
            assert self.regressor is not None, "setup() builds the regressor"
            logits, feats = self.student(x, features=True)
            shared = self.teacher_pass(x)[1] if self.teacher_pass is not None else {}  # a group's one pass
            with torch.no_grad():
                hint = shared[self.hint] if self.hint in shared else forward_to(self.teacher, self.hint, x)
            ce = F.cross_entropy(logits.float(), y)
            mse = F.mse_loss(self.regressor(feats[self.guided]).float(), hint.float())
            loss = p.ce_weight * ce + p.hint_weight * mse
            return loss, {"ce": ce.detach(), "hint": mse.detach()}
        logits = self.student(x)
        soft = soft_cross_entropy(logits, self.teacher_logits(x), p.temperature)
        ce = F.cross_entropy(logits.float(), y)
        loss = p.ce_weight * ce + self.lam * soft
        return loss, {"ce": ce.detach(), "soft_ce": soft.detach()}

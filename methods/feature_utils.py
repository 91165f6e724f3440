"""Helpers shared by the feature-based distillers (FitNets, LSHFM, TCS): picking a layer by name or relative
depth, running a network only up to a layer, and folding linear heads into a plain classifier."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from methods.networks import FeatureNet


def resolve_stage(net: FeatureNet, spec: str | float) -> str:
    """A stage name (`"stage2"`) as given, or a relative depth in (0, 1] of the stage list
    (1/3, 1/2, 2/3): the stage at position ceil(depth * n), 1-based, so 1/2 of 3 stages is stage2."""
    names = net.stage_names
    if not names:
        raise ValueError("the network names no features; name its layers in student.features "
                         "or teacher.features")
    if isinstance(spec, str):
        if spec not in names:
            raise ValueError(f"unknown layer '{spec}'; allowed: {', '.join(names)}")
        return spec
    if not 0.0 < spec <= 1.0:
        raise ValueError(f"a relative depth must be in (0, 1]; got {spec}")
    index = min(len(names), max(1, math.ceil(spec * len(names) - 1e-9)))
    return names[index - 1]


class _Stop(Exception):
    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


def forward_to(net: FeatureNet, name: str, x: Tensor) -> Tensor:
    """The feature `name` of `net`, running only the layers up to it (the layers above never execute,
    so their BatchNorm statistics do not move)."""

    def stop(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        raise _Stop(output)

    handle = net.stage_module(name).register_forward_hook(stop)
    try:
        net(x)
    except _Stop as stopped:
        return stopped.output
    finally:
        handle.remove()
    raise RuntimeError(f"layer '{name}' was not reached")


def parameters_up_to(net: FeatureNet, name: str, example: Tensor) -> list[nn.Parameter]:
    """The parameters the feature `name` depends on (found by one backward of a truncated forward)."""
    was_training = net.training
    net.eval()
    probe = [p for p in net.parameters() if p.requires_grad]
    out = forward_to(net, name, example[:2])
    grads = torch.autograd.grad(out.float().sum(), probe, allow_unused=True)
    net.train(was_training)
    return [p for p, g in zip(probe, grads, strict=True) if g is not None]


@torch.no_grad()
def fold_linear(*layers: nn.Linear | Tensor) -> tuple[Tensor, Tensor]:
    """Compose affine maps applied left to right (a Linear, or a vector = elementwise scale) into one (W, b)."""
    weight: Tensor | None = None
    bias: Tensor | None = None
    for layer in layers:
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().double()
            b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                        device=w.device)
            weight = w if weight is None else w @ weight
            bias = b if bias is None else w @ bias + b
        else:
            scale = layer.detach().double()
            assert weight is not None and bias is not None, "a scale cannot come first"
            weight = scale[:, None] * weight
            bias = scale * bias
    assert weight is not None and bias is not None
    return weight, bias


@torch.no_grad()
def write_classifier(net: FeatureNet, weight: Tensor, bias: Tensor) -> FeatureNet:
    """Overwrite `net.classifier` (d -> classes) with the folded (W, b); returns `net`."""
    classifier = net.classifier
    classifier.weight.copy_(weight.to(classifier.weight.dtype))
    classifier.bias.copy_(bias.to(classifier.bias.dtype))
    return net

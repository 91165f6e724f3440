"""Depth-level dynamic networks (DDNN) for EKD (Lyu, Xu, Cheng, arXiv 2103.00793): one ResNet whose sub-nets
are shallower weight-sharing versions of the full net.

Stage s of the full net has n_s blocks; sub-net k keeps m_s <= n_s of them and shares the stem, the kept blocks
and the classifier with the full net. Which blocks a sub-net keeps is the `selection` switch [choice]: "first"
(blocks 0..m_s-1, docs/METHODS.md's default) or "even" (m_s evenly spaced blocks); both keep block 0, which carries
the stride and the projection. The stem is CIFAR-style (3x3 conv, no max-pool; the layout and state-dict keys of
`methods.networks.CifarResNet`) or ImageNet-style (7x7/2 conv + 3x3/2 max-pool, torchvision's layout with
BasicBlock or Bottleneck). `private_bn` [choice] gives every sub-net its own BatchNorm layers (slimmable-network
style) instead of sharing them, so no BN recalibration is needed; the convolutions and the classifier stay shared.

Index 0 is the full net; 1..K are the configured sub-nets, named `full` and `sub_<m1>-<m2>-...`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from methods.networks import FeatureNet, _BasicBlock, _conv3x3, _init_weights, register_network, shortcut

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
SELECTIONS = ("first", "even")


class _Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), expansion 4, projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class SwitchBN(nn.Module):
    """One BatchNorm2d per sub-net that uses this layer (private BN); `active` picks the one a forward uses."""

    def __init__(self, num_features: int, users: Sequence[int]) -> None:
        super().__init__()
        self.bns = nn.ModuleDict({str(k): nn.BatchNorm2d(num_features) for k in users})
        self.active = int(users[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[str(self.active)](x)


class _Stage(nn.Sequential):
    """One stage's blocks; a forward runs the given subset of them (a sub-net's blocks), as ONE module call, so
    hooks on a stage (`methods.feature_utils.forward_to`) see it run with the stage's output."""

    def forward(self, x: Tensor, indices: Sequence[int] | None = None) -> Tensor:
        for j in range(len(self)) if indices is None else indices:
            x = self[j](x)
        return x


def block_indices(full: Sequence[int], sub: Sequence[int], selection: str) -> list[list[int]]:
    """Per stage, the indices of the full net's blocks that a sub-net with `sub` blocks per stage runs."""
    if selection == "first":
        return [list(range(m)) for m in sub]
    # round(i * n / m) starts at 0 and steps by n / m >= 1, so the indices are distinct and block 0 is kept.
    return [[round(i * n / m) for i in range(m)] for n, m in zip(full, sub, strict=True)]


def subnet_name(depths: Sequence[int]) -> str:
    return "sub_" + "-".join(str(m) for m in depths)


class DDNNResNet(FeatureNet):
    """A ResNet holding weight-sharing sub-nets; plain `forward` runs the active one (the headline by default)."""

    def __init__(self, blocks: Sequence[int], subnets: Sequence[Sequence[int]], *, in_channels: int,
                 num_classes: int, block: str = "basic", stem: str = "cifar", widths: Sequence[int] | None = None,
                 stem_width: int | None = None, selection: str = "first", private_bn: bool = False,
                 headline: str = "full") -> None:
        widths = list(widths) if widths is not None else _default_widths(stem, len(blocks))
        stem_width = stem_width if stem_width is not None else widths[0]
        _check_args(blocks, subnets, block, stem, widths, stem_width, selection, private_bn)
        super().__init__(len(blocks))
        self.arch_args: dict[str, Any] = {
            "blocks": list(blocks), "subnets": [list(s) for s in subnets], "block": block, "stem": stem,
            "widths": widths, "stem_width": stem_width, "selection": selection, "private_bn": private_bn,
            "headline": headline}
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.private_bn = private_bn
        self.configs: list[tuple[int, ...]] = [tuple(blocks), *(tuple(s) for s in subnets)]
        self.subnet_names = ["full", *(subnet_name(s) for s in subnets)]
        if headline not in self.subnet_names:
            raise ValueError(f"headline must be one of {', '.join(self.subnet_names)}; got {headline!r}")
        self.headline = self.subnet_names.index(headline)
        self.block_indices = [block_indices(blocks, cfg, selection) for cfg in self.configs]
        self._active = self.headline

        if stem == "cifar":
            self.stem = nn.Sequential(_conv3x3(in_channels, stem_width), nn.BatchNorm2d(stem_width),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        unit = _Bottleneck if block == "bottleneck" else _BasicBlock
        expansion = 4 if block == "bottleneck" else 1
        stages = []
        planes_in = stem_width
        for index, (count, planes) in enumerate(zip(blocks, widths, strict=True)):
            units = []
            for position in range(count):
                units.append(unit(planes_in, planes, 2 if index > 0 and position == 0 else 1))
                planes_in = planes * expansion
            stages.append(_Stage(*units))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(planes_in, num_classes)
        _init_weights(self)
        self._switch_bns: list[SwitchBN] = []
        if private_bn:
            everyone = range(len(self.configs))
            self._privatize(self.stem, everyone)
            for s, stage in enumerate(self.stages):
                for j, unit_module in enumerate(stage):
                    self._privatize(unit_module, [k for k in everyone if j in self.block_indices[k][s]])

    def _privatize(self, module: nn.Module, users: Sequence[int]) -> None:
        """Replace every BatchNorm2d under `module` by a SwitchBN with one BN per user."""
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                switch = SwitchBN(child.num_features, users)
                setattr(module, name, switch)
                self._switch_bns.append(switch)
            else:
                self._privatize(child, users)

    def index(self, subnet: int | str) -> int:
        """The index of a sub-net given by index, by name (`full`, `sub_2-2`) or by depths string (`2-2`)."""
        if isinstance(subnet, int) and not isinstance(subnet, bool):
            if not 0 <= subnet < len(self.configs):
                raise ValueError(f"sub-net index must be in [0, {len(self.configs) - 1}]; got {subnet}")
            return subnet
        for candidate in (str(subnet), f"sub_{subnet}"):
            if candidate in self.subnet_names:
                return self.subnet_names.index(candidate)
        raise ValueError(f"unknown sub-net {subnet!r}; allowed: {', '.join(self.subnet_names)}")

    @contextmanager
    def use_subnet(self, subnet: int | str) -> Iterator[DDNNResNet]:
        """Within the block, plain `forward` (and so any evaluation of this module) runs `subnet`."""
        previous, self._active = self._active, self.index(subnet)
        try:
            yield self
        finally:
            self._active = previous

    def forward_subnet(self, x: Tensor, subnet: int | str,
                       features: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        with self.use_subnet(subnet):
            return self(x, features=features)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        k = self._active
        for switch in self._switch_bns:
            switch.active = k
        x = self.stem(x)
        feats: dict[str, Tensor] = {}
        for name, stage, indices in zip(self._stage_names, self.stages, self.block_indices[k], strict=True):
            x = stage(x, indices)
            feats[name] = x
        return torch.flatten(self.pool(x), 1), feats

    def standalone_args(self, subnet: int | str) -> dict[str, Any]:
        """`build_network("ddnn_resnet", **args)` arguments of the plain network with this sub-net's depths."""
        k = self.index(subnet)
        return {**self.arch_args, "blocks": list(self.configs[k]), "subnets": [], "private_bn": False,
                "headline": "full"}

    def export_subnet(self, subnet: int | str) -> DDNNResNet:
        """A standalone plain network (no sub-nets, shared BN) with this sub-net's blocks, weights and BN."""
        k = self.index(subnet)
        plain = DDNNResNet(in_channels=self.in_channels, num_classes=self.num_classes,
                           **self.standalone_args(k))
        mine = dict(self.named_modules())
        for name, module in plain.named_modules():
            if next(module.children(), None) is not None or not list(module.state_dict()):
                continue  # containers and parameter-free leaves
            source = mine[_map_name(name, self.block_indices[k])]
            if isinstance(source, SwitchBN):
                source = source.bns[str(k)]
            module.load_state_dict(source.state_dict())
        plain.train(self.training)
        return plain


def _map_name(name: str, indices: list[list[int]]) -> str:
    """`stages.<s>.<j>.rest` of the plain net -> the same module in the DDNN (block j of the sub-net)."""
    parts = name.split(".")
    if parts[0] == "stages" and len(parts) >= 3:
        parts[2] = str(indices[int(parts[1])][int(parts[2])])
    return ".".join(parts)


def _default_widths(stem: str, stages: int) -> list[int]:
    """Stage widths when none are given: 16-32-64 for He et al.'s 3-stage CIFAR ResNets (resnet20/56), and
    64-128-256-512 for 4-stage ones, CIFAR (kuangliu/DAFL/DeepInversion ResNet-18/34/50) or ImageNet."""
    base = 16 if stem == "cifar" and stages < 4 else 64
    return [base * 2**i for i in range(stages)]


def _is_pos_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_args(blocks: Sequence[int], subnets: Sequence[Sequence[int]], block: str, stem: str,
                widths: Sequence[int], stem_width: int, selection: str, private_bn: bool) -> None:
    if not isinstance(blocks, list | tuple) or not blocks or not all(_is_pos_int(n) for n in blocks):
        raise ValueError(f"blocks must be a non-empty list of positive integers (blocks per stage); got {blocks!r}")
    if not isinstance(subnets, list | tuple):
        raise ValueError(f"subnets must be a list of block-count lists; got {subnets!r}")
    seen = {tuple(blocks)}
    for i, sub in enumerate(subnets):
        if not isinstance(sub, list | tuple) or len(sub) != len(blocks) or not all(_is_pos_int(m) for m in sub):
            raise ValueError(f"subnets[{i}] must list {len(blocks)} positive block counts (one per stage); "
                             f"got {sub!r}")
        if any(m > n for m, n in zip(sub, blocks, strict=True)):
            raise ValueError(f"subnets[{i}] = {list(sub)} exceeds the full net's blocks {list(blocks)} in a stage")
        if tuple(sub) in seen:
            raise ValueError(f"subnets[{i}] = {list(sub)} repeats the full net or another sub-net")
        seen.add(tuple(sub))
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {', '.join(BLOCKS)}; got {block!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {selection!r}")
    if not isinstance(widths, list | tuple) or len(widths) != len(blocks) or not all(_is_pos_int(w) for w in widths):
        raise ValueError(f"widths must list {len(blocks)} positive integers (one per stage); got {widths!r}")
    if not _is_pos_int(stem_width):
        raise ValueError(f"stem_width must be a positive integer; got {stem_width!r}")
    if not isinstance(private_bn, bool):
        raise ValueError(f"private_bn must be true or false; got {private_bn!r}")


@register_network("ddnn_resnet")
def _build_ddnn_resnet(num_classes: int, in_channels: int, image_size: int, *,
                       blocks: Sequence[int] = (3, 3, 3), subnets: Sequence[Sequence[int]] | None = None,
                       block: str = "basic", stem: str = "cifar", widths: Sequence[int] | None = None,
                       stem_width: int | None = None, selection: str = "first", private_bn: bool = False,
                       headline: str = "full") -> FeatureNet:
    if subnets is None:  # one block per stage, unless that is the full net itself
        subnets = [[1] * len(blocks)] if isinstance(blocks, list | tuple) and any(n != 1 for n in blocks) else []
    return DDNNResNet(blocks, subnets, in_channels=in_channels, num_classes=num_classes, block=block, stem=stem,
                      widths=widths, stem_width=stem_width, selection=selection, private_bn=private_bn,
                      headline=headline)


def _preset(blocks: tuple[int, ...], default_subnets: tuple[tuple[int, ...], ...], block: str, stem: str) -> Any:
    def build(num_classes: int, in_channels: int, image_size: int, *,
              subnets: Sequence[Sequence[int]] = default_subnets, selection: str = "first", private_bn: bool = False,
              headline: str = "full") -> FeatureNet:
        return DDNNResNet(blocks, subnets, in_channels=in_channels, num_classes=num_classes, block=block, stem=stem,
                          selection=selection, private_bn=private_bn, headline=headline)

    return build


# docs/METHODS.md section 6's examples: CIFAR resnet56 with resnet20/resnet32 sub-nets; ImageNet ResNet-34 with a
# ResNet-18 sub-net; the bottleneck (3,4,6,3) ResNet-50 with (2,2,2,2) and (1,1,1,1) sub-nets.
register_network("ddnn_resnet56")(_preset((9, 9, 9), ((3, 3, 3), (5, 5, 5)), "basic", "cifar"))
register_network("ddnn_resnet34")(_preset((3, 4, 6, 3), ((2, 2, 2, 2),), "basic", "imagenet"))
register_network("ddnn_resnet50")(_preset((3, 4, 6, 3), ((2, 2, 2, 2), (1, 1, 1, 1)), "bottleneck", "imagenet"))
# The same shapes for 32 px inputs (docs/METHODS.md: "CIFAR: 3x3 stem, no max-pool"), 64-128-256-512 wide: the CIFAR
# ResNet-18/34/50 of kuangliu/pytorch-cifar, DAFL and DeepInversion (11.17M / 21.28M / 23.52M parameters at 10
# classes), leaving a 4x4 map before the pool instead of the ImageNet stem's 1x1.
register_network("ddnn_resnet18_cifar")(_preset((2, 2, 2, 2), ((1, 1, 1, 1),), "basic", "cifar"))
register_network("ddnn_resnet34_cifar")(_preset((3, 4, 6, 3), ((2, 2, 2, 2),), "basic", "cifar"))
register_network("ddnn_resnet50_cifar")(_preset((3, 4, 6, 3), ((2, 2, 2, 2), (1, 1, 1, 1)), "bottleneck", "cifar"))

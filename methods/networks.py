"""The network zoo: every net returns logits and, on request, named intermediate features.

Only architectures and a name registry live here; no distillation code.
"""

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from methods.plugins import load_entry_points

NetworkBuilder = Callable[..., "FeatureNet"]

_REGISTRY: dict[str, NetworkBuilder] = {}

# WRNs are named by pattern, so any valid depth/width works without registering every combination.
_WRN_NAME = re.compile(r"wrn_([1-9]\d*)_([1-9]\d*)")
_WRN_PATTERN = "wrn_<depth>_<width>"
_WRN_COMMON = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")


class FeatureNet(nn.Module):
    """Base class of every network in the zoo.

    Subclasses set ``self.classifier`` and implement ``_forward_features``, which returns the
    penultimate vector and the ordered stage outputs. The classifier is applied here, so
    ``classifier(feats["penultimate"])`` is the logits by construction.
    """

    classifier: nn.Linear

    def __init__(self, num_stages: int) -> None:
        super().__init__()
        self._stage_names = [f"stage{i}" for i in range(1, num_stages + 1)]

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    @property
    def stage_names(self) -> list[str]:
        return list(self._stage_names)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        penultimate, feats = self._forward_features(x)
        logits = self.classifier(penultimate)
        if not features:
            return logits
        feats["penultimate"] = penultimate
        return logits, feats

    def stage_module(self, name: str) -> nn.Module:
        """The module whose output is the feature `name`."""
        index = self.stage_names.index(name)
        for attribute in ("stages", "hidden"):
            modules = getattr(self, attribute, None)
            if isinstance(modules, nn.ModuleList):
                return modules[index]
        raise ValueError(f"{type(self).__name__} exposes no stage modules")

    def _run_stages(self, x: Tensor, stages: nn.ModuleList) -> tuple[Tensor, dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        for name, stage in zip(self._stage_names, stages, strict=True):
            x = stage(x)
            feats[name] = x
        return x, feats


def _init_weights(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BatchNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _conv3x3(in_planes: int, planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """A residual block's shortcut: identity, or when the shape changes the option-B projection (1x1 conv + BN)
    of the CRD/RepDistiller CIFAR ResNets."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


def _conv_bn_relu(in_planes: int, planes: int, batchnorm: bool = True) -> list[nn.Module]:
    # A conv bias is redundant when BatchNorm follows (BN's shift absorbs it).
    layers: list[nn.Module] = [_conv3x3(in_planes, planes, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(planes))
    layers.append(nn.ReLU(inplace=True))
    return layers


class MLP(FeatureNet):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], dropout: float) -> None:
        super().__init__(len(hidden))
        layers = []
        width_in = in_features
        for width in hidden:
            layers.append(nn.Sequential(nn.Linear(width_in, width), nn.ReLU(inplace=True)))
            width_in = width
        self.hidden = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width_in, num_classes)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = torch.flatten(x, 1)
        feats: dict[str, Tensor] = {}
        for name, layer in zip(self._stage_names, self.hidden, strict=True):
            x = layer(x)
            # Features are taken before dropout so hint losses do not chase dropout noise.
            feats[name] = x
            x = self.dropout(x)
        return x, feats


class SmallCNN(FeatureNet):
    def __init__(self, in_channels: int, num_classes: int, width: int, batchnorm: bool) -> None:
        super().__init__(2)
        self.stages = nn.ModuleList(
            [
                nn.Sequential(
                    *_conv_bn_relu(in_channels, width, batchnorm),
                    *_conv_bn_relu(width, width, batchnorm),
                    nn.MaxPool2d(2),
                ),
                nn.Sequential(
                    *_conv_bn_relu(width, 2 * width, batchnorm),
                    *_conv_bn_relu(2 * width, 2 * width, batchnorm),
                    nn.MaxPool2d(2),
                ),
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(x, self.stages)
        return torch.flatten(self.pool(x), 1), feats


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(FeatureNet):
    """CIFAR ResNet (He et al.) with depth 6n+2, laid out like CRD/RepDistiller's ``resnet.py``."""

    def __init__(
        self, depth: int, widths: Sequence[int], stem: int, in_channels: int, num_classes: int
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, ...); got {depth}")
        super().__init__(len(widths))
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, stem))
        stages = []
        planes_in = stem
        for index, planes in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(_BasicBlock(planes_in, planes, stride))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        # Adaptive pooling (instead of CRD's fixed 8x8) lets the same net take 8x8 digits.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(self.stem(x), self.stages)
        return torch.flatten(self.pool(x), 1), feats


class _PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu(self.bn1(x))
        # The projection reads the shared pre-activation, as in Zagoruyko's reference WRN.
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.relu(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + shortcut


class WideResNet(FeatureNet):
    """Wide ResNet (Zagoruyko & Komodakis) with depth 6n+4 and widen factor k."""

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float) -> None:
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth}")
        super().__init__(3)
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = _conv3x3(in_channels, 16)
        stages = []
        planes_in = 16
        for index, planes in enumerate(widths):
            blocks: list[nn.Module] = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(_PreActBlock(planes_in, planes, stride, dropout))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        # Pre-activation blocks leave the trunk un-normalised; the final BN-ReLU belongs to the last
        # stage so that "stage3" is the activated map the classifier actually pools.
        stages[-1].append(nn.BatchNorm2d(widths[-1]))
        stages[-1].append(nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(self.stem(x), self.stages)
        return torch.flatten(self.pool(x), 1), feats


class CifarVGG(FeatureNet):
    """VGG with BatchNorm for small images, laid out like CRD/RepDistiller's ``vgg.py``."""

    def __init__(
        self, config: Sequence[Sequence[int]], in_channels: int, num_classes: int, image_size: int
    ) -> None:
        super().__init__(len(config))
        stages = []
        planes_in = in_channels
        size = image_size
        last = len(config) - 1
        for index, widths in enumerate(config):
            layers: list[nn.Module] = []
            # CRD pools before the last block only for 64x64 inputs, keeping a 4x4 map on CIFAR;
            # "size > 4" reproduces that, and size < 2 skips pools that would empty the map.
            if index > 0 and size >= 2 and (index < last or size > 4):
                layers.append(nn.MaxPool2d(2))
                size //= 2
            for planes in widths:
                layers.extend(_conv_bn_relu(planes_in, planes))
                planes_in = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(planes_in, num_classes)
        _init_weights(self)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(x, self.stages)
        return torch.flatten(self.pool(x), 1), feats


class LeNet5(FeatureNet):
    """LeNet-5 as used by DAFL; its 5x5 convs reduce a 32x32 input to exactly 1x1 before the FC layers."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, int, int, int], batchnorm: bool
    ) -> None:
        super().__init__(3)
        conv1, conv2, conv3, hidden = widths
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*self._conv(in_channels, conv1, batchnorm), nn.MaxPool2d(2)),
                nn.Sequential(*self._conv(conv1, conv2, batchnorm), nn.MaxPool2d(2)),
                nn.Sequential(*self._conv(conv2, conv3, batchnorm)),
            ]
        )
        self.fc = nn.Sequential(nn.Linear(conv3, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)
        _init_weights(self)

    @staticmethod
    def _conv(in_planes: int, planes: int, batchnorm: bool) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(in_planes, planes, kernel_size=5, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(planes))
        layers.append(nn.ReLU(inplace=True))
        return layers

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(x, self.stages)
        return self.fc(torch.flatten(x, 1)), feats


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Register ``builder(num_classes, in_channels, image_size, **args) -> nn.Module`` under ``name``.

    The builder's keyword-only parameters are the arguments ``build_network`` accepts for it. It returns a
    `FeatureNet` (named stages) or any `nn.Module` returning logits, whose features a config names by layer
    (`student.features`). Registering the same builder again (its module imported anew) replaces it; another
    builder under a taken name is refused.
    """

    def decorator(builder: NetworkBuilder) -> NetworkBuilder:
        old = _REGISTRY.get(name)
        if (old is not None and (old.__module__, old.__qualname__) != (builder.__module__, builder.__qualname__)) \
                or _WRN_NAME.fullmatch(name):
            raise ValueError(f"network '{name}' is already registered (by {getattr(old, '__module__', 'kdo')}); "
                             "pick another name")
        _REGISTRY[name] = builder
        return builder

    return decorator


def _check_positive_int(name: str, value: object) -> None:
    # bool is an int subclass, but "width: true" in a config is a mistake, not a width of 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_probability(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")


@register_network("mlp")
def _build_mlp(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.0,
) -> FeatureNet:
    if not isinstance(hidden, list | tuple):
        raise ValueError(f"hidden must be a list of positive integers; got {hidden!r}")
    for index, width in enumerate(hidden):
        _check_positive_int(f"hidden[{index}]", width)
    _check_probability("dropout", dropout)
    return MLP(in_channels * image_size * image_size, num_classes, hidden, dropout)


@register_network("cnn")
def _build_cnn(
    num_classes: int, in_channels: int, image_size: int, *, width: int = 32, batchnorm: bool = True
) -> FeatureNet:
    # Two 2x2 max-pools need at least a 4x4 input.
    if image_size < 4:
        raise ValueError(f"cnn needs data.image_size >= 4; got {image_size}")
    _check_positive_int("width", width)
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be true or false; got {batchnorm!r}")
    return SmallCNN(in_channels, num_classes, width, batchnorm)


def _resnet_builder(depth: int, widths: tuple[int, int, int], stem: int) -> NetworkBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
        return CifarResNet(depth, widths, stem, in_channels, num_classes)

    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_network(f"resnet{_depth}")(_resnet_builder(_depth, (16, 32, 64), stem=16))
# CRD's x4 variants: num_filters [32, 64, 128, 256], i.e. a 32-channel stem and 4x wider stages.
for _depth in (8, 32):
    register_network(f"resnet{_depth}x4")(_resnet_builder(_depth, (64, 128, 256), stem=32))


_VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _vgg_builder(config: list[list[int]]) -> NetworkBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
        return CifarVGG(config, in_channels, num_classes, image_size)

    return build


for _name, _config in _VGG_CONFIGS.items():
    register_network(_name)(_vgg_builder(_config))


def _lenet_builder(name: str, widths: tuple[int, int, int, int], batchnorm: bool) -> NetworkBuilder:
    def build(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
        if image_size != 32:
            raise ValueError(f"{name} needs data.image_size=32; got {image_size}")
        return LeNet5(in_channels, num_classes, widths, batchnorm)

    return build


for _name, _widths in (("lenet5", (6, 16, 120, 84)), ("lenet5_half", (3, 8, 60, 42))):
    register_network(_name)(_lenet_builder(_name, _widths, batchnorm=False))
    # BN variants exist because DeepInversion matches batch statistics stored in BN layers.
    register_network(f"{_name}_bn")(_lenet_builder(f"{_name}_bn", _widths, batchnorm=True))


def _wrn_builder(depth: int, widen: int) -> NetworkBuilder:
    def build(num_classes: int, in_channels: int, image_size: int, *, dropout: float = 0.0) -> FeatureNet:
        _check_probability("dropout", dropout)
        return WideResNet(depth, widen, in_channels, num_classes, dropout)

    return build


def list_networks() -> list[str]:
    """Sorted architecture names, with the WRN pattern and its common instances."""
    load_entry_points()
    return sorted({*_REGISTRY, _WRN_PATTERN, *_WRN_COMMON})


def _resolve(architecture: str) -> NetworkBuilder:
    load_entry_points()
    if architecture in _REGISTRY:
        return _REGISTRY[architecture]
    match = _WRN_NAME.fullmatch(architecture)
    if match is not None:
        return _wrn_builder(int(match.group(1)), int(match.group(2)))
    raise ValueError(f"unknown architecture '{architecture}'; allowed: {', '.join(list_networks())}")


def build_network(
    architecture: str, *, num_classes: int, in_channels: int, image_size: int, features: Sequence[str] | None = None,
    **args: Any
) -> FeatureNet:
    """Build ``architecture`` for inputs of shape (in_channels, image_size, image_size). A plain `nn.Module` comes
    back as a `HookedNet` whose features are the layers `features` names (read by forward hooks)."""
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("image_size", image_size)
    builder = _resolve(architecture)
    allowed = [
        param.name
        for param in inspect.signature(builder).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        names = ", ".join(f"'{key}'" for key in unknown)
        raise ValueError(
            f"unknown argument {names} for architecture '{architecture}'; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    net = builder(num_classes, in_channels, image_size, **args)
    if isinstance(net, FeatureNet):
        if features:
            raise ValueError(f"features: '{architecture}' names its own features ({', '.join(net.stage_names)}); "
                             "`features` names layers of a plain nn.Module network")
        return net
    if not isinstance(net, nn.Module):
        raise ValueError(f"architecture '{architecture}': its builder returned {type(net).__name__}, not an nn.Module")
    from methods.hooked import HookedNet

    return HookedNet(net, list(features or ()), (in_channels, image_size, image_size))


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds any BatchNorm layer (methods such as DeepInversion rely on them)."""
    # _BatchNorm is the common base of BatchNorm1d/2d/3d, SyncBatchNorm and the lazy variants.
    return any(isinstance(module, _BatchNorm) for module in model.modules())

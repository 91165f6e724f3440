"""The CIFAR networks of the RepDistiller / mdistiller teacher-student table that the rest of the zoo lacks: the
bottleneck ResNet-50 for CIFAR, MobileNetV2 at half width, ShuffleNetV1 and ShuffleNetV2 (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, code HobbitLong/RepDistiller `models/`; mdistiller ships the
same files). Written here from the papers and that code's layer layout, so that their parameter counts equal the
ones that code gives for 100 classes (counted by running `models/resnetv2.py`, `mobilenetv2.py`,
`ShuffleNetv1.py`, `ShuffleNetv2.py`; its README has no counts):

| kdo name              | RepDistiller name       | parameters (100 classes) |
|-----------------------|-------------------------|--------------------------|
| `resnet50_bottleneck` | `ResNet50` (resnetv2)   | 23,705,252               |
| `mobilenetv2_half`    | `MobileNetV2` (mobile_half: width 0.5, expansion 6) | 812,836 |
| `shufflenet_v1`       | `ShuffleV1` (groups 3)  | 949,258                  |
| `shufflenet_v2`       | `ShuffleV2` (net size 1)| 1,355,528                |

`resnet50_bottleneck` is named so that it cannot be read as a 6n+2 CIFAR ResNet (`resnet56`): it is the ImageNet
bottleneck ResNet-50 with a 3x3 stride-1 stem and no max-pool. Each network's features are its stages (`stage1..`),
the inputs of FitNets' hints, and `penultimate`, the pooled vector the classifier reads (LSH, TCS).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from methods.networks import FeatureNet, _init_weights, register_network


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _shuffle(x: Tensor, groups: int) -> Tensor:
    """Channel shuffle (ShuffleNet): interleave the channels of `groups` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(_conv_bn(cin, planes, 1), _conv_bn(planes, planes, 3, stride),
                                  _conv_bn(planes, cout, 1, relu=False))
        self.shortcut = (_conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class _StagedNet(FeatureNet):
    """The shape all four share: a stem, the stages (the features), an optional head (a 1x1 conv), global average
    pooling to the penultimate vector, a linear classifier."""

    def _finish(self, stem: nn.Module, stages: list[nn.Module], width: int, num_classes: int,
                head: nn.Module | None = None) -> None:
        self.stem, self.stages, self.head = stem, nn.ModuleList(stages), head or nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        _init_weights(self)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x, feats = self._run_stages(self.stem(x), self.stages)
        return torch.flatten(self.pool(self.head(x)), 1), feats


class BottleneckResNet(_StagedNet):
    """ResNet-50's bottleneck stages (3, 4, 6, 3 blocks of 64..512 planes, expansion 4) on a CIFAR stem."""

    def __init__(self, blocks: tuple[int, ...], in_channels: int, num_classes: int) -> None:
        super().__init__(len(blocks))
        stages, cin = [], 64
        for i, count in enumerate(blocks):
            planes = 64 * 2 ** i
            layers = []
            for j in range(count):
                layers.append(_Bottleneck(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * _Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self._finish(_conv_bn(in_channels, 64, 3), stages, cin, num_classes)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(_conv_bn(cin, mid, 1), _conv_bn(mid, mid, 3, stride, groups=mid),
                                  _conv_bn(mid, cout, 1, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(_StagedNet):
    """MobileNetV2 (Sandler et al. 2018) for 32x32: a stride-2 stem, the seven inverted-residual groups (t, c, n, s)
    with channels scaled by `width`, a 1x1 conv to 1280 channels. Stages end where RepDistiller reads its features:
    after groups 2, 3, 5 and 7."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))
    STAGE_ENDS = (2, 3, 5, 7)

    def __init__(self, width: float, in_channels: int, num_classes: int) -> None:
        super().__init__(len(self.STAGE_ENDS))
        cin = int(32 * width)
        stem = _conv_bn(in_channels, cin, 3, 2)
        groups: list[nn.Module] = []
        for t, c, n, s in self.SETTING:
            cout, layers = int(c * width), []
            for j in range(n):
                layers.append(_InvertedResidual(cin, cout, s if j == 0 else 1, t))
                cin = cout
            groups.append(nn.Sequential(*layers))
        starts = (0, *self.STAGE_ENDS[:-1])
        stages = [nn.Sequential(*groups[a:b]) for a, b in zip(starts, self.STAGE_ENDS, strict=True)]
        last = int(1280 * width) if width > 1.0 else 1280
        self._finish(stem, stages, last, num_classes, head=_conv_bn(cin, last, 1))


class _ShuffleV1Unit(nn.Module):
    """ShuffleNet's unit: grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an
    average-pooled shortcut (so its convolutions make `cout - cin` channels), stride 1 adds it."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        made = cout - cin if stride == 2 else cout
        mid = made // 4
        self.first_groups = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped (as the paper)
        self.conv1 = _conv_bn(cin, mid, 1, groups=self.first_groups)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.conv3 = _conv_bn(mid, made, 1, groups=groups, relu=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(torch.relu(self.conv2(_shuffle(self.conv1(x), self.first_groups))))
        res = self.shortcut(x)
        return torch.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(_StagedNet):
    """ShuffleNet (Zhang et al. 2018), groups 3, for 32x32: a 1x1 stem to 24 channels, three stages of 4, 8 and 4
    units (240, 480, 960 channels), each starting with a stride-2 unit."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], groups: int, in_channels: int,
                 num_classes: int) -> None:
        super().__init__(len(blocks))
        stages, cin = [], 24
        for cout, count in zip(widths, blocks, strict=True):
            stages.append(nn.Sequential(*(_ShuffleV1Unit(cin if j == 0 else cout, cout, 2 if j == 0 else 1, groups)
                                          for j in range(count))))
            cin = cout
        self._finish(_conv_bn(in_channels, 24, 1), stages, cin, num_classes)


class _ShuffleV2Unit(nn.Module):
    """ShuffleNet V2's unit: half the channels pass, the other half go 1x1, depthwise 3x3, 1x1; concatenated and
    shuffled. The stride-2 unit sends the whole input through both branches (the left one depthwise then 1x1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.left = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), _conv_bn(cin, half, 1))
            side = cin
        else:
            self.left = nn.Identity()
            side = half
        self.right = nn.Sequential(_conv_bn(side, half, 1), _conv_bn(half, half, 3, stride, groups=half, relu=False),
                                   _conv_bn(half, half, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 2:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            passed, worked = x.chunk(2, dim=1)
            out = torch.cat([passed, self.right(worked)], 1)
        return _shuffle(out, 2)


class ShuffleNetV2(_StagedNet):
    """ShuffleNet V2 (Ma et al. 2018), size 1x, for 32x32: a 1x1 stem to 24 channels, three stages (116, 232, 464
    channels) of one stride-2 unit then 3, 7 and 3 units, a 1x1 conv to 1024 channels."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], last: int, in_channels: int,
                 num_classes: int) -> None:
        super().__init__(len(blocks))
        stages, cin = [], 24
        for cout, count in zip(widths, blocks, strict=True):
            stages.append(nn.Sequential(_ShuffleV2Unit(cin, cout, 2), *(_ShuffleV2Unit(cout, cout, 1)
                                                                         for _ in range(count))))
            cin = cout
        self._finish(_conv_bn(in_channels, 24, 1), stages, last, num_classes, head=_conv_bn(cin, last, 1))


@register_network("resnet50_bottleneck")
def _resnet50(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
    return BottleneckResNet((3, 4, 6, 3), in_channels, num_classes)


@register_network("mobilenetv2_half")
def _mobilenetv2_half(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
    return MobileNetV2(0.5, in_channels, num_classes)


@register_network("shufflenet_v1")
def _shufflenet_v1(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, in_channels, num_classes)


@register_network("shufflenet_v2")
def _shufflenet_v2(num_classes: int, in_channels: int, image_size: int) -> FeatureNet:
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, in_channels, num_classes)

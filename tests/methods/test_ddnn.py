"""The depth-level dynamic ResNet: weight sharing, which blocks a sub-net runs, standalone export."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from methods.ddnn import DDNNResNet
from methods.networks import FeatureNet, build_network

CIFAR = {"num_classes": 10, "in_channels": 3, "image_size": 32}


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _warm_bn(net: DDNNResNet, x: torch.Tensor) -> None:
    """Non-trivial BN statistics for every path, so an export that dropped them would show."""
    net.train()
    with torch.no_grad():
        for k in range(len(net.configs)):
            net.forward_subnet(x, k)
    net.eval()


def test_parameters_are_exactly_the_full_nets() -> None:
    ddnn = build_network("ddnn_resnet", **CIFAR, blocks=[3, 3, 3], subnets=[[1, 1, 1], [2, 2, 2]])
    assert _count(ddnn) == _count(build_network("resnet20", **CIFAR))
    # docs/METHODS.md's ImageNet-style examples against torchvision's own ResNets.
    with torch.device("meta"):  # shapes only: no time spent initialising 20M weights
        assert _count(build_network("ddnn_resnet34", **CIFAR)) == _count(torchvision.models.resnet34(num_classes=10))
        assert _count(build_network("ddnn_resnet50", **CIFAR)) == _count(torchvision.models.resnet50(num_classes=10))
        assert _count(build_network("ddnn_resnet56", **CIFAR)) == _count(build_network("resnet56", **CIFAR))


def _cifar_torchvision(depth: int) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem (3x3/1 conv, no max-pool): kuangliu/pytorch-cifar's ResNets."""
    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@pytest.mark.parametrize(("depth", "parameters"), [(18, 11_173_962), (34, 21_282_122), (50, 23_520_842)])
def test_cifar_presets_have_the_usual_cifar_resnet_sizes(depth: int, parameters: int) -> None:
    with torch.device("meta"):
        net = build_network(f"ddnn_resnet{depth}_cifar", **CIFAR)
        assert _count(net) == parameters == _count(_cifar_torchvision(depth))
        assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
        assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
        _, feats = net(torch.empty(2, 3, 32, 32), features=True)
    assert [tuple(feats[f"stage{i}"].shape[2:]) for i in range(1, 5)] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [feats[f"stage{i}"].shape[1] for i in range(1, 5)] == [64 * 2**i * (4 if depth == 50 else 1)
                                                                  for i in range(4)]
    # The generic builder gives the same net: a 4-stage CIFAR-stem DDNN defaults to 64-128-256-512 wide.
    with torch.device("meta"):
        generic = build_network("ddnn_resnet", **CIFAR, blocks=list(net.configs[0]), subnets=[],
                                block="bottleneck" if depth == 50 else "basic")
    assert _count(generic) == parameters


@pytest.mark.parametrize(("selection", "expected"), [("first", [0, 1]), ("even", [0, 2])])
def test_a_subnet_runs_only_its_blocks(selection: str, expected: list[int]) -> None:
    net = build_network("ddnn_resnet", **CIFAR, blocks=[4, 4, 4], subnets=[[2, 2, 2], [1, 1, 1]],
                        selection=selection, widths=[8, 8, 16])
    calls: dict[tuple[int, int], int] = {}
    for s, stage in enumerate(net.stages):
        for j, block in enumerate(stage):
            block.register_forward_hook(lambda *_, key=(s, j): calls.__setitem__(key, calls.get(key, 0) + 1))
    x = torch.randn(2, 3, 16, 16)
    net.forward_subnet(x, "sub_2-2-2")
    assert sorted(calls) == [(s, j) for s in range(3) for j in expected]
    calls.clear()
    logits, feats = net.forward_subnet(x, 2, features=True)
    assert sorted(calls) == [(0, 0), (1, 0), (2, 0)]
    assert list(feats) == ["stage1", "stage2", "stage3", "penultimate"]
    assert torch.allclose(net.classifier(feats["penultimate"]), logits)
    calls.clear()
    net(x)  # plain forward: the headline, the full net by default
    assert len(calls) == 12 and set(calls.values()) == {1}


def test_sub_nets_share_weights_but_compute_different_functions() -> None:
    net = build_network("ddnn_resnet", **CIFAR, blocks=[2, 2], subnets=[[1, 1]], widths=[8, 16]).eval()
    x = torch.randn(3, 3, 16, 16)
    full, sub = net.forward_subnet(x, 0), net.forward_subnet(x, 1)
    assert not torch.allclose(full, sub)
    with torch.no_grad():
        net.stages[0][0].conv1.weight.mul_(2.0)  # a shared block: both outputs move
    assert not torch.allclose(net.forward_subnet(x, 0), full) and not torch.allclose(net.forward_subnet(x, 1), sub)


@pytest.mark.parametrize("args", [
    {"blocks": [3, 3, 3], "subnets": [[1, 1, 1], [2, 3, 1]], "selection": "even", "widths": [8, 8, 16]},
    {"blocks": [3, 3, 3], "subnets": [[1, 2, 1]], "private_bn": True, "widths": [8, 8, 16]},
    {"blocks": [2, 3], "subnets": [[1, 2]], "block": "bottleneck", "stem": "imagenet", "widths": [8, 16]},
])
def test_an_exported_subnet_is_a_plain_net_with_the_same_outputs(args: dict) -> None:
    net = build_network("ddnn_resnet", **CIFAR, **args)
    assert isinstance(net, DDNNResNet)
    x = torch.randn(8, 3, 16, 16)
    _warm_bn(net, x)
    for k in range(1, len(net.configs)):
        plain = net.export_subnet(k).eval()
        assert isinstance(plain, FeatureNet) and plain.configs == [net.configs[k]]
        rebuilt = build_network("ddnn_resnet", **CIFAR, **net.standalone_args(k))
        rebuilt.load_state_dict(plain.state_dict())  # the standalone architecture a checkpoint names
        assert _count(plain) < _count(net)
        with torch.no_grad():
            expected = net.forward_subnet(x, k)
            assert torch.allclose(plain(x), expected, atol=1e-5)
            assert torch.allclose(rebuilt.eval()(x), expected, atol=1e-5)


def test_a_uniform_cifar_subnet_exports_to_the_zoos_resnet() -> None:
    net = build_network("ddnn_resnet56", **CIFAR, subnets=[[3, 3, 3]])
    x = torch.randn(4, 3, 8, 8)
    _warm_bn(net, x)
    resnet20 = build_network("resnet20", **CIFAR)
    resnet20.load_state_dict(net.export_subnet("3-3-3").state_dict())
    with torch.no_grad():
        assert torch.allclose(resnet20.eval()(x), net.forward_subnet(x, 1), atol=1e-5)


def test_private_bn_keeps_separate_statistics_per_subnet() -> None:
    net = build_network("ddnn_resnet", **CIFAR, blocks=[2], subnets=[[1]], widths=[8], private_bn=True)
    shared_params = _count(build_network("ddnn_resnet", **CIFAR, blocks=[2], subnets=[[1]], widths=[8]))
    assert _count(net) > shared_params  # the stem's and block 0's BN exist once per sub-net
    x = torch.randn(4, 3, 8, 8)
    net.train()
    net.forward_subnet(x * 5.0, 1)
    stem_bns = net.stem[1].bns
    assert stem_bns["0"].num_batches_tracked == 0 and stem_bns["1"].num_batches_tracked == 1
    assert set(net.stages[0][1].bn1.bns) == {"0"}  # block 1 is the full net's only


@pytest.mark.parametrize(("args", "message"), [
    ({"blocks": [3, 3], "subnets": [[1, 4]]}, "exceeds"),
    ({"blocks": [3, 3], "subnets": [[1]]}, "subnets[0] must list 2"),
    ({"blocks": [3, 3], "subnets": [[3, 3]]}, "repeats"),
    ({"blocks": [3, 3], "selection": "random"}, "selection must be one of"),
    ({"blocks": [3, 3], "subnets": [[1, 1]], "headline": "sub_2-2"}, "headline must be one of"),
])
def test_bad_arguments_fail_with_one_line(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as err:
        build_network("ddnn_resnet", **CIFAR, **args)
    assert "\n" not in str(err.value)


def test_headline_subnet_is_the_plain_forward() -> None:
    net = build_network("ddnn_resnet", **CIFAR, blocks=[2, 2], subnets=[[1, 1]], widths=[8, 8],
                        headline="sub_1-1").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), net.forward_subnet(x, 1))
        with net.use_subnet("full"):
            assert torch.equal(net(x), net.forward_subnet(x, 0))


def test_forward_to_stops_at_a_stage_of_the_active_subnet() -> None:
    # A stage runs as one module call (with the sub-net's blocks), so hooks on `net.stages[i]` fire.
    from methods.feature_utils import forward_to

    torch.manual_seed(0)
    net = build_network("ddnn_resnet", **CIFAR, blocks=[3, 3, 3], subnets=[[1, 1, 1]], widths=[4, 8, 8]).eval()
    x = torch.randn(2, 3, 16, 16)
    for k in (0, 1):
        with net.use_subnet(k):
            _, feats = net(x, features=True)
            assert torch.equal(forward_to(net, "stage2", x), feats["stage2"])
    assert not torch.equal(forward_to(net, "stage2", x), net.forward_subnet(x, 1, features=True)[1]["stage2"])

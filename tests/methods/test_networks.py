from collections.abc import Iterator

import pytest
import torch
from torch import nn

from methods.networks import FeatureNet, build_network, has_batchnorm, list_networks, register_network

CONCRETE = [name for name in list_networks() if "<" not in name]


def _input_spec(name: str, image_size: int) -> tuple[int, int]:
    # LeNet-5 is defined for 32x32 digits only; the rest take small colour images to keep the suite fast.
    return (1, 32) if name.startswith("lenet5") else (3, image_size)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed_and_single_thread() -> Iterator[None]:
    # These tensors are tiny: intra-op threads only add contention (10x slower on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def test_list_networks_is_sorted_and_covers_the_zoo() -> None:
    names = list_networks()
    assert names == sorted(names)
    for expected in (
        "mlp",
        "cnn",
        "resnet8",
        "resnet20",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "vgg8",
        "vgg11",
        "vgg13",
        "lenet5",
        "lenet5_half",
        "lenet5_bn",
        "lenet5_half_bn",
        "wrn_<depth>_<width>",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
    ):
        assert expected in names


@pytest.mark.parametrize("name", CONCRETE)
def test_logits_and_features(name: str) -> None:
    in_channels, image_size = _input_spec(name, 16)
    model = build_network(name, num_classes=7, in_channels=in_channels, image_size=image_size).eval()
    assert isinstance(model, FeatureNet)
    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        plain = model(x)
        logits, feats = model(x, features=True)
    assert plain.shape == (2, 7)
    assert torch.equal(plain, logits)
    assert list(feats) == [*model.stage_names, "penultimate"]
    assert model.stage_names and all(n == f"stage{i}" for i, n in enumerate(model.stage_names, 1))
    assert feats["penultimate"].shape == (2, model.feature_dim)
    assert model.feature_dim == model.classifier.in_features
    assert isinstance(model.classifier, nn.Linear)
    with torch.no_grad():
        assert torch.equal(model.classifier(feats["penultimate"]), logits)
    expected_ndim = 2 if name == "mlp" else 4
    assert all(f.ndim == expected_ndim and f.shape[0] == 2 for s, f in feats.items() if s != "penultimate")


@pytest.mark.parametrize("name", CONCRETE)
def test_features_carry_gradients_in_train_mode(name: str) -> None:
    # KD losses backpropagate through stored stage maps; an in-place op on one would break this.
    in_channels, image_size = _input_spec(name, 8)
    model = build_network(name, num_classes=5, in_channels=in_channels, image_size=image_size).train()
    logits, feats = model(torch.randn(2, in_channels, image_size, image_size), features=True)
    loss = logits.square().mean() + sum(f.square().mean() for f in feats.values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert next(model.parameters()).grad.abs().sum() > 0


# Reference counts (3x32x32 input, 100 classes) from CRD (Tian et al., ICLR 2020) and the RepDistiller
# model zoo; the comment after each range is what this implementation measures.
@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet20", 0.26e6, 0.29e6),  # CRD 0.28M; measured 278,324
        ("resnet56", 0.82e6, 0.90e6),  # CRD 0.86M; measured 861,620
        ("resnet8x4", 1.10e6, 1.32e6),  # CRD 1.2M; measured 1,233,540
        ("resnet32x4", 6.9e6, 7.9e6),  # CRD 7.4M; measured 7,433,860
        ("wrn_40_2", 2.0e6, 2.45e6),  # CRD 2.2M; measured 2,255,156
        ("wrn_16_2", 0.63e6, 0.77e6),  # CRD 0.70M; measured 703,284
        ("vgg8", 3.6e6, 4.4e6),  # CRD ~4M; measured 3,963,556 (bias-free convs before BN)
    ],
)
def test_parameter_counts(name: str, low: float, high: float) -> None:
    model = build_network(name, num_classes=100, in_channels=3, image_size=32)
    assert low <= _n_params(model) <= high


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20", "resnet8x4", "vgg8"])
def test_small_grayscale_digits(name: str) -> None:
    model = build_network(name, num_classes=10, in_channels=1, image_size=8).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(3, 1, 8, 8), features=True)
    assert logits.shape == (3, 10)
    assert feats["penultimate"].shape == (3, model.feature_dim)


def test_resnet20_stage_shapes() -> None:
    model = build_network("resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(1, 3, 32, 32), features=True)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stage1": (1, 16, 32, 32),
        "stage2": (1, 32, 16, 16),
        "stage3": (1, 64, 8, 8),
        "penultimate": (1, 64),
    }
    # Stage outputs are post-ReLU.
    assert all(feats[s].min() >= 0 for s in model.stage_names)


def test_vgg8_keeps_a_4x4_last_block_on_32x32() -> None:
    model = build_network("vgg8", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(1, 3, 32, 32), features=True)
    assert [feats[s].shape[-1] for s in model.stage_names] == [32, 16, 8, 4, 4]


def test_wrn_stage3_is_activated_and_pattern_names_parse() -> None:
    model = build_network("wrn_10_3", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, 32, 32), features=True)
    assert feats["stage3"].shape == (2, 192, 8, 8)
    assert feats["stage3"].min() >= 0
    assert feats["stage1"].min() < 0  # pre-activation trunk: earlier stages are not rectified


def test_lenet_feature_shapes() -> None:
    model = build_network("lenet5_half", num_classes=10, in_channels=1, image_size=32).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(1, 1, 32, 32), features=True)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stage1": (1, 3, 14, 14),
        "stage2": (1, 8, 5, 5),
        "stage3": (1, 60, 1, 1),
        "penultimate": (1, 42),
    }


def test_mlp_and_cnn_arguments() -> None:
    mlp = build_network("mlp", num_classes=4, in_channels=1, image_size=8, hidden=[32, 16, 8], dropout=0.2)
    assert mlp.stage_names == ["stage1", "stage2", "stage3"]
    assert mlp.feature_dim == 8
    cnn = build_network("cnn", num_classes=4, in_channels=3, image_size=16, width=8, batchnorm=False)
    assert cnn.feature_dim == 16
    assert not has_batchnorm(cnn)


def test_lenet_rejects_other_image_sizes() -> None:
    with pytest.raises(ValueError, match=r"lenet5 needs data\.image_size=32"):
        build_network("lenet5", num_classes=10, in_channels=1, image_size=8)


def test_cnn_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size >= 4"):
        build_network("cnn", num_classes=10, in_channels=1, image_size=3)


def test_unknown_architecture_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet21'") as info:
        build_network("resnet21", num_classes=10, in_channels=3, image_size=32)
    assert "resnet20" in str(info.value) and "wrn_<depth>_<width>" in str(info.value)


def test_bad_wrn_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+4"):
        build_network("wrn_15_2", num_classes=10, in_channels=3, image_size=32)


def test_unknown_argument_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="unknown argument 'depth'.*allowed: hidden, dropout"):
        build_network("mlp", num_classes=10, in_channels=1, image_size=8, depth=3)
    with pytest.raises(ValueError, match="allowed: none"):
        build_network("resnet20", num_classes=10, in_channels=3, image_size=32, dropout=0.1)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("mlp", {"dropout": 1.5}),
        ("mlp", {"hidden": [64, 0]}),
        ("mlp", {"hidden": 64}),
        ("cnn", {"width": True}),
        ("cnn", {"batchnorm": "yes"}),
        ("wrn_16_2", {"dropout": -0.1}),
    ],
)
def test_bad_argument_values(name: str, args: dict) -> None:
    with pytest.raises(ValueError):
        build_network(name, num_classes=10, in_channels=3, image_size=32, **args)


def test_bad_common_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_network("mlp", num_classes=0, in_channels=1, image_size=8)


def test_has_batchnorm() -> None:
    assert has_batchnorm(build_network("lenet5_bn", num_classes=10, in_channels=1, image_size=32))
    assert has_batchnorm(build_network("lenet5_half_bn", num_classes=10, in_channels=1, image_size=32))
    assert not has_batchnorm(build_network("lenet5", num_classes=10, in_channels=1, image_size=32))
    assert not has_batchnorm(build_network("mlp", num_classes=10, in_channels=1, image_size=8))


def test_register_network_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_network("mlp")(lambda num_classes, in_channels, image_size: None)


def test_conv_and_bn_initialisation() -> None:
    model = build_network("resnet8", num_classes=10, in_channels=3, image_size=32)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    conv = model.stem[0]
    # kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * k * k)).
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.2)

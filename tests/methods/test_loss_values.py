"""Every method's loss, checked by value on tiny tensors.

Each expected number is a literal or the paper's (or reference code's) formula written out here with plain torch
ops (exp, log, sum, mean, norms), never kdo's loss code; a changed sign, scale, reduction or temperature fails.
The networks are real zoo nets with hand-set weights, so their outputs are known: an `mlp` with one hidden layer
gives penultimate f = relu(x H^T) and logits z = f C^T + c.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from methods import get_method
from methods.dafl import DAFLParams
from methods.ddnn import DDNNResNet
from methods.deepinversion import DeepInversionParams, ImagePool, bn_statistics_loss, total_variation_l2
from methods.ekd import EKDParams, attention_map
from methods.fitnets import ConvReg, FitNets, FitNetsParams, hint_loss, kd_weight_at
from methods.losses import kd_kl_loss
from methods.lsh import LSHParams
from methods.networks import FeatureNet, build_network
from methods.rdskd import RDSKDGeneratorLoss, RDSKDParams
from methods.registry import LoopContext, batch_order_seed
from methods.tcs import TCSParams
from orchestrator.experiment.data import DataConfig, load_splits
from orchestrator.experiment.device_data import DeviceData

TOL = {"rel": 1e-5, "abs": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- plain-torch formulas
def softmax(z: Tensor, t: float = 1.0) -> Tensor:
    e = torch.exp(z / t - (z / t).max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def cross_entropy(z: Tensor, y: Tensor) -> float:
    """-(1/N) sum_i log softmax(z_i)[y_i]."""
    return float(-torch.log(softmax(z)[torch.arange(len(y)), y]).mean())


def kl(p: Tensor, q: Tensor) -> float:
    """sum_k p_k log(p_k / q_k), summed over classes, averaged over the batch (batchmean)."""
    return float((p * torch.log(p / q)).sum(1).mean())


def mlp(hidden: Tensor, classifier: Tensor, bias: Tensor | None = None) -> FeatureNet:
    """A real `mlp` on 1x2x2 inputs with hand-set weights: f = relu(x H^T), z = f C^T + c."""
    net = build_network("mlp", num_classes=classifier.shape[0], in_channels=1, image_size=2,
                        hidden=[hidden.shape[0]])
    with torch.no_grad():
        net.hidden[0][0].weight.copy_(hidden)
        net.hidden[0][0].bias.zero_()
        net.classifier.weight.copy_(classifier)
        net.classifier.bias.copy_(bias if bias is not None else torch.zeros(classifier.shape[0]))
    return net


X = torch.tensor([[0.5, 1.0, 0.0, 2.0], [1.5, 0.2, 0.7, 0.1], [0.3, 0.3, 1.2, 0.9]])  # three 1x2x2 "images"
IMAGES = X.view(3, 1, 2, 2)
H_T = torch.eye(4)
C_T = torch.tensor([[2.0, -1.0, 0.0, 1.0], [0.0, 1.5, -0.5, 0.0], [1.0, 0.0, 2.0, -1.0]])
H_S = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, -0.5], [0.2, 0.0, 1.0, 0.0], [0.0, 0.0, 0.3, 1.0]])
C_S = torch.tensor([[1.0, 0.0, -1.0, 0.5], [-0.5, 1.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0]])
Y = torch.tensor([0, 2, 1])


def features() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """f_t, z_t, f_s, z_s of the teacher mlp(H_T, C_T) and the student mlp(H_S, C_S) on X."""
    f_t, f_s = torch.relu(X @ H_T.t()), torch.relu(X @ H_S.t())
    return f_t, f_t @ C_T.t(), f_s, f_s @ C_S.t()


def teacher_student() -> tuple[FeatureNet, FeatureNet]:
    return mlp(H_T, C_T), mlp(H_S, C_S)


# ------------------------------------------------------------------------------------------------ KD
def test_kd_kl_literal() -> None:
    # p_t = softmax([2 ln 3, 0] / 2) = (3/4, 1/4), p_s = (1/2, 1/2): T^2 * KL = 4 * (3/4 ln 3/2 + 1/4 ln 1/2).
    value = kd_kl_loss(torch.zeros(1, 2), torch.tensor([[2 * math.log(3), 0.0]]), 2.0)
    assert value.item() == pytest.approx(4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), **TOL)
    assert value.item() == pytest.approx(0.5232481, rel=1e-6)


def test_kd_forward_value() -> None:
    teacher, student = teacher_student()
    distiller = get_method("kd")(student, teacher, get_method("kd").Params(temperature=2.0, kd_weight=0.7))
    loss, parts = distiller(IMAGES, Y)
    _, z_t, _, z_s = features()
    ce, soft = cross_entropy(z_s, Y), 4.0 * kl(softmax(z_t, 2.0), softmax(z_s, 2.0))
    assert parts["ce"].item() == pytest.approx(ce, **TOL) and parts["kd"].item() == pytest.approx(soft, **TOL)
    assert loss.item() == pytest.approx(0.3 * ce + 0.7 * soft, **TOL)


# ------------------------------------------------------------------------------------------- FitNets
def test_fitnets_hint_loss_literal() -> None:
    # 1/2 ||u - r||^2 summed over units, averaged over the batch: (1/2 (1 + 4) + 1/2 (9 + 16)) / 2 = 7.5.
    assert hint_loss(torch.zeros(2, 1, 1, 2), torch.tensor([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])).item() == 7.5


def test_fitnets_stage2_is_ce_plus_annealed_lambda_times_soft_ce_without_tau_squared() -> None:
    params = FitNetsParams(stages=2, temperature=3.0, kd_weight=4.0, kd_weight_final=1.0, anneal_start_epoch=2,
                           anneal_end_fraction=1.0, ce_weight=0.5)
    # 10 epochs: saturate 10, step (4 - 1) / (10 - 2 + 1) = 1/3; lam = 4 - (epoch - 2 + 1) / 3 from epoch 2 on.
    assert [kd_weight_at(e, params, 10) for e in (1, 2, 4, 9, 10)] == pytest.approx([4.0, 11 / 3, 3.0, 4 / 3, 1.0])
    teacher, student = teacher_student()
    distiller = FitNets(student, teacher, params)
    distiller.lam = kd_weight_at(4, params, 10)  # what start_epoch(4) sets
    loss, parts = distiller(IMAGES, Y)
    _, z_t, _, z_s = features()
    p_t, p_s = softmax(z_t, 3.0), softmax(z_s, 3.0)
    soft = float(-(p_t * torch.log(p_s)).sum(1).mean())  # CE(P_T^tau, P_S^tau), no tau^2
    ce = cross_entropy(z_s, Y)
    assert parts["soft_ce"].item() == pytest.approx(soft, **TOL) and parts["ce"].item() == pytest.approx(ce, **TOL)
    assert loss.item() == pytest.approx(0.5 * ce + 3.0 * soft, **TOL)


def test_fitnets_one_stage_is_ce_plus_hint_weight_times_mean_mse() -> None:
    teacher, student = teacher_student()
    distiller = FitNets(student, teacher, FitNetsParams(stages=1, guided_layer="stage1", hint_layer="stage1",
                                                        hint_weight=100.0))
    distiller.regressor = ConvReg((4,), (4,))
    weight = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 1.0]])
    with torch.no_grad():
        distiller.regressor.body[0].weight.copy_(weight)
        distiller.regressor.body[0].bias.fill_(0.1)
    distiller.regressor.eval()  # BN on its initial running statistics (0, 1): x / sqrt(1 + eps)
    loss, parts = distiller(IMAGES, Y)
    f_t, z_t, f_s, z_s = features()
    regressed = torch.relu((f_s @ weight.t() + 0.1) / math.sqrt(1 + 1e-5))
    mse = float(((regressed - f_t) ** 2).mean())
    assert parts["hint"].item() == pytest.approx(mse, **TOL)
    assert loss.item() == pytest.approx(cross_entropy(z_s, Y) + 100.0 * mse, **TOL)


# ----------------------------------------------------------------------------------------------- LSH
def test_lsh_forward_is_bce_with_logits_against_the_teachers_codes() -> None:
    teacher, student = teacher_student()
    distiller = get_method("lsh")(student, teacher, LSHParams(lsh_bits=3, bias="zero", feature_weight=6.0))
    w = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-0.5, 0.0, 1.0, -1.0], [0.3, 0.3, -0.6, 0.2]])
    b = torch.tensor([0.1, -0.2, 0.05])
    distiller.projection.copy_(w)
    distiller.bias.copy_(b)
    f_t, z_t, f_s, z_s = features()
    y = z_t.argmax(1).clone()
    y[1] = (y[1] + 1) % 3  # the teacher gets sample 1 wrong: correct_only leaves it out
    loss, parts = distiller(IMAGES, y)
    codes = (f_t @ w.t() + b > 0).float()
    logits = f_s @ w.t() + b
    sig = 1 / (1 + torch.exp(-logits))
    bce = -(codes * torch.log(sig) + (1 - codes) * torch.log(1 - sig)).mean(1)  # per sample, mean over bits
    mse = ((f_s - f_t) ** 2).mean(1)
    keep = torch.tensor([1.0, 0.0, 1.0])
    feature = float(((bce + mse) * keep).sum() / keep.sum())
    assert parts["lsh"].item() == pytest.approx(float(bce.mean()), **TOL)
    assert parts["mse"].item() == pytest.approx(float(mse.mean()), **TOL)
    assert parts["feature"].item() == pytest.approx(feature, **TOL)
    assert loss.item() == pytest.approx(cross_entropy(z_s, y) + 6.0 * feature, **TOL)


# ----------------------------------------------------------------------------------------------- TCS
def _tcs(params: TCSParams) -> tuple[nn.Module, dict[str, Tensor]]:
    teacher, student = teacher_student()
    distiller = get_method("tcs")(student, teacher, params)
    hand = {"A": torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, -1.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0],
                               [0.0, 0.0, 1.0, 1.0]]),
            "a": torch.tensor([0.1, 0.0, -0.1, 0.2]),
            "G": torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 0.5, 0.0], [-1.0, 0.5, 0.0, 1.0]]),
            "mask": torch.tensor([1.0, 0.5, 2.0, 1.5]), "alive": torch.tensor([1.0, 1.0, 0.0, 1.0]),
            "coords": torch.arange(24, dtype=torch.float32).view(6, 4) / 10 - 1}
    with torch.no_grad():
        distiller.project.weight.copy_(hand["A"])
        distiller.project.bias.copy_(hand["a"])
        distiller.head.weight.copy_(hand["G"])
        distiller.head.bias.zero_()
        distiller.mask.copy_(hand["mask"])
        distiller.alive.copy_(hand["alive"])
    distiller.coords = hand["coords"]
    return distiller, hand


def test_tcs_mimics_the_same_images_cached_coordinate() -> None:
    distiller, hand = _tcs(TCSParams(feature_weight=5.0))
    index = torch.tensor([4, 1, 2])  # training-set indices: neither the batch positions nor the labels
    loss, parts = distiller(IMAGES, torch.stack([Y, index], dim=1))
    _, _, f_s, _ = features()
    m = hand["mask"] * hand["alive"]
    c_s = f_s @ hand["A"].t() + hand["a"]
    logits = (m * c_s) @ hand["G"].t()
    mse = float(((m * c_s - m * hand["coords"][index]) ** 2).sum(1).mean() / hand["alive"].sum())
    assert parts["mse"].item() == pytest.approx(mse, **TOL)
    assert loss.item() == pytest.approx(cross_entropy(logits, Y) + 5.0 * mse, **TOL)


def digits_context() -> LoopContext:
    """A LoopContext over real digits (8x8), wired as the training loop wires it; no tracker, no optimizer."""
    data = DeviceData(load_splits(DataConfig(name="digits", val_fraction=0.2, batch_size=64)), torch.device("cpu"))

    def batches(epoch: int, phase: str = "student", with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        return data.train_batches(64, seed=batch_order_seed(0, epoch, phase), with_index=with_index)

    return LoopContext(
        device=data.device, num_classes=10, image_shape=(1, 8, 8), batch_size=64, epochs=1, precision="fp32",
        train_batches=batches, clean_batches=lambda size: data.eval_batches("train", size),
        log=lambda metrics, step: None, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        accuracy=lambda net, split: 0.0, fingerprint=lambda: "digits", log_images=lambda images, name: None,
        set_tags=lambda tags: None, indexed_train_batches=lambda epoch: batches(epoch, with_index=True),
        train_images=data.train_images)


def test_tcs_cached_coordinate_of_a_batch_index_is_that_images_teacher_coordinate() -> None:
    torch.manual_seed(0)
    student, teacher = (build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=w) for w in (4, 8))
    distiller = get_method("tcs")(student, teacher, TCSParams())
    ctx = digits_context()
    distiller.setup(ctx)
    pca = distiller.teacher_pass(ctx)
    x, y = next(iter(distiller.batches(1, ctx)))
    index = y[:, 1]
    assert not torch.equal(index, torch.arange(len(index)))
    with torch.no_grad():
        f_t = distiller.teacher(ctx.train_images(index), features=True)[1]["penultimate"].double()
    expected = ((f_t - pca["mean"]) @ pca["basis"]).float()
    assert torch.allclose(distiller.coords[index], expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- DAFL / RDSKD
def entropy_of_mean(z: Tensor, log: object) -> float:
    pbar = softmax(z).mean(0)
    return float((pbar * log(pbar)).sum())  # type: ignore[operator]


Z_GEN = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-1.0, 2.5, 0.0], [1.0, 1.0, 3.0]])


def test_dafl_generator_loss_weights_sign_onehot_and_log10_entropy() -> None:
    teacher = build_network("lenet5", num_classes=3, in_channels=1, image_size=32)
    student = build_network("lenet5_half", num_classes=3, in_channels=1, image_size=32)
    params = DAFLParams(onehot_weight=0.7, activation_weight=0.3, entropy_weight=2.0)
    distiller = get_method("dafl")(student, teacher, params)
    f_t = torch.tensor([[-1.0, 2.0], [3.0, -4.0], [0.5, 0.5], [0.0, -2.0]])  # mean |f| = 13 / 8
    total, parts = distiller.generator_loss(torch.zeros(4, 1, 32, 32), Z_GEN, {"stage3": f_t})
    onehot = cross_entropy(Z_GEN, Z_GEN.argmax(1))
    entropy = entropy_of_mean(Z_GEN, torch.log10)
    assert parts["activation"].item() == -13 / 8
    assert parts["onehot"].item() == pytest.approx(onehot, **TOL)
    assert parts["entropy"].item() == pytest.approx(entropy, **TOL)
    assert total.item() == pytest.approx(0.7 * onehot + 0.3 * (-13 / 8) + 2.0 * entropy, **TOL)


def test_rdskd_generator_loss_with_its_snapshots() -> None:
    torch.manual_seed(0)
    loss = RDSKDGeneratorLoss(RDSKDParams())  # snapshot_interval 120: refreshed at generator iteration 1
    batches = [(torch.randn(4, 1, 2, 2), torch.randn(4, 3) * 2) for _ in range(3)]

    def terms(images: Tensor, z: Tensor) -> tuple[float, float, float]:
        p = softmax(z)
        ds = torch.sqrt(((p[2:] - p[:2]) ** 2).sum()) / torch.sqrt(((images[2:] - images[:2]) ** 2).sum())
        return cross_entropy(z, z.argmax(1)), entropy_of_mean(z, torch.log), float(ds)

    (oh0, ie0, ds0), (oh1, ie1, ds1), (oh2, ie2, ds2) = (terms(*b) for b in batches)
    expected = [math.exp(oh0) + math.exp(ie0) + ds0,  # snapshots start at 0
                math.exp(oh1) + math.exp(ie1) + ds1,  # still 0; iteration 1 then refreshes them to (oh1, ie1)
                math.exp(oh2 - oh1) + math.exp(ie2 - ie1) + ds2]
    for (images, z), value in zip(batches, expected, strict=True):
        total, parts = loss(images, z, {})
        assert total.item() == pytest.approx(value, **TOL)
    assert parts["diversity"].item() == pytest.approx(ds2, **TOL)
    weighted = RDSKDGeneratorLoss(RDSKDParams(onehot_weight=2.0, entropy_weight=0.5, diversity_weight=3.0))
    total, _ = weighted(*batches[0], {})
    assert total.item() == pytest.approx(2 * math.exp(oh0) + 0.5 * math.exp(ie0) + 3 * ds0, **TOL)


def test_rdskd_student_loss_is_t_squared_kl_at_t_10() -> None:
    teacher, student = teacher_student()
    distiller = get_method("rdskd")(student, teacher, RDSKDParams())
    loss, _ = distiller(IMAGES, None)
    _, z_t, _, z_s = features()
    # fp32 KL of nearly equal distributions: agreement to ~2e-5 relative (100x smaller than T^2 vs T or 1).
    assert loss.item() == pytest.approx(100.0 * kl(softmax(z_t.double(), 10.0), softmax(z_s.double(), 10.0)),
                                        rel=1e-4)


# ------------------------------------------------------------------------------------------ DeepInversion
def test_deepinversion_tv_and_bn_literals() -> None:
    x = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    # right: (-1, -4), down: (-3, -6), the two diagonals: 4 - 2 and 1 - 8.
    assert total_variation_l2(x).item() == pytest.approx(math.sqrt(17) + math.sqrt(45) + 2 + 7, **TOL)
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 2.0]))
    inputs = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[1.0, 3.0]], [[2.0, 2.0]]]])  # (2, 2, 1, 2)
    # channel means (2, 1), biased variances (1, 1): ||(1, 1)|| + ||(0, -1)|| = sqrt(2) + 1.
    assert bn_statistics_loss(bn, inputs).item() == pytest.approx(math.sqrt(2) + 1, **TOL)


def test_deepinversion_synthesis_loss_is_the_weighted_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    teacher = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=2).eval()
    student = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=2)
    with torch.no_grad():  # non-trivial BN statistics to match
        for bn in (m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    params = DeepInversionParams(bn_weight=10.0, first_bn_multiplier=3.0, tv_weight=0.5, l2_weight=0.25,
                                 competition_weight=2.0, competition_temperature=3.0, synthesis_iterations=1,
                                 jitter=0)
    pool = ImagePool(teacher, student, params, image_shape=(1, 8, 8), num_classes=10, batch_size=4,
                     device=torch.device("cpu"), pixel_range=None)
    torch.manual_seed(1)
    parts = pool.synthesize()
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)  # the batch the first (only) step scored
    inputs: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, i, _o: inputs.append(i[0]))
               for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        z_t = teacher(x)
        student.eval()
        z_s = student(x)
    for handle in handles:
        handle.remove()
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    def bn_term(u: Tensor, bn: nn.BatchNorm2d) -> Tensor:  # ||mu - mu_BN||_2 + ||var - var_BN||_2, biased var
        mean = u.mean((0, 2, 3))
        var = ((u - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
        return torch.sqrt(((mean - bn.running_mean) ** 2).sum()) + torch.sqrt(((var - bn.running_var) ** 2).sum())

    bn_terms = [bn_term(u, m) for u, m in zip(inputs, layers, strict=True)]
    bn_value = float(3.0 * bn_terms[0] + sum(bn_terms[1:]))
    tv = float(sum(torch.sqrt((d ** 2).sum()) for d in (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
                                                        x[..., 1:, :-1] - x[..., :-1, 1:],
                                                        x[..., :-1, :-1] - x[..., 1:, 1:])))
    l2 = float(torch.sqrt((x ** 2).sum()))
    # ADI competition as NVlabs' code: 1 - clamp(0.5 KL(M || P) + 0.5 KL(M || Q), 0, 1), P, Q, M clamped to
    # [0.01, 0.99], KL batch-mean, P = softmax(z_s / 3), Q = softmax(z_t / 3), M = (P + Q) / 2.
    p, q = softmax(z_s, 3.0), softmax(z_t, 3.0)
    mix = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * float((mix * torch.log(mix / p)).sum(1).mean()) + 0.5 * float((mix * torch.log(mix / q)).sum(1).mean())
    competition = 1.0 - min(max(js, 0.0), 1.0)
    ce = cross_entropy(z_t, torch.arange(4) % 10)
    expected = {"ce": ce, "bn": bn_value, "tv": tv, "l2": l2, "competition": competition}
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert parts["total"].item() == pytest.approx(ce + 10 * bn_value + 0.5 * tv + 0.25 * l2 + 2 * competition,
                                                  rel=1e-4)


# ----------------------------------------------------------------------------------------------- EKD
def test_ekd_attention_map_literal() -> None:
    feature = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2): mean_c F^2 = (5, 10)
    assert attention_map(feature).flatten().tolist() == pytest.approx([5 / math.sqrt(125), 10 / math.sqrt(125)],
                                                                       **TOL)


def test_ekd_loss_value() -> None:
    torch.manual_seed(0)
    net = build_network("ddnn_resnet", num_classes=3, in_channels=1, image_size=4, blocks=[2, 2],
                        subnets=[[1, 1]], widths=[2, 4]).eval()
    assert isinstance(net, DDNNResNet)
    params = EKDParams(temperature=2.0, kl_weight=0.5, attention_weight=10.0, subnet_ce_weight=2.0)
    distiller = get_method("ekd")(net, None, params).eval()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 2, 1])
    loss, parts = distiller(x, y)
    with torch.no_grad():
        z_f, feats_f = net.forward_subnet(x, 0, features=True)
        z_k, feats_k = net.forward_subnet(x, 1, features=True)

    def att(f: Tensor) -> Tensor:
        energy = (f ** 2).mean(1).flatten(1)
        return energy / torch.sqrt((energy ** 2).sum(1, keepdim=True))

    at = sum(float(((att(feats_f[s]) - att(feats_k[s])) ** 2).mean()) for s in ("stage1", "stage2"))
    soft = 4.0 * kl(softmax(z_f, 2.0), softmax(z_k, 2.0))
    assert parts["kl/sub_1-1"].item() == pytest.approx(soft, **TOL)
    assert parts["at/sub_1-1"].item() == pytest.approx(at, **TOL)
    expected = cross_entropy(z_f, y) + 2.0 * cross_entropy(z_k, y) + 0.5 * soft + 10.0 * at
    assert loss.item() == pytest.approx(expected, **TOL)

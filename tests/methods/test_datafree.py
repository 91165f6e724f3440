"""Data-free KD: the seam, RDSKD, DAFL and DeepInversion on real tensors, in-process loops and `kdo run`."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from methods import get_method
from methods.datafree import diversity_loss, mean_entropy_loss, onehot_loss
from methods.deepinversion import bn_hooks, bn_statistics_loss
from methods.generators import DAFLGenerator
from methods.networks import build_network
from methods.rdskd import RDSKDGeneratorLoss, RDSKDParams
from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.experiment.checkpoints import load_checkpoint
from orchestrator.experiment.config import load_config
from orchestrator.experiment.config_files import read_yaml
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.device_data import DeviceData
from orchestrator.experiment.loop import train_loop

DIGITS32 = {"name": "digits", "val_fraction": 0.2, "batch_size": 64, "image_size": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two busy cores: one intra-op thread avoids OpenMP oversubscription (20x slower small convs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bn_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5-BN trained on digits at 32 px by the bare loop: it serves all three data-free methods."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config({"name": "teacher", "data": DIGITS32, "student": {"architecture": "lenet5_bn"},
                       "method": {"name": "ce"}, "training": {"epochs": 8, "lr": 0.05, "seed": 0}})
    path = tmp_path_factory.mktemp("bn_teacher") / "teacher.pt"

    def keep_final(metrics: dict, checkpoint_dir: str | None) -> None:
        if "test_acc" in metrics and checkpoint_dir is not None:
            shutil.copy(Path(checkpoint_dir) / "student.pt", path)

    out = train_loop(cfg, load_splits(cfg.data), report=keep_final, log=None)
    torch.set_num_threads(threads)
    assert out.status == "finished" and out.final["test_acc"] > 0.9
    return path


def _config(method: str, teacher: Path, params: dict, epochs: int = 2) -> dict:
    return {"name": f"test_{method}", "data": DIGITS32, "student": {"architecture": "lenet5_half"},
            "teacher": {"checkpoint": str(teacher)}, "method": {"name": method, "params": params},
            "training": {"epochs": epochs, "optimizer": "adam", "lr": 0.005, "weight_decay": 0.0,
                         "schedule": "constant", "seed": 0}}


TINY = {
    "rdskd": {"generator_epochs": 1, "iterations_per_epoch": 4, "snapshot_interval": 2, "base_channels": 8},
    "dafl": {"iterations_per_epoch": 4, "base_channels": 8},
    "deepinversion": {"iterations_per_epoch": 4, "synthesis_iterations": 5},
}


# ------------------------------------------------------------------------------------------- RDSKD
def test_exponential_penalty_gradient_is_the_penalty_itself() -> None:
    # d exp(L - L~)/dL = exp(L - L~), checked through the generator loss on real logits: with the other terms
    # off, dL_G/dlogits = exp(L_oh - L~_oh) * dL_oh/dlogits, where L~_oh is the previous call's L_oh.
    torch.manual_seed(0)
    loss = RDSKDGeneratorLoss(RDSKDParams(snapshot_interval=1, entropy_weight=0.0, diversity_weight=0.0))
    images = torch.randn(8, 1, 32, 32)
    first = torch.randn(8, 10) * 3
    loss(images, first, {})
    reference = onehot_loss(first).detach()
    logits = torch.randn(8, 10, requires_grad=True)
    total, parts = loss(images, logits, {})
    (grad_total,) = torch.autograd.grad(total, logits)
    oh = onehot_loss(logits)
    (grad_oh,) = torch.autograd.grad(oh, logits)
    penalty = torch.exp(oh.detach() - reference)
    assert total.item() == pytest.approx(penalty.item(), rel=1e-6)
    assert torch.allclose(grad_total, penalty * grad_oh, atol=1e-7)
    assert parts["onehot"].item() == pytest.approx(oh.item())


@pytest.mark.parametrize(("interval", "expected"), [(5, [1, 6, 11]), (120, [1, 121]), (1, list(range(13)))])
def test_snapshot_refreshes_exactly_on_the_interval(interval: int, expected: list[int]) -> None:
    torch.manual_seed(0)
    loss = RDSKDGeneratorLoss(RDSKDParams(snapshot_interval=interval))
    refreshed = []
    for iteration in range(13 if interval < 120 else 130):
        before = loss.onehot_reference
        logits = torch.randn(16, 10) * (1 + iteration)
        loss(torch.randn(16, 1, 8, 8), logits, {})
        if loss.onehot_reference is not before:
            refreshed.append(iteration)
            assert float(loss.onehot_reference) == pytest.approx(onehot_loss(logits).item())
            assert float(loss.entropy_reference) == pytest.approx(mean_entropy_loss(logits).item())
    assert refreshed == expected


def test_generator_shapes_and_bn_eps_quirk() -> None:
    for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
        g = DAFLGenerator(20, shape, base_channels=16)
        x = g(torch.randn(6, 20))
        assert x.shape == (6, *shape)
        # The final non-affine BN standardizes each channel over the batch (train mode).
        assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(shape[0]), atol=1e-4)
    eps = [m.eps for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert eps == [1e-5, 0.8, 0.8, 1e-5]
    with pytest.raises(ValueError, match="multiple of 4"):
        DAFLGenerator(20, (1, 30, 30))


# -------------------------------------------------------------------------------------------- DAFL
def test_information_entropy_is_minimal_for_a_uniform_mean_prediction() -> None:
    torch.manual_seed(0)
    balanced = torch.eye(10).repeat(3, 1) * 20  # confident, every class equally often: pbar uniform
    assert mean_entropy_loss(balanced, base=10.0).item() == pytest.approx(-1.0, abs=1e-5)
    assert mean_entropy_loss(torch.zeros(4, 10)).item() == pytest.approx(-math.log(10), abs=1e-5)
    for _ in range(20):
        skewed = torch.randn(32, 10) * 3 + torch.linspace(0, 3, 10)
        assert mean_entropy_loss(skewed, base=10.0).item() > -1.0 + 1e-3
    collapsed = torch.zeros(8, 10)
    collapsed[:, 3] = 50.0  # one class only: entropy 0 (and an underflowed pbar_k gives 0, not NaN)
    assert mean_entropy_loss(collapsed, base=10.0).item() == pytest.approx(0.0, abs=1e-5)
    # log10 (DAFL code) vs ln (RDSKD code) differ by the factor ln 10.
    logits = torch.randn(16, 10)
    assert mean_entropy_loss(logits).item() == pytest.approx(mean_entropy_loss(logits, 10.0).item() * math.log(10))


def test_diversity_loss_is_guarded_when_outputs_coincide() -> None:
    torch.manual_seed(0)
    half_images, half_logits = torch.randn(4, 1, 8, 8), torch.randn(4, 10)
    for images in (torch.cat([half_images, half_images]), torch.cat([half_images, half_images + 1])):
        x = images.clone().requires_grad_(True)
        logits = torch.cat([half_logits, half_logits]).requires_grad_(True)
        value = diversity_loss(x, logits)
        value.backward()
        assert value.item() == 0.0
        assert torch.isfinite(x.grad).all() and torch.isfinite(logits.grad).all()
    images, logits = torch.randn(8, 1, 8, 8), torch.randn(8, 10)
    probs = logits.softmax(1)
    expected = (probs[4:] - probs[:4]).norm() / (images[4:] - images[:4]).norm()
    assert diversity_loss(images, logits).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("teacher_name", ["lenet5", "lenet5_bn"])
def test_dafl_activation_loss_reads_lenet5s_120_unit_conv3_output_by_default(teacher_name: str) -> None:
    # DAFL's LeNet-5 returns feature = relu(conv3(x)).view(-1, 120) for L_a, not the 84-unit FC output.
    torch.manual_seed(0)
    teacher = build_network(teacher_name, num_classes=10, in_channels=1, image_size=32).eval()
    student = build_network("lenet5_half", num_classes=10, in_channels=1, image_size=32)
    method = get_method("dafl")
    distiller = method(student, teacher, method.Params())
    assert distiller.activation_layer == "stage3"
    images = torch.randn(6, 1, 32, 32)
    logits, feats = teacher(images, features=True)
    conv3 = feats["stage3"].flatten(1)
    assert conv3.shape == (6, 120) and feats["penultimate"].shape == (6, 84)
    _, parts = distiller.generator_loss(images, logits, feats)
    assert parts["activation"].item() == pytest.approx(-conv3.abs().mean().item(), rel=1e-6)
    assert parts["activation"].item() != pytest.approx(-feats["penultimate"].abs().mean().item(), rel=1e-3)
    chosen = method(student, teacher, method.Params(activation_layer="penultimate"))
    _, parts = chosen.generator_loss(images, logits, feats)
    assert parts["activation"].item() == pytest.approx(-feats["penultimate"].abs().mean().item(), rel=1e-6)
    cnn = build_network("cnn", num_classes=10, in_channels=1, image_size=32, width=4)
    assert method(student, cnn, method.Params()).activation_layer == "penultimate"
    with pytest.raises(ValueError, match=r"^method\.params\.activation_layer: unknown layer 'fc9'"):
        method.check_setup(method.Params(activation_layer="fc9"), student=student, teacher=teacher, num_workers=1)


# ---------------------------------------------------------------------------------- DeepInversion
def test_bn_hook_loss_vanishes_when_batch_statistics_match_running_statistics() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).eval()
    x = torch.randn(32, 5, 6, 6) * 2 + 3
    bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    assert bn_statistics_loss(bn, x).item() == pytest.approx(0.0, abs=1e-4)
    assert bn_statistics_loss(bn, x + 0.5).item() == pytest.approx(0.5 * math.sqrt(5), rel=1e-4)
    # Through the hooks on a whole BN network: one term per BN layer, read from each layer's input.
    net = build_network("lenet5_bn", num_classes=10, in_channels=1, image_size=32).eval()
    with bn_hooks(net) as losses:
        net(torch.randn(4, 1, 32, 32))
        assert len(losses) == 3 and all(loss.item() > 0 for loss in losses)
    net(torch.randn(4, 1, 32, 32))
    assert len(losses) == 3, "the hooks are removed when the context ends"


def test_teacher_without_batchnorm_is_a_one_line_config_error(workdir: Path) -> None:
    raw = read_yaml("digits_deepinversion_cpu_small")
    raw["teacher"]["architecture"] = "lenet5"
    with pytest.raises(ConfigError, match=r"^teacher\.architecture: deepinversion .*no BatchNorm"):
        load_config(raw)
    path = workdir / "di_no_bn.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "teacher.architecture" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["rdskd", "dafl", "deepinversion"])
def test_data_free_methods_reject_several_workers(method: str) -> None:
    with pytest.raises(ConfigError, match=r"^scaling\.num_workers: data-free .*not synchronised"):
        load_config(f"digits_{method}_cpu_small", ["scaling.num_workers=2"])


# ------------------------------------------------------------------------------------- in the loop
@pytest.mark.parametrize("method", ["rdskd", "dafl", "deepinversion"])
def test_no_real_training_sample_is_read(method: str, bn_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    eval_batches = DeviceData.eval_batches

    def no_train_batches(self: DeviceData, *args: object, **kwargs: object) -> Iterator:
        reads.append("train_batches")
        raise AssertionError("a data-free run read real training batches")

    def guarded_eval_batches(self: DeviceData, split: str, *args: object, **kwargs: object) -> Iterator:
        if split == "train":
            reads.append("eval_batches(train)")
            raise AssertionError("a data-free run read the training split")
        return eval_batches(self, split, *args, **kwargs)

    monkeypatch.setattr(DeviceData, "train_batches", no_train_batches)
    monkeypatch.setattr(DeviceData, "eval_batches", guarded_eval_batches)
    cfg = load_config(_config(method, bn_teacher, TINY[method]))
    out = train_loop(cfg, load_splits(cfg.data), load_checkpoint(bn_teacher), log=None)
    assert reads == []
    assert out.status == "finished" and [h["epoch"] for h in out.history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) and h["loss/kd"] > 0 for h in out.history)
    assert out.final["teacher_test_acc"] > 0.9 and 0.0 <= out.final["test_acc"] <= 1.0
    gen_keys = {k for h in out.history for k in h if k.startswith("gen/")}
    expected = {"rdskd": {"gen/onehot", "gen/entropy", "gen/diversity", "gen/total"},
                "dafl": {"gen/onehot", "gen/activation", "gen/entropy", "gen/total"},
                "deepinversion": {"gen/ce", "gen/bn", "gen/tv", "gen/l2", "gen/total"}}[method]
    assert gen_keys == expected


def test_generator_is_not_stepped_by_the_student_optimizer(bn_teacher: Path) -> None:
    ckpt = load_checkpoint(bn_teacher)
    student = build_network("lenet5_half", num_classes=10, in_channels=1, image_size=32)
    teacher = build_network("lenet5_bn", num_classes=10, in_channels=1, image_size=32)
    teacher.load_state_dict(ckpt["state_dict"])
    method = get_method("dafl")
    distiller = method(student, teacher, method.Params(iterations_per_epoch=2, base_channels=8))
    assert distiller.data_free

    class Ctx:
        device, image_shape, batch_size, epochs = torch.device("cpu"), (1, 32, 32), 16, 1
        log_images = staticmethod(lambda x, name: None)
        set_tags = staticmethod(lambda tags: None)

    distiller.setup(Ctx())  # type: ignore[arg-type]
    trained = {id(p) for p in distiller.optimized_parameters()}
    assert trained == {id(p) for p in student.parameters()}
    before = [p.detach().clone() for p in distiller.generator.parameters()]
    list(distiller.batches(1, Ctx()))  # type: ignore[arg-type]
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.generator.parameters(), strict=True))


def test_generator_phase_overflow_ends_the_run_diverged(bn_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With 10 classes L_oh <= ln 10 and L_ie <= 0, so the exponentials cannot overflow on their own: force it by
    # scaling L_oh by 1e4 (exp(~1e4) = inf in fp32). The inf reaches gen/* of the first student epoch, and the
    # loop stops the run there as diverged, with no student tested.
    import methods.rdskd

    monkeypatch.setattr(methods.rdskd, "onehot_loss", lambda logits: onehot_loss(logits) * 1e4)
    cfg = load_config(_config("rdskd", bn_teacher, {**TINY["rdskd"], "generator_epochs": 3}, epochs=3))
    out = train_loop(cfg, load_splits(cfg.data), load_checkpoint(bn_teacher), log=None)
    assert out.status == "diverged"
    assert len(out.history) == 1 and not math.isfinite(out.final["test_acc"])
    assert not math.isfinite(out.final["gen/total"])


# ------------------------------------------------------------------------------------- `kdo run`
def _run_shipped(name: str, teacher: Path, workdir: Path, *overrides: str) -> tuple[MlflowClient, object]:
    raw = read_yaml(name)
    raw["teacher"] = {"checkpoint": str(teacher)}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", str(path), *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    return client, run


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(120)
def test_kdo_run_logs_sample_images_and_tags_data_free(workdir: Path, bn_teacher: Path) -> None:
    client, run = _run_shipped("digits_deepinversion_cpu_small", bn_teacher, workdir, "training.epochs=3",
                               "method.params.synthesis_iterations=10", "method.params.iterations_per_epoch=5")
    assert run.info.status == "FINISHED" and run.data.tags["kdo.data_free"] == "true"
    samples = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    assert samples == [f"samples/epoch_000{e}.png" for e in (1, 2, 3)]
    assert len(client.get_metric_history(run.info.run_id, "gen/bn")) == 3


@pytest.mark.slow
@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["rdskd", "dafl", "deepinversion"])
def test_cpu_small_config_distils_clearly_above_chance(method: str, workdir: Path, bn_teacher: Path) -> None:
    client, run = _run_shipped(f"digits_{method}_cpu_small", bn_teacher, workdir)
    metrics = run.data.metrics
    assert run.data.tags["kdo.status"] == "finished"
    assert metrics["teacher_test_acc"] > 0.9
    assert metrics["test_acc"] > 0.4, metrics  # chance is 0.1; see readme_6.md for the measured spread
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    epochs = load_config(f"digits_{method}_cpu_small").training.epochs
    expected = {f"samples/epoch_{e:04d}.png" for e in {1, (epochs + 1) // 2, epochs}}
    if method == "rdskd":
        expected.add("samples/epoch_0000.png")  # after the generator phase
        assert len(client.get_metric_history(run.info.run_id, "generator/onehot")) == 4
    assert samples == expected

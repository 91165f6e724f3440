"""LSHFM (Wang, Ge, Wu, arXiv 2011.01424): hashing, bias, the 2FC fold, the size cap and a real `kdo run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from typer.testing import CliRunner

from methods.lsh import LSHFeatureMimicking, LSHParams, lsh_loss
from methods.networks import build_network
from orchestrator.cli import app
from tests.conftest import digits_config
from tests.methods.test_fitnets import cnn, loop_context


def _codes(feature: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (feature @ weight.t() + bias > 0).float()


def test_zero_bias_hash_depends_on_direction_only() -> None:
    torch.manual_seed(0)
    weight, zero = torch.randn(256, 16), torch.zeros(256)
    teacher, student = torch.randn(8, 16).relu(), torch.randn(8, 16)
    loss = lsh_loss(student, _codes(teacher, weight, zero), weight, zero)
    for factor in (0.01, 0.5, 3.0, 1000.0):  # the target codes, hence the loss, ignore the teacher's magnitude
        scaled = lsh_loss(student, _codes(factor * teacher, weight, zero), weight, zero)
        assert torch.equal(scaled, loss)
        # and the student's hash agreement with the teacher ignores its own magnitude
        assert torch.equal(_codes(factor * student, weight, zero), _codes(student, weight, zero))
    rotated = teacher[torch.arange(8).roll(1)]  # other samples' directions
    assert not torch.allclose(lsh_loss(student, _codes(rotated, weight, zero), weight, zero), loss)
    # A non-zero bias makes the codes depend on the magnitude too.
    bias = torch.randn(256)
    assert not torch.equal(_codes(0.01 * teacher, weight, bias), _codes(teacher, weight, bias))


def test_loss_falls_as_student_aligns_with_teacher_direction() -> None:
    torch.manual_seed(0)
    weight, zero = torch.randn(512, 16), torch.zeros(512)
    teacher = torch.randn(4, 16)
    codes = _codes(teacher, weight, zero)
    noise = torch.randn(4, 16)
    losses = [float(lsh_loss(a * teacher + (1 - a) * noise, codes, weight, zero).mean()) for a in (0.0, 0.5, 1.0)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("bias", ["median", "mean"])
def test_data_bias_balances_bits_on_the_teacher_pass(bias: str) -> None:
    torch.manual_seed(0)
    distiller = LSHFeatureMimicking(cnn(4), cnn(16), LSHParams(bias=bias, lsh_bits=512))
    ctx = loop_context()
    distiller.setup(ctx)
    feats = torch.cat([distiller.teacher(x, features=True)[1]["penultimate"] for x, _ in ctx.clean_batches(512)])
    rate = _codes(feats, distiller.projection, distiller.bias).mean(0)
    if bias == "median":
        assert (rate - 0.5).abs().max() < 0.01, "each bit is on for half the training set"
    else:
        assert 0.35 < float(rate.mean()) < 0.65
    zero_rate = _codes(feats, distiller.projection, torch.zeros_like(distiller.bias)).mean(0)
    assert (zero_rate - 0.5).abs().max() > 0.2, "post-ReLU features make b=0 bits unbalanced"


def test_adapter_folds_into_a_plain_student_with_the_same_logits() -> None:
    torch.manual_seed(0)
    student, teacher = cnn(4), cnn(16)
    distiller = LSHFeatureMimicking(student, teacher, LSHParams(lsh_bits=64, bias="zero"))
    assert distiller.feat_fc is not None and distiller.feat_fc.out_features == teacher.feature_dim
    x = torch.randn(16, 1, 8, 8)
    distiller.eval()
    with torch.no_grad():
        trained_logits, _ = distiller.student_feature(x)
        folded = distiller.inference_student()
        plain = cnn(4)
        plain.load_state_dict(folded.state_dict())
        plain.eval()
        assert torch.allclose(plain(x), trained_logits, atol=1e-5)
    buffers = {name for name, _ in distiller.named_buffers()}
    assert {"projection", "bias"} <= buffers
    optimized = {id(p) for p in distiller.optimized_parameters()}
    assert id(distiller.projection) not in optimized and id(student.classifier.weight) not in optimized
    assert id(distiller.feat_fc.weight) in optimized and id(distiller.head.weight) in optimized


def test_same_width_student_needs_no_adapter_and_bits_follow_params() -> None:
    distiller = LSHFeatureMimicking(cnn(16), cnn(16), LSHParams(lsh_bits_per_dim=2, sigma=0.5))
    assert distiller.feat_fc is None and tuple(distiller.projection.shape) == (64, 32)
    assert float(distiller.projection.std()) == pytest.approx(0.5, rel=0.25)
    default = LSHFeatureMimicking(cnn(4), cnn(16), LSHParams())
    assert default.projection.shape[0] == 32 * 32
    assert default.sigma == pytest.approx(float(default.teacher.classifier.weight.std()))


def test_projection_size_is_capped_with_one_clear_error() -> None:
    wide = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=512)  # D = 1024
    with pytest.raises(ValueError, match=r"method.params.lsh_bits: N=262144 bits x D=1024 makes a 1024 MiB"):
        LSHFeatureMimicking.check_setup(LSHParams(lsh_bits_per_dim=256), student=cnn(4), teacher=wide,
                                        num_workers=1)
    LSHFeatureMimicking.check_setup(LSHParams(lsh_bits_per_dim=32), student=cnn(4), teacher=wide, num_workers=1)
    with pytest.raises(ValidationError, match="not both"):
        LSHParams(lsh_bits=16, lsh_bits_per_dim=2)


def test_correct_only_ignores_samples_the_teacher_gets_wrong() -> None:
    torch.manual_seed(0)
    distiller = LSHFeatureMimicking(cnn(4), cnn(16), LSHParams(lsh_bits=64, bias="zero"))
    x = torch.randn(8, 1, 8, 8)
    wrong = (distiller.teacher(x).argmax(1) + 1) % 10
    loss, parts = distiller(x, wrong)
    assert parts["feature"].item() == 0.0 and loss.item() == pytest.approx(parts["ce"].item(), rel=1e-6)
    loss, parts = distiller(x, distiller.teacher(x).argmax(1))
    assert parts["feature"].item() > 0 and loss.item() > parts["ce"].item()


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(120)
def test_kdo_run_lsh_trains_above_chance_with_losses_in_mlflow(workdir: Path, teacher_checkpoint: Path) -> None:
    cfg = workdir / "lsh.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method={"name": "lsh", "params": {"lsh_bits_per_dim": 8,
                                                                                   "feature_weight": 1.0}},
                                                teacher={"checkpoint": str(teacher_checkpoint)})))
    result = CliRunner().invoke(app, ["run", str(cfg), "--set", "training.epochs=4"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    for key in ("loss/lsh", "loss/mse", "loss/ce"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    lsh = [m.value for m in client.get_metric_history(run.info.run_id, "loss/lsh")]
    assert lsh[-1] < lsh[0]
    assert abs(run.data.metrics["lsh/teacher_bit_on_rate"] - 0.5) < 0.01
    assert run.data.metrics["test_acc"] > 0.25  # chance is 0.1 (a 360-image test set: sd ~0.016 at chance)

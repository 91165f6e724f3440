"""DKD (Zhao et al. 2022, arXiv 2203.08679): TCKD and NCKD by hand, the KD identity, the warm-up, the defaults, logit
standardisation on DKD, and real `kdo run`s of the two logit baselines' shipped configs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from methods import get_method, list_methods
from methods.dkd import DKDParams, warmup_factor
from methods.losses import decoupled_kd_terms
from methods.networks import build_network
from orchestrator.cli import app
from orchestrator.experiment.config_files import read_yaml
from tests.methods.test_kd import Fixed

LN3 = math.log(3.0)


def dkd_parts(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, **params: object) -> dict:
    """The parts of one DKD step with the student's logits `student` and the teacher's `teacher`."""
    distiller = get_method("dkd")(nn.Identity(), Fixed(teacher), DKDParams(**params))
    return distiller(student, y)[1]


def test_tckd_and_nckd_by_hand_on_three_classes() -> None:
    # Student uniform (b_s = [1/3, 2/3], p^_s uniform); teacher softmax [1/5, 3/5, 1/5].
    student, teacher = torch.zeros(1, 3), torch.tensor([[0.0, LN3, 0.0]])
    tckd, nckd = decoupled_kd_terms(student, teacher, torch.tensor([0]), 1.0)
    # target 0: b_t = [0.2, 0.8]; p^_t over classes 1, 2 = [3/4, 1/4] against [1/2, 1/2]
    assert tckd.item() == pytest.approx(0.2 * math.log(0.2 / (1 / 3)) + 0.8 * math.log(0.8 / (2 / 3)), rel=1e-5)
    assert nckd.item() == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5), rel=1e-5)
    tckd, nckd = decoupled_kd_terms(student, teacher, torch.tensor([1]), 1.0)
    # target 1: b_t = [0.6, 0.4]; p^_t over classes 0, 2 = [1/2, 1/2]: nothing to learn on the non-targets
    assert tckd.item() == pytest.approx(0.6 * math.log(0.6 / (1 / 3)) + 0.4 * math.log(0.4 / (2 / 3)), rel=1e-5)
    assert nckd.item() == pytest.approx(0.0, abs=1e-7)
    # a batch is the mean over its samples
    tckd, nckd = decoupled_kd_terms(student.repeat(2, 1), teacher.repeat(2, 1), torch.tensor([0, 1]), 1.0)
    assert tckd.item() == pytest.approx((0.2 * math.log(0.6) + 0.8 * math.log(1.2)
                                         + 0.6 * math.log(1.8) + 0.4 * math.log(0.6)) / 2, rel=1e-5)
    assert nckd.item() == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2, rel=1e-5)


def test_temperature_divides_the_logits_and_t_squared_scales_both_terms() -> None:
    # logits x 4 at T = 4: the same distributions as above, so each term is 16 x its T = 1 value
    student, teacher = torch.zeros(1, 3), torch.tensor([[0.0, 4 * LN3, 0.0]])
    tckd, nckd = decoupled_kd_terms(student, teacher, torch.tensor([0]), 4.0)
    assert tckd.item() == pytest.approx(16 * (0.2 * math.log(0.6) + 0.8 * math.log(1.2)), rel=1e-5)
    assert nckd.item() == pytest.approx(16 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), rel=1e-5)


def test_nckd_excludes_the_target_class() -> None:
    torch.manual_seed(0)
    student, teacher, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    _, nckd = decoupled_kd_terms(student, teacher, y, 4.0)
    bump = 7.0 * F.one_hot(y, 10)  # any change of either side's target logit: NCKD does not move, TCKD does
    tckd2, nckd2 = decoupled_kd_terms(student + bump, teacher - bump, y, 4.0)
    assert nckd2.item() == pytest.approx(nckd.item(), rel=1e-5)
    assert tckd2.item() > 1.0
    # NCKD is zero when the non-target logits agree up to a constant, whatever the target logits
    same = teacher + 2.0 + 5.0 * torch.randn(6, 1) * F.one_hot(y, 10)
    assert decoupled_kd_terms(same, teacher, y, 4.0)[1].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_one_minus_teacher_target_probability_times_nckd(temperature: float) -> None:
    torch.manual_seed(1)
    student, teacher, y = 3 * torch.randn(8, 10), 3 * torch.randn(8, 10), torch.randint(0, 10, (8,))
    for i in range(8):  # the identity holds per sample (a batch mean of products is no product of means)
        s, t = student[i] / temperature, teacher[i] / temperature
        p_t = torch.softmax(t, 0)
        kd = temperature**2 * (p_t * (torch.log_softmax(t, 0) - torch.log_softmax(s, 0))).sum()
        tckd, nckd = decoupled_kd_terms(student[i:i + 1], teacher[i:i + 1], y[i:i + 1], temperature)
        assert (tckd + (1 - p_t[y[i]]) * nckd).item() == pytest.approx(kd.item(), rel=1e-4)


@pytest.mark.parametrize(("epochs", "warmup_epochs", "expected"), [
    (240, None, {1: 1 / 20, 10: 0.5, 19: 19 / 20, 20: 1.0, 21: 1.0, 240: 1.0}),  # mdistiller: 20 of 240
    (20, None, {1: 0.6, 2: 1.0, 20: 1.0}),  # the same fraction of 20 epochs: 5/3 epochs
    (20, 5, {1: 0.2, 3: 0.6, 5: 1.0, 6: 1.0}),
    (20, 0, {1: 1.0}),
])
def test_warmup_factor_per_epoch(epochs: int, warmup_epochs: int | None, expected: dict[int, float]) -> None:
    params = DKDParams(warmup_epochs=warmup_epochs)
    for epoch, factor in expected.items():
        assert warmup_factor(epoch, params, epochs) == pytest.approx(factor)


def test_dkd_step_weights_its_parts_and_warms_up() -> None:
    torch.manual_seed(0)
    student = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=4)
    teacher = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    distiller = get_method("dkd")(student, teacher, DKDParams(alpha=0.5, beta=3.0, ce_weight=2.0))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for epoch, factor in ((1, 1 / 20), (30, 1.0)):
        distiller.start_epoch(epoch, SimpleNamespace(epochs=240))
        assert distiller.epoch_metrics() == {"dkd/warmup": pytest.approx(factor)}
        loss, parts = distiller(x, y)
        assert set(parts) == {"ce", "tckd", "nckd"}
        expected = 2.0 * parts["ce"] + factor * (0.5 * parts["tckd"] + 3.0 * parts["nckd"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher is frozen"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_defaults_are_the_papers_and_logit_standardization_brings_its_own() -> None:
    assert "dkd" in list_methods()
    p = DKDParams()  # mdistiller CIFAR-100 (resnet32x4 -> resnet8x4): CE 1, alpha 1, beta 8, T 4, warm-up 20 of 240
    assert (p.ce_weight, p.alpha, p.beta, p.temperature, p.warmup_epochs) == (1.0, 1.0, 8.0, 4.0, None)
    assert p.warmup_fraction == pytest.approx(20 / 240) and p.logit_standardization is False
    ls = DKDParams(logit_standardization=True)  # logit-standardization-KD tools/train.py: T 2, alpha 1*9, beta 8*9
    assert (ls.temperature, ls.alpha, ls.beta, ls.ce_weight) == (2.0, 9.0, 72.0, 1.0)
    given = DKDParams(logit_standardization=True, beta=20.0)
    assert (given.beta, given.alpha) == (20.0, 9.0), "a value given is kept"
    with pytest.raises(ValidationError):
        DKDParams(beta=-1.0)
    with pytest.raises(ValidationError):
        DKDParams(temperature=0.0)


def test_logit_standardization_makes_dkd_invariant_to_shift_and_scale() -> None:
    torch.manual_seed(2)
    student, teacher, y = 3 * torch.randn(8, 10), 3 * torch.randn(8, 10), torch.randint(0, 10, (8,))

    def terms(s: torch.Tensor, t: torch.Tensor, ls: bool) -> torch.Tensor:
        parts = dkd_parts(s, t, y, logit_standardization=ls, temperature=2.0)
        return torch.stack([parts["tckd"], parts["nckd"]])

    base = terms(student, teacher, True)
    for s, t in ((student + 4.0, teacher), (student, teacher - 3.0), (0.2 * student, teacher),
                 (student, 5.0 * teacher), (3.0 * student - 1.0, 0.5 * teacher + 2.0)):
        assert torch.allclose(terms(s, t, True), base, rtol=1e-4, atol=1e-6)
    raw = terms(student, teacher, False)
    assert not torch.allclose(terms(0.2 * student, teacher, False), raw, rtol=1e-2)
    assert not torch.allclose(terms(student, 5.0 * teacher, False), raw, rtol=1e-2)


def _shipped_with_teacher(name: str, checkpoint: Path, folder: Path) -> str:
    raw = read_yaml(name)
    raw["teacher"] = {"checkpoint": str(checkpoint)}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(300)  # the first Ray test of a session also starts Ray and trains the teacher
@pytest.mark.parametrize(("config", "parts", "extra"), [
    ("digits_dkd", ("ce", "tckd", "nckd"), ["--set", "method.params.warmup_epochs=2"]),
    ("digits_kd_ls", ("ce", "kd"), []),
])
def test_kdo_run_of_the_shipped_logit_baselines_trains_and_logs_every_part(
        workdir: Path, teacher_checkpoint: Path, config: str, parts: tuple[str, ...], extra: list[str]) -> None:
    result = CliRunner().invoke(app, ["run", _shipped_with_teacher(config, teacher_checkpoint, workdir),
                                      "--set", "training.epochs=4", *extra])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    for part in parts:
        assert len(client.get_metric_history(run.info.run_id, f"loss/{part}")) == 4, part
    if config == "digits_dkd":
        warmup = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "dkd/warmup"),
                                          key=lambda m: m.step)]
        assert warmup == [0.5, 1.0, 1.0, 1.0]
    else:
        assert run.data.params["method.params.logit_standardization"] == "True"
    assert run.data.tags["kdo.method"] == ("dkd" if config == "digits_dkd" else "kd")
    assert run.data.metrics["test_acc"] > 0.25  # chance is 0.1 (a 360-image test set: sd ~0.016 at chance)

"""Vanilla KD (Hinton et al. 2015) and the method registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from methods import get_method, list_methods
from methods.losses import kd_kl_loss
from methods.networks import build_network


def test_registry_lists_builtin_methods() -> None:
    assert {"ce", "kd"} <= set(list_methods())
    with pytest.raises(KeyError, match="unknown method 'nope'; allowed: ce"):
        get_method("nope")


def test_kl_term_is_zero_when_student_matches_teacher() -> None:
    logits = torch.randn(16, 10) * 3
    assert kd_kl_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_loss(logits, logits + torch.randn(16, 10), 4.0).item() > 1e-3


def test_kl_term_is_batch_mean_not_class_mean() -> None:
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    per_sample = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    assert kd_kl_loss(s, t, 1.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def _grad_norm(temperature: float, scaled: bool) -> float:
    torch.manual_seed(0)
    teacher = torch.randn(64, 10)
    student = torch.randn(64, 10, requires_grad=True)
    loss = kd_kl_loss(student, teacher, temperature)
    if not scaled:
        loss = loss / temperature**2
    loss.backward()
    return float(student.grad.norm())


def test_t_squared_keeps_gradient_magnitude_comparable_across_temperatures() -> None:
    # Without T^2 the soft-target gradient shrinks like 1/T^2 (Hinton et al. 2015, section 2).
    ratio_scaled = _grad_norm(2.0, True) / _grad_norm(16.0, True)
    ratio_unscaled = _grad_norm(2.0, False) / _grad_norm(16.0, False)
    assert 0.5 < ratio_scaled < 2.0
    assert ratio_unscaled > 30


def test_kd_step_combines_ce_and_kd_with_weights() -> None:
    torch.manual_seed(0)
    student = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=4)
    teacher = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    method = get_method("kd")
    distiller = method(student, teacher, method.Params(temperature=3.0, kd_weight=0.7))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, parts = distiller(x, y)
    assert set(parts) == {"ce", "kd"}
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item() + 0.7 * parts["kd"].item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "the teacher is frozen"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_teacher_stays_in_eval_mode() -> None:
    student = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=4)
    teacher = build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    distiller = get_method("kd")(student, teacher, get_method("kd").Params())
    distiller.train()
    assert student.training and not teacher.training


def test_kd_schema_rejects_out_of_range_values() -> None:
    params = get_method("kd").Params
    with pytest.raises(ValidationError):
        params(temperature=0)
    with pytest.raises(ValidationError):
        params(kd_weight=1.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        get_method("kd")(build_network("mlp", num_classes=10, in_channels=1, image_size=8), None, params())


# ------------------------------------------------------------------ logit standardisation (Sun et al. 2024)
class Fixed(torch.nn.Module):
    """A 'network' whose logits are given: the loss is then a function of logits alone."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def _kd_part(student: torch.Tensor, teacher: torch.Tensor, **params: object) -> float:
    """The `kd` part of a KD step whose student logits are `student` and teacher logits `teacher`."""
    distiller = get_method("kd")(torch.nn.Identity(), Fixed(teacher), get_method("kd").Params(**params))
    return distiller(student, torch.zeros(student.shape[0], dtype=torch.long))[1]["kd"].item()


def _zscore(z: torch.Tensor) -> torch.Tensor:  # the paper's Z-score with the code's unbiased std and 1e-7
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


def test_logit_standardization_is_kd_on_z_scored_logits() -> None:
    torch.manual_seed(3)
    s, t = 4 * torch.randn(8, 10) + 2, 6 * torch.randn(8, 10) - 1
    zs, zt = _zscore(s) / 2.0, _zscore(t) / 2.0  # at base temperature 2
    expected = 4.0 * (F.softmax(zt, 1) * (F.log_softmax(zt, 1) - F.log_softmax(zs, 1))).sum(1).mean()
    assert _kd_part(s, t, logit_standardization=True, temperature=2.0) == pytest.approx(expected.item(), rel=1e-5)


def test_logit_standardization_ignores_shift_and_scale_of_either_side() -> None:
    torch.manual_seed(4)
    s, t = 3 * torch.randn(8, 10), 3 * torch.randn(8, 10)
    base = _kd_part(s, t, logit_standardization=True)
    for ss, tt in ((s + 5.0, t), (s, t - 2.0), (0.1 * s, t), (s, 8.0 * t), (2.5 * s + 1.0, 0.3 * t - 4.0)):
        assert _kd_part(ss, tt, logit_standardization=True) == pytest.approx(base, rel=1e-4)
    raw = _kd_part(s, t)  # without LS the loss asks the student to match the teacher's logit range
    assert _kd_part(0.1 * s, t) != pytest.approx(raw, rel=1e-2)
    assert _kd_part(s, 8.0 * t) != pytest.approx(raw, rel=1e-2)
    assert _kd_part(s, t[:, torch.randperm(10)], logit_standardization=True) != pytest.approx(base, rel=1e-2)


def test_logit_standardization_defaults_are_the_papers_and_kd_defaults_stay() -> None:
    params = get_method("kd").Params
    plain = params()
    assert (plain.temperature, plain.kd_weight, plain.ce_weight, plain.logit_standardization) == (4.0, 0.9, None,
                                                                                                 False)
    ls = params(logit_standardization=True)  # logit-standardization-KD: base temperature 2, KD 9, CE 0.1
    assert (ls.temperature, ls.kd_weight, ls.ce_weight) == (2.0, 9.0, 0.1)
    tuned = params(logit_standardization=True, kd_weight=18.0, temperature=3.0)
    assert (tuned.temperature, tuned.kd_weight, tuned.ce_weight) == (3.0, 18.0, 0.1), "values given are kept"
    assert params.model_validate(ls.model_dump()) == ls, "a dumped config validates to the same params"
    wide = params(kd_weight=100.0, ce_weight=100.0)  # the reference code weights KD far above CE
    assert (wide.kd_weight, wide.ce_weight) == (100.0, 100.0)
    with pytest.raises(ValidationError):
        params(kd_weight=100.5, ce_weight=1.0)
    with pytest.raises(ValidationError, match="method.params.ce_weight: give it when kd_weight > 1"):
        params(kd_weight=9.0)

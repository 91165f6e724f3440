"""The teacher cache key and the teacher's own data section (`teacher.data`)."""

from __future__ import annotations

import pytest

from orchestrator.experiment.config import load_config, teacher_key
from orchestrator.experiment.teachers import teacher_config
from tests.conftest import digits_config

KD = {"name": "kd"}
DESCRIBED = {"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 3, "lr": 0.05}}


# Keys computed by the code before `teacher.data` existed: caches and ledgers written then must stay valid.
@pytest.mark.parametrize(("source", "key"), [
    ("digits_kd", "5e672333c8466487"),
    ("mnist_dafl", "67a1fd74d5be26f6"),
    (digits_config(method=KD, teacher=DESCRIBED), "0e50d1322b72dde7"),
])
def test_teacher_key_is_unchanged_for_configs_without_teacher_data(source: object, key: str) -> None:
    assert teacher_key(load_config(source)) == key


def test_teacher_data_augment_changes_the_teacher_run_and_its_key_only() -> None:
    base = load_config(digits_config(method=KD, teacher=DESCRIBED))
    assert base.data.augment is True and base.teacher is not None and base.teacher.data.augment is None
    assert teacher_config(base).data.augment is True, "unset: the teacher inherits the student's augmentation"
    plain = load_config(base, ["teacher.data.augment=false"])
    assert teacher_config(plain).data.augment is False and plain.data.augment is True
    assert teacher_key(plain) != teacher_key(base)
    # Saying what it inherits anyway trains the same teacher: same key, same cache entry.
    assert teacher_key(load_config(base, ["teacher.data.augment=true"])) == "0e50d1322b72dde7"
    jittered = load_config(base, ["data.augment=false", "teacher.data.augment=true"])
    assert teacher_config(jittered).data.augment is True and jittered.data.augment is False

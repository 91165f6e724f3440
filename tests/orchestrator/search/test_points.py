"""A point is validated once: a fixed-design sweep and a study plan each (setting, seed) with one schema validation
per setting (never again: not to group it, nor on the Ray side, which unpickles the config as it is) and build each
distinct network once, however many points name it."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import orchestrator.experiment.network_checks as config_module
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.runner import check
from orchestrator.search.grouped import plan_groups
from orchestrator.search.points import TrialOptions
from orchestrator.search.spaces import load_space
from orchestrator.search.sweep import plan_points
from orchestrator.study.robustness import RobustnessStudy
from tests.conftest import digits_config

TEACHER = {"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 2}}


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Calls of the schema's validation (`ExperimentConfig.model_validate`) and of the network builder it uses."""
    counter: Counter = Counter()
    validate, build = ExperimentConfig.model_validate, config_module.build_network

    def counted_validate(obj: Any, **kwargs: Any) -> ExperimentConfig:
        counter["validations"] += 1
        return validate(obj, **kwargs)

    def counted_build(architecture: str, **kwargs: Any) -> Any:
        counter[f"built {architecture}"] += 1
        return build(architecture, **kwargs)

    config_module._built.cache_clear()  # networks checked by earlier tests in this process are built again here
    monkeypatch.setattr(ExperimentConfig, "model_validate", counted_validate)
    monkeypatch.setattr(config_module, "build_network", counted_build)
    return counter


def test_a_fixed_design_sweep_validates_each_setting_once_and_builds_each_network_once(counts: Counter) -> None:
    base = check(digits_config(method={"name": "kd"}, teacher=TEACHER, student={"architecture": "mlp", "args": {}}))
    space = load_space({"parameters": {"temperature": {"type": "choice", "values": [1.0, 2.0, 4.0, 8.0]}}}, base)
    before = counts["validations"]  # the base and the space's end checks: once per sweep, not per point
    options = TrialOptions(sampler="grid", seeds=[0, 1, 2])
    points = plan_points("s", space, base, options, checkpoints={})
    assert len(points) == 12 and counts["validations"] - before == 4  # one per setting, its 3 seeds are copies
    assert counts["built mlp"] == 1 and counts["built cnn"] == 1  # for the base, the space and all 12 points
    assert {p.config.training.seed for p in points} == {0, 1, 2}
    assert all(p.config.name == f"s-{p.setting_id[:6]}-s{p.seed}" for p in points)

    plan_groups(points, load_splits(base.data), 0, 2)
    shipped = pickle.loads(pickle.dumps(points))  # what a Tune trial receives through Ray's object store
    assert shipped[5].config == points[5].config
    assert counts["validations"] - before == 4, "grouping or shipping a point validates it again"


def test_a_study_plans_once_validates_each_setting_once_and_builds_each_network_once(workdir: Path,
                                                                                     counts: Counter) -> None:
    space = {"parameters": {"temperature": {"type": "float", "low": 1.0, "high": 8.0}}}
    study = RobustnessStudy("once", digits_config(teacher=TEACHER, student={"architecture": "mlp", "args": {}}),
                            {"kd": space, "dkd": None}, n_settings=4, seeds=[0, 1])
    settings = len({(p.tags["kdo.entry"], p.setting_id) for p in study.points})
    assert len(study.points) == 2 * settings
    # The base, each entry's base (kd, dkd, the reference ce), each space's end checks, then one per setting.
    ends = sum(2 * len(s.parameters) for s in study.spaces.values())
    assert counts["validations"] == 1 + 3 + ends + settings - 1  # ce's point is its entry's base itself
    assert counts["built mlp"] == 1 and counts["built cnn"] == 1

    counts.clear()
    study.claim_name().plan.checked()
    study.claim_name()  # `kdo study` claims before `run`, which claims again: the store is asked once
    assert study.plan.shared_config().method.name in ("kd", "dkd")
    assert counts == Counter(), "claiming the name or checking the points validated or built again"
    renamed = study.replace(name="other")
    assert all(p.config.name.startswith("other-") and p.tags["kdo.study"] == "other" for p in renamed.points)

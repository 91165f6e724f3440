from __future__ import annotations

import pytest

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_config
from orchestrator.experiment.config_files import shipped_configs
from orchestrator.search.spaces import load_space, max_epochs, shipped_spaces

BASE = load_config("digits_kd")


@pytest.mark.parametrize("path", ["data.val_fraction", "data.name", "data.image_size", "data.split_seed",
                                  "teacher.training.epochs", "scaling.cpus_per_worker", "training.seed"])
def test_a_parameter_prepared_once_per_sweep_is_refused_when_the_space_loads(path: str) -> None:
    """Data and teacher are prepared once from the base config: varying them per trial would log values
    that were never applied."""
    spec = {"type": "choice", "values": [0.1, 0.2] if "fraction" in path else [1, 2]}
    with pytest.raises(ConfigError, match=rf"parameter '{path}' cannot vary per trial") as err:
        load_space({"parameters": {path: spec}}, BASE)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="cannot vary per trial"):
        load_space({"parameters": {"temperature": {"type": "float", "low": 1, "high": 4}}, "fixed": {path: 1}}, BASE)


def test_the_per_trial_data_fields_and_every_shipped_space_still_load() -> None:
    load_space({"parameters": {"data.batch_size": {"type": "choice", "values": [32, 64]},
                               "data.augment": {"type": "choice", "values": [True, False]}}}, BASE)
    configs = {name.removeprefix("digits_").removesuffix("_cpu_small"): name for name in shipped_configs()}
    for name in shipped_spaces():
        load_space(name, load_config(configs[name]))


def test_asha_budget_is_the_largest_epochs_of_a_choice_or_a_range() -> None:
    choice = load_space({"parameters": {"training.epochs": {"type": "choice", "values": [3, 12, 6]}}}, BASE)
    ranged = load_space({"parameters": {"training.epochs": {"type": "int", "low": 2, "high": 9}}}, BASE)
    other = load_space({"parameters": {"temperature": {"type": "float", "low": 1, "high": 4}}}, BASE)
    assert (max_epochs(choice, BASE), max_epochs(ranged, BASE), max_epochs(other, BASE)) == (12, 9,
                                                                                            BASE.training.epochs)


def test_a_set_on_a_parameter_the_space_varies_fixes_it_instead_of_being_ignored(
        capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.search.points import TrialOptions
    from orchestrator.search.spaces import fixed_by
    from orchestrator.search.sweep import plan_points
    from tests.conftest import digits_config

    overrides = ["method.params.kd_weight=0.5"]
    base = load_config(digits_config(method={"name": "kd"}, teacher={"architecture": "cnn", "args": {"width": 4}}),
                       overrides)
    space = load_space("kd", base)
    assert "method.params.kd_weight" in space.parameters
    kept = fixed_by(space, overrides)
    assert "method.params.kd_weight" not in kept.parameters and set(kept.parameters) < set(space.parameters)
    assert capsys.readouterr().err == (f"--set fixes method.params.kd_weight, which the space varies: the sweep "
                                       f"varies {', '.join(kept.parameters)} only\n")  # said, not silent
    points = plan_points("s", kept, base, TrialOptions(sampler="sobol", trials=4))  # what `kdo sweep --set` plans
    assert {p.config.method.params["kd_weight"] for p in points} == {0.5}, "the user's value, every point"
    assert len({p.config.method.params["temperature"] for p in points}) > 1, "the rest is still searched"
    with pytest.raises(ConfigError, match="--set: fixes every parameter of the space"):
        fixed_by(space, [f"{p}=1" for p in space.parameters])

"""Fixed designs: the grid covers every combination once; Sobol gives 2^m distinct in-bounds points."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_config
from orchestrator.search.design import build_design
from orchestrator.search.spaces import load_space

SPACE = {"method": "kd", "parameters": {
    "temperature": {"type": "float", "low": 1.0, "high": 16.0, "log": True, "grid_points": 5},
    "kd_weight": {"type": "float", "low": 0.0, "high": 1.0, "grid_points": 3},
    "training.epochs": {"type": "int", "low": 1, "high": 4},
    "training.optimizer": {"type": "choice", "values": ["sgd", "adam"]},
}}


@pytest.fixture(scope="module")
def space():  # noqa: ANN201
    return load_space(SPACE, load_config("digits_kd"))


def test_grid_has_every_combination_exactly_once(space) -> None:  # noqa: ANN001
    points = build_design(space, "grid")
    assert len(points) == 5 * 3 * 3 * 2
    keys = {tuple(sorted(p.items())) for p in points}
    assert len(keys) == len(points)
    temps = sorted({p["method.params.temperature"] for p in points})
    assert temps == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0]), "log-spaced axis"
    assert sorted({p["training.epochs"] for p in points}) == [1, 2, 4]


def test_sobol_points_are_distinct_in_bounds_and_log_scaled(space) -> None:  # noqa: ANN001
    points = build_design(space, "sobol", 64, seed=3)
    assert len(points) == 64 and len({tuple(sorted(p.items())) for p in points}) == 64
    temps = np.array([p["method.params.temperature"] for p in points])
    assert temps.min() >= 1.0 and temps.max() <= 16.0
    # Log scale: each octave [1,2), [2,4), [4,8), [8,16) holds a quarter of the points.
    octaves = np.bincount(np.floor(np.log2(temps)).astype(int), minlength=4)
    assert octaves.tolist() == [16, 16, 16, 16]
    weights = np.array([p["method.params.kd_weight"] for p in points])
    assert np.histogram(weights, bins=4, range=(0, 1))[0].tolist() == [16, 16, 16, 16]
    assert {p["training.epochs"] for p in points} == {1, 2, 3, 4}
    assert {p["training.optimizer"] for p in points} == {"sgd", "adam"}
    assert build_design(space, "sobol", 64, seed=3) == points, "seeded: the same design again"


def test_sobol_needs_a_power_of_two(space) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"--trials: a Sobol design needs a power of two \(got 6; try 4 or 8\)"):
        build_design(space, "sobol", 6)


def test_random_design_is_seeded_and_in_bounds(space) -> None:  # noqa: ANN001
    a, b = build_design(space, "random", 10, seed=1), build_design(space, "random", 10, seed=1)
    assert a == b
    assert all(0.0 <= p["method.params.kd_weight"] <= 1.0 for p in a)
    assert all(math.log(1.0) <= math.log(p["method.params.temperature"]) <= math.log(16.0) for p in a)

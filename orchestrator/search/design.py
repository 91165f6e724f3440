"""Fixed experimental designs built up front: scrambled Sobol (2^m points), full grid, or i.i.d. random.

Shared by sweeps (`--sampler sobol|grid`) and robustness studies. Optuna's QMCSampler draws its first
trial at random and Sobol balance needs exactly 2^m points, so the points come from scipy directly.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np

from orchestrator.errors import ConfigError
from orchestrator.search.spaces import SearchSpace

Design = Literal["sobol", "grid", "random"]


def build_design(space: SearchSpace, kind: Design, n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The settings of a design, each a {config path: value} dict, in a fixed order."""
    names = list(space.parameters)
    specs = [space.parameters[k] for k in names]
    if kind == "grid":
        axes = [spec.grid() for spec in specs]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]
    if n is None or n < 1:
        raise ConfigError(f"--trials: a {kind} design needs a positive number of settings")
    if kind == "sobol":
        m = int(math.floor(math.log2(n)))
        if 2**m != n:
            raise ConfigError(f"--trials: a Sobol design needs a power of two (got {n}; try {2**m} or {2 ** (m + 1)})")
        from scipy.stats import qmc  # seconds to import: only when a Sobol design is drawn

        units = qmc.Sobol(d=len(names), scramble=True, seed=seed).random_base2(m)
    else:
        units = np.random.default_rng(seed).random((n, len(names)))
    return [{name: spec.from_unit(float(u)) for name, spec, u in zip(names, specs, row, strict=True)}
            for row in units]

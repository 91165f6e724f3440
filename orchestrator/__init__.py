"""The machinery of kd-orchestrator, in three wings that follow the flow: `experiment/` (one run),
`search/` (many runs of one method), `study/` (many methods compared); `cli.py` and `demo.py` face users.

The public names below are imported lazily: `import orchestrator` loads no Ray, MLflow, Optuna or
matplotlib, so the CLI and every Ray worker pay only for what they use.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ConfigError": "orchestrator.errors",
    "ExperimentConfig": "orchestrator.experiment.config",
    "load_config": "orchestrator.experiment.config",
    "RunResult": "orchestrator.experiment.runner",
    "run": "orchestrator.experiment.runner",
    "SweepResult": "orchestrator.search.sweep",
    "sweep": "orchestrator.search.sweep",
    "resume": "orchestrator.search.sweep",
    "RobustnessStudy": "orchestrator.study.robustness",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'orchestrator' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value

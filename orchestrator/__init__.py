"""The machinery of kd-orchestrator, in three wings that follow the flow: `experiment/` (one run),
`search/` (many runs of one method), `study/` (many methods compared); `cli.py` and `demo.py` face users.

The public names below are imported lazily: `import orchestrator` loads no Ray, MLflow, Optuna or
matplotlib, so the CLI and every Ray worker pay only for what they use.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any


def _own_packages() -> None:
    """kdo's top-level packages must be kdo's: a user's `methods.py` beside their script would shadow them and fail
    far from the cause. One line naming the clash (finding a spec imports nothing)."""
    home = Path(__file__).resolve().parents[1]
    for name in ("methods", "search_spaces"):
        found = importlib.util.find_spec(name)
        origin = Path(found.origin).resolve() if found is not None and found.origin else None
        if origin is None or origin.parent != home / name:
            raise ImportError(f"module '{name}' resolves to {origin}, not kdo's own {home / name}: rename your "
                              f"module (kdo's packages are named orchestrator, methods and search_spaces)")


_own_packages()

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
    # Your own code, in a plugin (README "Bring your own method"):
    "Distiller": "methods.registry",
    "MethodParams": "methods.registry",
    "LoopContext": "methods.registry",
    "FeatureNet": "methods.networks",
    "register_method": "methods.registry",
    "register_network": "methods.networks",
    "register_dataset": "orchestrator.experiment.datasets",
    "check_method": "orchestrator.experiment.conformance",
}
_RENAMED = {"register_method": "register"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'orchestrator' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value

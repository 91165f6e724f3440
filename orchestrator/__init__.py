"""The machinery of kd-orchestrator: config, data, the training loop, Ray, MLflow, studies and the CLI."""

from orchestrator.config import ExperimentConfig, load_config
from orchestrator.errors import ConfigError
from orchestrator.runner import RunResult, run
from orchestrator.study import RobustnessStudy
from orchestrator.sweep import SweepResult, sweep

__all__ = ["ConfigError", "ExperimentConfig", "RobustnessStudy", "RunResult", "SweepResult", "load_config", "run",
           "sweep"]

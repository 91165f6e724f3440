"""The machinery of kd-orchestrator: config, data, the training loop, Ray, MLflow and the CLI."""

from orchestrator.config import ExperimentConfig, load_config
from orchestrator.errors import ConfigError
from orchestrator.runner import RunResult, run

__all__ = ["ConfigError", "ExperimentConfig", "RunResult", "load_config", "run"]

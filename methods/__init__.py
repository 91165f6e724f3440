"""The science of kd-orchestrator: networks, losses and one distiller per method (no Ray, no MLflow)."""

from methods.registry import Distiller, MethodParams, get_method, list_methods, register

__all__ = ["Distiller", "MethodParams", "get_method", "list_methods", "register"]

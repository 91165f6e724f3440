"""The science of kd-orchestrator: networks, losses and one distiller per method (no Ray, no MLflow)."""

import methods.cifar_zoo  # noqa: F401  (registers the CIFAR table's MobileNetV2, ShuffleNets and ResNet-50)
import methods.ddnn  # noqa: F401  (registers the ddnn_* networks, so their checkpoints load in any process)
from methods.registry import Distiller, MethodParams, get_method, list_methods, register

__all__ = ["Distiller", "MethodParams", "get_method", "list_methods", "register"]

"""The method registry and the `Distiller` interface every KD method implements."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class MethodParams(BaseModel):
    """Base of every method's hyperparameter schema: typed, bounded, documented, no unknown keys."""

    model_config = ConfigDict(extra="forbid")


class Distiller(nn.Module):
    """Holds the student, the frozen teacher (if any) and the method's extra modules.

    `forward(x, y)` is one training step's loss: it returns the total loss and every named part
    (detached) for logging. Wrapping the whole distiller in DDP syncs the student and any extra
    trainable module; the teacher's parameters do not require grad, so DDP leaves them alone.
    Evaluation always uses `self.student` alone.
    """

    Params: type[MethodParams] = MethodParams
    needs_teacher: bool = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MethodParams) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.params = params
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        # The teacher stays in eval mode: its BN statistics and dropout must not move.
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        assert self.teacher is not None
        return self.teacher(x)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


_METHODS: dict[str, type[Distiller]] = {}
# Modules whose import registers the built-in methods; imported lazily to keep import cheap.
_BUILTIN_MODULES = ("methods.ce", "methods.kd")


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make a `Distiller` subclass available under `name`."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method '{name}' is already registered")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_methods() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def get_method(name: str) -> type[Distiller]:
    _load_builtins()
    if name not in _METHODS:
        raise KeyError(f"unknown method '{name}'; allowed: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]

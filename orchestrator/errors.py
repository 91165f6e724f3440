"""Errors a user can cause (one line naming the field and the allowed values; the CLI exits 2) and a pydantic
error turned into that line, the one rule for the names a user gives (sweeps, studies, MLflow experiments), the
stop signal of a driver (the CLI exits 130 or 143), and a tracking store that stopped answering (the CLI exits 1)."""

import re
import signal
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAME_RULE = "letters, digits, '_', '.', '-' (up to 100, starting with a letter or digit, no '..')"


class ConfigError(ValueError):
    """A bad config, search space, path or checkpoint, detected before any cluster work starts."""


def check_name(name: str, field: str) -> str:
    """`name` if it follows the name rule (it becomes MLflow tags, filter strings, file and folder names), else a
    ConfigError naming `field`."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{field}: {name!r} is not a valid name: {NAME_RULE}")
    return name


class Interrupted(BaseException):
    """The driver got SIGINT (Ctrl-C) or SIGTERM: its trials are stopped, its running children `interrupted`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.resume_hint = ""  # the command that finishes the work, set by the driver that was interrupted

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


class StoreUnreachable(RuntimeError):
    """The MLflow store stopped answering (the client's bounded retries spent): one line; `resume_hint` names the
    command that settles and finishes the work once it answers again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.resume_hint = ""


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _annotation_model(arg)
            if found is not None:
                return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = _annotation_model(field.annotation) if field else None
        if sub is None:
            return None
        model = sub
    return model


_NOISE = ("For further information visit", "Traceback (most recent call last)", 'File "', "^", "~")


def reason(err: BaseException, limit: int = 300) -> str:
    """An error in one short line that keeps what was wrong (a crashed run's `kdo.reason`, a failed trial's console
    line): the exception a Ray task or actor raised rather than Ray's wrapper, a pydantic error's field and message,
    else the type and the last line that is not a traceback frame or a documentation link."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError: the worker's own exception
    if isinstance(cause, BaseException) and cause is not err:
        return reason(cause, limit)
    if isinstance(err, ValidationError):
        return f"ValidationError: {format_validation_error(err, '', BaseModel)}"[:limit]
    lines = [line.strip() for line in str(err).strip().splitlines()]
    meaningful = [line for line in lines if line and not line.startswith(_NOISE)]
    return (f"{type(err).__name__}: {meaningful[-1]}" if meaningful else type(err).__name__)[:limit]


def format_validation_error(err: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    """One line for the first error: the dotted field path, what is wrong, what is allowed."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = ".".join([prefix, *map(str, loc)] if prefix else map(str, loc))
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"{path}: unknown field; allowed: {allowed}{more}"
    if first["type"] == "missing":
        return f"{path}: required field is missing{more}"
    if not loc or msg.startswith((f"{path}.", f"{path}:")):  # the check's message names its field already
        return f"{msg}{more}"
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return f"{path}: {msg}{shown}{more}"


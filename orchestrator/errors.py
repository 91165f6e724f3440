"""Errors a user can cause (one line naming the field and the allowed values; the CLI exits 2), the one rule for
the names a user gives (sweeps, studies, MLflow experiments), the stop signal of a driver (the CLI exits 130 or
143), and a tracking store that stopped answering (the CLI exits 1)."""

import re
import signal

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

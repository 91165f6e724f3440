"""Errors a user can cause (one line naming the field and the allowed values; the CLI exits 2), and the stop
signal of a driver (the CLI exits 130 or 143)."""

import signal


class ConfigError(ValueError):
    """A bad config, search space, path or checkpoint, detected before any cluster work starts."""


class Interrupted(BaseException):
    """The driver got SIGINT (Ctrl-C) or SIGTERM: its trials are stopped, its running children `interrupted`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.resume_hint = ""  # the command that finishes the work, set by the driver that was interrupted

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM

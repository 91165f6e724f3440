"""Errors a user can cause: one line naming the field and the allowed values (the CLI exits 2)."""


class ConfigError(ValueError):
    """A bad config, search space, path or checkpoint, detected before any cluster work starts."""

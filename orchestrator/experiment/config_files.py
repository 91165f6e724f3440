"""Config files and addresses: the shipped example configs, YAML read into a dict, `a.b=value` overrides, and
the tracking store's default URI and absolute URIs (the schema is `experiment.config`)."""

from __future__ import annotations

import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import ConfigError


def shipped_configs() -> list[str]:
    """Names of the example configs that ship inside the package (`kdo run NAME`)."""
    folder = resources.files("orchestrator") / "configs"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A config file by path or a shipped config by name, as a dict; ConfigError if unreadable."""
    path = Path(source)
    if not path.is_file():
        shipped = resources.files("orchestrator") / "configs" / f"{source}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"config: '{source}' is neither a file nor a shipped config; "
                              f"shipped: {', '.join(shipped_configs())}")
        text, label = shipped.read_text(), f"{source}.yaml"
    else:
        text, label = path.read_text(), str(path)
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "unparseable"
        raise ConfigError(f"{label}: malformed YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections (data, student, ...)")
    return loaded


def plugins_named(raw: dict[str, Any], where: str, beside: Path | None = None) -> list[str]:
    """The `plugins:` a config, space or study file names, their relative paths resolved beside the file (then in the
    working directory); ConfigError when it is not a list of names and paths."""
    from methods.plugins import resolve

    named = raw.get("plugins") or []
    if not isinstance(named, list) or not all(isinstance(p, str) and p.strip() for p in named):
        raise ConfigError(f"{where}plugins: a list of module names or paths to a .py file or a package folder "
                          f"(got {named!r})")
    return [resolve(p, *([beside] if beside is not None else [])) for p in named]


def import_plugins(specs: typing.Iterable[str], where: str = "") -> list[str]:
    """Import user code (idempotent) and return the specs, relative paths made absolute; one line on failure."""
    from methods.plugins import PluginError, load_plugins, resolve

    resolved = [resolve(spec) for spec in specs]
    try:
        load_plugins(resolved)
    except PluginError as err:
        raise ConfigError(f"{where}plugins: {err}") from None
    return resolved


def import_named_plugins(raw: Any) -> Any:
    """The raw mapping a schema is about to read, its `plugins` imported first (and made absolute): a `mode="before"`
    validator of every schema that names methods, networks or datasets (a config, a study). ValueError on failure."""
    from methods.plugins import merged

    named = raw.get("plugins") if isinstance(raw, dict) else None
    if isinstance(named, list) and named and all(isinstance(p, str) for p in named):
        try:
            return {**raw, "plugins": merged(import_plugins(named))}  # each once
        except ConfigError as err:
            raise ValueError(str(err)) from None
    return raw


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` in a nested config dict, creating missing (or null) sections on the way."""
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{path}: '{part}' is not a section")
        node = node[part]
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected key=value (e.g. training.lr=0.1), got '{item}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        set_path(raw, key.strip(), parsed)
    return raw



def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def absolute_uri(uri: str) -> str:
    """Make a sqlite URI or a bare path absolute: Ray runs code in other working directories."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return uri if path.startswith("/") else f"sqlite:///{Path(path).resolve()}"
    if "://" in uri or uri.startswith(("runs:/", "models:/")):
        return uri
    return str(Path(uri).resolve())


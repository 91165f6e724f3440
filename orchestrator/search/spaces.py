"""Search spaces: one YAML per method, each parameter a dotted `ExperimentConfig` path with its range.

A bare name means `method.params.<name>`. Loading checks every parameter against the whole config
schema (the method's own schema included) by validating the config at the range's ends.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import ConfigError, format_validation_error
from orchestrator.experiment.config import ExperimentConfig, require_validation
from orchestrator.experiment.config_files import plugins_named, set_path


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    grid_points: int = Field(3, ge=2, le=1000, description="points per axis of a grid design")
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got low={self.low})")
        return self

    def grid(self) -> list[Any]:
        """The axis of a grid design: evenly spaced (log-spaced when `log`), or every choice."""
        import numpy as np

        if self.type == "choice":
            return list(self.values or [])
        assert self.low is not None and self.high is not None
        space = np.geomspace if self.log else np.linspace
        points = space(self.low, self.high, self.grid_points)
        if self.type == "int":
            return sorted({int(round(p)) for p in points})
        return [float(p) for p in points]

    def from_unit(self, u: float) -> Any:
        """Map u in [0, 1) onto the range (log-uniformly when `log`)."""
        import math

        if self.type == "choice":
            values = self.values or []
            return values[min(int(u * len(values)), len(values) - 1)]
        assert self.low is not None and self.high is not None
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        if self.type == "int":
            return min(int(self.high), int(math.floor(self.low + u * (self.high - self.low + 1))))
        return value


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, description="the method this space is for (checked against the config)")
    parameters: dict[str, ParamSpec] = Field(..., min_length=1)
    fixed: dict[str, Any] = {}
    plugins: list[str] = Field([], description="user code the space's method needs (joined to the config's)")
    source: str = ""

    @model_validator(mode="before")
    @classmethod
    def _full_paths(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = dict(raw)
            raw["parameters"] = {full_path(k): v for k, v in (raw.get("parameters") or {}).items()}
            raw["fixed"] = {full_path(k): v for k, v in (raw.get("fixed") or {}).items()}
        return raw

    def apply(self, base: ExperimentConfig, setting: dict[str, Any]) -> ExperimentConfig:
        """The base config with the fixed values and one setting applied, validated."""
        raw = base.model_dump(mode="json")
        for path, value in {**self.fixed, **setting}.items():
            set_path(raw, path, value)
        return ExperimentConfig.model_validate(raw)


def full_path(name: str) -> str:
    return name if "." in name else f"method.params.{name}"


def shipped_spaces() -> list[str]:
    folder = resources.files("search_spaces")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def fixed_by(space: SearchSpace, overrides: list[str]) -> SearchSpace:
    """The space without the parameters (and fixed values) an `a.b=value` override names: the user fixed them, and
    the base config holds their value already; a space would otherwise vary them over the user's word. ConfigError
    when the overrides fix every parameter: nothing is left to search."""
    named = {item.partition("=")[0].strip() for item in overrides}
    if not named & {*space.parameters, *space.fixed}:
        return space
    kept = {path: spec for path, spec in space.parameters.items() if path not in named}
    if not kept:
        raise ConfigError(f"--set: fixes every parameter of the space ({', '.join(space.parameters)}); nothing is "
                          "left to search; drop a --set, or give a space that varies something else")
    fixed = sorted(named & set(space.parameters))
    if fixed:
        print(f"--set fixes {', '.join(fixed)}, which the space varies: the sweep varies {', '.join(kept)} only",
              file=sys.stderr)
    return space.model_copy(update={"parameters": kept,
                                    "fixed": {p: v for p, v in space.fixed.items() if p not in named}})


def space_plugins(source: str | Path | dict[str, Any] | None) -> list[str]:
    """The plugins a space names (a file's relative paths resolved beside it), read before the config is: the
    config may run the method they register."""
    if isinstance(source, dict):
        return plugins_named(source, "space: ")
    if source is None or not Path(source).is_file():
        return []
    try:
        raw = yaml.safe_load(Path(source).read_text())
    except yaml.YAMLError:
        return []  # `load_space` says what is wrong with the file
    return plugins_named(raw, f"{source}: ", Path(source).parent) if isinstance(raw, dict) else []


def load_space(source: str | Path | dict[str, Any], base: ExperimentConfig) -> SearchSpace:
    """Load a space by method name, path or dict and check it against `base` (ConfigError on any problem)."""
    if isinstance(source, dict):
        raw, label = source, "space"
    else:
        path = Path(source)
        shipped = resources.files("search_spaces") / f"{source}.yaml"
        if path.is_file():
            text, label = path.read_text(), str(path)
        elif shipped.is_file():
            text, label = shipped.read_text(), f"{source}.yaml"
        else:
            raise ConfigError(f"--space: '{source}' is neither a file nor a shipped space; "
                              f"shipped: {', '.join(shipped_spaces())}")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{label}: malformed YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{label}: a space is a mapping with 'parameters' (and optional 'method', 'fixed')")
    try:
        space = SearchSpace.model_validate({**raw, "source": label})
    except ValidationError as err:
        msg = format_validation_error(err, "", SearchSpace)
        raise ConfigError(f"{label}: {msg.replace('parameters.method.params.', 'parameters.')}") from None
    if space.method is not None and space.method != base.method.name:
        raise ConfigError(f"{label}: space is for method '{space.method}' but the config runs "
                          f"'{base.method.name}' (set method.name or pick the matching space)")
    _check_per_trial(space, label)
    _check_against_schema(space, base, label)
    return space


# Prepared once per sweep or study from the base config (data and teacher before any trial, resources by Tune),
# so a value varied per trial would be logged but never applied. Only these data fields are read per trial.
PREPARED_ONCE = ("data.", "teacher.", "scaling.", "tracking.", "training.seed")
PER_TRIAL_DATA = ("data.batch_size", "data.augment")


def _check_per_trial(space: SearchSpace, label: str) -> None:
    for path in [*space.parameters, *space.fixed]:
        if path.startswith(PREPARED_ONCE) and path not in PER_TRIAL_DATA:
            what = "seeds come from --seeds (a study's seeds)" if path == "training.seed" else (
                "data, teacher, scaling and tracking are prepared once per sweep from the config (of data, only "
                f"{' and '.join(PER_TRIAL_DATA)} vary per trial)")
            raise ConfigError(f"{label}: parameter '{path}' cannot vary per trial: {what}; set it with --set")


def max_epochs(space: SearchSpace, base: ExperimentConfig) -> int:
    """The most epochs any setting trains (ASHA's `max_t`): the range's top or the largest choice."""
    spec = space.parameters.get("training.epochs")
    if spec is None:
        return base.training.epochs
    return int(max(spec.values or [1])) if spec.type == "choice" else int(spec.high or 1)


def _check_against_schema(space: SearchSpace, base: ExperimentConfig, label: str) -> None:
    """Every path must exist and every range end be valid: validate the config at each end."""
    for path, spec in space.parameters.items():
        ends = spec.values if spec.type == "choice" else [spec.low, spec.high]
        for value in ends or []:
            value = int(value) if spec.type == "int" else value
            try:
                applied = space.apply(base, {path: value})
            except ValidationError as err:
                reason = format_validation_error(err, "", ExperimentConfig)
                raise ConfigError(f"{label}: parameter '{path}' = {value!r} is invalid: {reason}") from None
            try:
                require_validation(applied, "search")
            except ConfigError as err:
                raise ConfigError(f"{label}: parameter '{path}' = {value!r} is invalid: {err}") from None

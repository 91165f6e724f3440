"""The study spec: what `STUDY.yaml` holds (and the parent run's `study.json`), validated by pydantic."""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from methods import get_method, list_methods
from methods.plugins import merged, replaced
from orchestrator.errors import ConfigError, check_name, format_validation_error
from orchestrator.experiment.config import MAX_GROUP, MAX_SEED, ExperimentConfig, load_config
from orchestrator.experiment.config_files import import_named_plugins, import_plugins, plugins_named
from orchestrator.search.spaces import SearchSpace

LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


Protocol = Literal["best test epoch", "last epoch"]


class Published(BaseModel):
    """One published number: test accuracy in points, where it is printed, and how it was chosen."""

    model_config = ConfigDict(extra="forbid")
    accuracy: float = Field(..., ge=0.0, le=100.0, description="the published test accuracy, in points")
    source: str = Field(..., min_length=3, description="the paper and table, or the repository file, that prints it")
    protocol: Protocol = Field(..., description="how the published run chose its epoch: the best test accuracy over "
                                                "epochs (mdistiller, LS) or the last epoch (RepDistiller)")


class MethodEntry(BaseModel):
    """One entry of a study's `methods`, under its label: the method it runs (None: the label is the method's
    name), its own base config (None: the study's), its space (None: the method's shipped space) and fixed
    params."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = Field(None, description="the method the entry runs; default its label")
    config: str | dict[str, Any] | None = Field(None, description="the entry's own base config (shipped name, "
                                                "YAML path or mapping); its data and teacher must be the study's")
    space: str | dict[str, Any] | None = None
    params: dict[str, Any] = Field({}, description="method params fixed for the whole study")

    @field_validator("method")
    @classmethod
    def _known(cls, method: str | None) -> str | None:
        if method is not None and method not in list_methods():
            raise ValueError(f"unknown method '{method}'; allowed: {', '.join(list_methods())}")
        return method


class StudySpec(BaseModel):
    """A study as written in `STUDY.yaml` (and logged as `study.json` on the parent run)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="the study's name (see `errors.check_name`)")
    config: str | dict[str, Any] = Field(..., description="base experiment: shipped name, YAML path or mapping")
    methods: dict[str, MethodEntry | None] = Field(..., min_length=1)
    design: Literal["sobol", "grid", "random"] = "sobol"
    n_settings: int = Field(8, ge=0, le=4096, description="settings per method (2^m for sobol; grid: ignored; "
                            "0: every entry at its defaults only, a reproduction table)")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    include_defaults: bool = True
    references: list[str] = Field(["ce"], description="methods run at their defaults only, as reference rows")
    metric: Literal["val_acc"] = Field("val_acc", description="selection metric (test accuracy is never used)")
    delta: float = Field(1.0, gt=0, le=100, description="points of accuracy that count as 'as good as the best'")
    compare: list[tuple[str, str]] = Field([], description="pairs (A, B): is A more robust than B?")
    concurrency: int = Field(2, ge=1, le=4096)
    max_failures: int = Field(0, ge=0, le=100, description="retries of a crashed run, from its checkpoint")
    checkpoint_seconds: float = Field(30.0, ge=0, description="seconds between a run's checkpoints")
    group_size: int = Field(0, ge=0, le=MAX_GROUP, description="runs of one seed, data and teacher trained as one "
                            "group on shared batches and teacher passes (0: auto, 1: every run alone)")
    design_seed: int = Field(0, ge=0)
    set: list[str] = Field([], description="overrides of the base config: a.b=value")
    published: dict[str, Published] = Field({}, description="numbers papers report for rows of the study (entry "
                                            "labels, references, `teacher`), shown beside kdo's in the report")
    plugins: list[str] = Field([], description="user code the study's methods, networks or datasets need: module "
                               "names or paths (imported before the rest is read, and in every Ray process)")

    @model_validator(mode="before")
    @classmethod
    def _import(cls, raw: Any) -> Any:
        """Plugins are imported before the entries are read: they register the methods named."""
        return import_named_plugins(raw)

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        return check_name(name, "study.name")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
            raise ValueError(f"distinct integers in 0..{MAX_SEED}, e.g. [0, 1, 2] (got {seeds})")
        return seeds

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: dict[str, MethodEntry | None]) -> dict[str, MethodEntry | None]:
        for label, entry in methods.items():
            method = entry.method if entry is not None and entry.method is not None else label
            if method == label and label not in list_methods():
                raise ValueError(f"unknown method '{label}'; allowed: {', '.join(list_methods())} (or a label "
                                 f"with `method:`)")
            if label in list_methods() and method != label:
                raise ValueError(f"label '{label}' is the name of a method but runs '{method}'; pick another label")
            if not LABEL.fullmatch(label):
                raise ValueError(f"label '{label}': letters, digits, '_', '-' and '.' only (it names metrics and "
                                 f"files)")
        return methods

    @model_validator(mode="after")
    def _defaults_only(self) -> StudySpec:
        if not self.has_design:
            if not self.include_defaults:
                raise ValueError("study.n_settings: 0 runs each entry at its defaults only, so include_defaults "
                                 "must be true")
            if self.compare:
                raise ValueError("study.compare: robustness needs a design; with n_settings 0 (defaults only) leave "
                                 "compare empty")
        return self

    @model_validator(mode="after")
    def _published_rows(self) -> StudySpec:
        unknown = sorted(set(self.published) - {*self.all_methods, "teacher"})
        if unknown:
            raise ValueError(f"study.published: no row '{unknown[0]}' in this study; allowed: "
                             f"{', '.join([*self.all_methods, 'teacher'])}")
        return self

    @property
    def has_design(self) -> bool:
        """False for a defaults-only study (n_settings 0): each entry runs at its defaults, nothing to compare."""
        return self.n_settings > 0 or self.design == "grid"

    @property
    def all_methods(self) -> list[str]:
        """The studied entries' labels, then the references (which have no design)."""
        return [*self.methods, *[r for r in self.references if r not in self.methods]]

    def method_of(self, label: str) -> str:
        """The method an entry (or a reference) runs."""
        entry = self.methods.get(label)
        return entry.method if entry is not None and entry.method is not None else label


def build_spec(**fields: Any) -> StudySpec:
    try:
        return StudySpec(**fields)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "study", StudySpec)) from None


def method_entry(value: Any) -> dict[str, Any] | None:
    """A `methods` value: None, a space (name, path, dict or SearchSpace), or {method:, config:, space:,
    params:}."""
    if value is None:
        return None
    if isinstance(value, SearchSpace):
        return {"space": value.model_dump(mode="json", exclude={"source"})}
    if isinstance(value, Path):
        return {"space": str(value)}
    if isinstance(value, dict) and set(value) <= {"method", "config", "space", "params"}:
        return value
    return {"space": value}


def read_spec(path: str | Path, overrides: list[str] | None = None, plugins: list[str] | tuple[str, ...] = ()
              ) -> StudySpec:
    """A `STUDY.yaml` (a path, or the name of a shipped study), with a config and plugins beside it resolved;
    `plugins` join the file's."""
    source = study_path(path)
    try:
        raw = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a study is a mapping with name, config and methods")
    spec = build_spec(**{**raw, "plugins": merged(plugins_named(raw, "study.", source.parent), plugins)})
    methods = {label: entry if entry is None else entry.model_copy(update={
        "config": _beside(source, entry.config) if entry.config is not None else None,
        "space": _beside(source, entry.space) if entry.space is not None else None})
        for label, entry in spec.methods.items()}
    return spec.model_copy(update={"config": _beside(source, spec.config), "methods": methods,
                                   "set": [*spec.set, *(overrides or [])]})


def recorded_plugins(raw: dict[str, Any], given: list[str] | tuple[str, ...], what: str, *, to_resume: bool) -> None:
    """The plugins a stored study (`study.json`) recorded, with `given` taking the place of a recorded one of the same
    module name, imported now. To resume, one that fails is the error; to read the ledger, one warning line, and its
    methods are stand-ins (`methods.registry.stand_in`) whose recorded configs validate without their code."""
    from methods.registry import stand_in

    raw["plugins"] = replaced(raw.get("plugins") or [], given)
    for section in (raw["config"], *(e["config"] for e in raw["methods"].values() if e and e.get("config"))):
        section["plugins"] = replaced(section.get("plugins") or [], given)
    try:
        import_plugins(raw["plugins"])
    except ConfigError as err:
        if to_resume:
            raise ConfigError(f"{err} (recorded by {what}; pass --plugin with its new place)") from None
        print(f"warning: {err} (recorded by {what}); its results are read from the ledger alone", file=sys.stderr)
        labels = {label: (entry or {}).get("method") or label for label, entry in raw["methods"].items()}
        for method in {*labels.values(), *raw.get("references", [])} - set(list_methods()):
            stand_in(method)
        for section in (raw["config"], *(e["config"] for e in raw["methods"].values() if e and e.get("config"))):
            section["plugins"] = []
        raw["plugins"] = []


def _beside(source: Path, config: str | dict[str, Any]) -> str | dict[str, Any]:
    """A config or space named by a path relative to the study file, made absolute; names and mappings as they
    are."""
    if isinstance(config, str) and not Path(config).is_absolute() and (source.parent / config).is_file():
        return str(source.parent / config)
    return config


def study_path(path: str | Path) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = resources.files("search_spaces") / "studies" / f"{path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"STUDY: no file '{path}' and no shipped study of that name; shipped: "
                      f"{', '.join(shipped_studies())}")


def shipped_studies() -> list[str]:
    folder = resources.files("search_spaces") / "studies"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def method_config(base: ExperimentConfig, label: str, method: str, entry: MethodEntry,
                  overrides: list[str]) -> ExperimentConfig:
    """The config an entry's defaults run: its own config (with the study's overrides) running its method with the
    config's params plus the entry's; or the study's base running `method` at its defaults plus the entry's params.
    An entry's own config must train the study's teacher on the study's data (they are provisioned once)."""
    own = entry.config is not None
    try:
        raw = (load_config(entry.config, overrides, base.plugins).model_dump(mode="json") if own
               else base.model_dump(mode="json"))
    except ConfigError as err:
        raise ConfigError(f"study.methods.{label}.config: {err}") from None
    params = raw["method"]["params"] if own and raw["method"]["name"] == method else {}
    raw["method"] = {"name": method, "params": {**params, **entry.params}}
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"study.methods.{label}: {format_validation_error(err, '', ExperimentConfig)}") from None
    for section in ("data", "teacher") if get_method(method).needs_teacher else ("data",):
        if own and _shared(getattr(cfg, section)) != _shared(getattr(base, section)):
            raise ConfigError(f"study.methods.{label}.config: its {section} section differs from the study's "
                              f"config; allowed: the same {section} (every entry distils one teacher on one dataset)")
    return cfg


def _shared(section: Any) -> Any:
    """What must agree between a study's entries: the section without the batch size (which is per method)."""
    if section is None:
        return None
    return section.model_dump(mode="json", exclude={"batch_size"})


def stored_spec(spec: StudySpec, base: ExperimentConfig, spaces: dict[str, SearchSpace], cfg: ExperimentConfig) -> str:
    """The spec with its config inlined and its spaces resolved (the parent's `study.json`): enough to load or
    resume anywhere."""
    raw = spec.model_dump(mode="json")
    raw["config"] = base.model_dump(mode="json")
    raw["set"] = []
    for method, space in spaces.items():
        entry = raw["methods"].get(method) or {"space": None, "params": {}}
        entry["space"] = space.model_dump(mode="json", exclude={"source"})
        if entry.get("config") is not None:
            entry["config"] = load_config(entry["config"], spec.set).model_dump(mode="json")
        raw["methods"][method] = entry
    raw["tracking"] = {"uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment}
    return json.dumps(raw, indent=2)

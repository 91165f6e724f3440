"""A study's plan, made once from its spec before Ray or MLflow are touched: the base config, each entry's space,
and every (entry, setting, seed) as a `Point` whose config is validated once (`space.apply`) with its paths made
absolute. The design is scrambled Sobol 2^m points, a full grid or i.i.d. random (the sweeps' design builder) in
each entry's space, plus each entry's defaults and the reference methods (`ce`) at their defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from methods import get_method, list_methods
from methods.plugins import merged
from orchestrator.errors import ConfigError
from orchestrator.experiment.config import ExperimentConfig, load_config, require_validation, resolve_paths
from orchestrator.experiment.teachers import check_teacher_checkpoint
from orchestrator.search import ledger
from orchestrator.search.design import build_design
from orchestrator.search.points import Point, point_config
from orchestrator.search.spaces import SearchSpace, load_space
from orchestrator.study.spec import MethodEntry, StudySpec, method_config


@dataclass(frozen=True)
class StudyPlan:
    """The base config as written (what `study.json` stores), each studied entry's space, and the points."""

    base: ExperimentConfig
    spaces: dict[str, SearchSpace]
    points: list[Point]

    def named(self, name: str) -> StudyPlan:
        """The same plan for the study named `name`: its points' run names and `kdo.study` tags, nothing revalidated."""
        return replace(self, points=[p.named(name) for p in self.points])

    def checked(self) -> dict[str, dict[str, Any]]:
        """Read and check each setting's teacher checkpoint against its config (once per source and setting) before
        Ray starts; a described teacher needs nothing here. Not at planning: a study loaded for its report must not
        need the teacher file or store it was trained with. Returns the checkpoints read, by source (`provision`
        takes them instead of reading them again)."""
        checkpoints: dict[str, dict[str, Any]] = {}
        for point in {p.setting_id: p for p in self.points}.values():
            check_teacher_checkpoint(point.config, checkpoints)
        return checkpoints

    def shared_config(self) -> ExperimentConfig:
        """The config `provision` uses: data and teacher are the same for every point."""
        cfg = next((p.config for p in self.points if get_method(p.config.method.name).needs_teacher),
                   self.points[0].config)
        every = merged(*(p.config.plugins for p in self.points))  # all of them reach Ray's workers (`init_ray`)
        return cfg if cfg.plugins == every else cfg.model_copy(update={"plugins": every})


def plan_study(spec: StudySpec) -> StudyPlan:
    """Check everything the user can get wrong in a study (configs, spaces, design sizes, comparisons) and plan its
    points; ConfigError (one line) on the first problem."""
    base = load_config(spec.config, spec.set, spec.plugins)
    require_validation(base, "study")
    for ref in spec.references:
        if ref not in list_methods():
            raise ConfigError(f"study.references: unknown method '{ref}'; allowed: {', '.join(list_methods())}")
    for a, b in spec.compare:
        for m in (a, b):
            if m not in spec.methods:
                raise ConfigError(f"study.compare: '{m}' is not a method of this study; allowed: "
                                  f"{', '.join(spec.methods)}")
    spaces: dict[str, SearchSpace] = {}
    points: list[Point] = []
    for label in spec.all_methods:  # an entry's label names its rows; `method` is what it runs
        entry = spec.methods.get(label) or MethodEntry()
        method_base = resolve_paths(method_config(base, label, spec.method_of(label), entry, spec.set))
        planned: list[tuple[str, dict[str, Any]]] = []
        space = None
        if label in spec.methods:
            space = spaces[label] = load_space(entry.space if entry.space is not None else spec.method_of(label),
                                               method_base)
            try:
                design = (build_design(space, spec.design, spec.n_settings, seed=spec.design_seed)
                          if spec.has_design else [])
            except ConfigError as err:
                raise ConfigError(f"study.n_settings: {str(err).split(': ', 1)[-1]}") from None
            planned += [("design", setting) for setting in design]
            if spec.include_defaults:
                planned.append(("defaults", {}))
        else:
            planned.append(("reference", {}))
        seen: set[str] = set()
        for role, setting in planned:
            sid = ledger.setting_id({"method": label, "role": role, **setting})
            if sid in seen:  # a design over choices can draw a setting twice: it runs (and counts) once
                continue
            seen.add(sid)
            cfg = space.apply(method_base, setting) if space is not None else method_base
            points += [Point(setting, seed, sid, point_config(cfg, spec.name, sid, seed),
                             {"kdo.role": role, "kdo.study": spec.name, "kdo.entry": label}) for seed in spec.seeds]
    return StudyPlan(base, spaces, points)

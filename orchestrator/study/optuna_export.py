"""A study's seed-mean table as Optuna studies, one per method, so Optuna's own importance, slice and contour plots
(optuna-dashboard) work on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.experiment.store import optuna_storage
from orchestrator.study.analysis import optuna_distribution, optuna_value

if TYPE_CHECKING:
    from orchestrator.study.results import StudyResults


def export_optuna(study: StudyResults, storage: str | None = None) -> tuple[str, list[str]]:
    """Write `<study>.<method>` Optuna studies into `storage` (default `optuna_storage` beside the study's MLflow
    store), each replaced if there: one COMPLETE trial per design setting at its seed-mean validation accuracy
    (failed seeds at chance, as the study's first table counts them), with its seeds, failures and seed std as user
    attributes. Returns the storage URL and the study names."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage or optuna_storage(study.tracking_uri, study.base.tracking.storage_path)
    means = study.setting_means()
    names = []
    for method, space in study.spaces.items():
        design = means[(means["method"] == method) & ~means["defaults"]]
        distributions = {p: optuna_distribution(spec) for p, spec in space.parameters.items() if p in design}
        if design.empty or not distributions:
            continue
        name = f"{study.name}.{method}"
        if name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)
        target = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        target.set_user_attr("kdo.study", study.name)
        target.add_trials([optuna.trial.create_trial(
            params={p: optuna_value(row[p], d) for p, d in distributions.items()}, distributions=distributions,
            value=float(row["score"]), user_attrs={"seeds": int(row["seeds"]), "failed": int(row["failed"]),
                                                   "seed_std": float(row["seed_std"])})
            for _, row in design.iterrows()])
        names.append(name)
    return storage, names


def export_line(study: StudyResults) -> str:
    """Export the study (`export_optuna`) and say where, as `kdo study`, `kdo export optuna` and `kdo demo` print it;
    '' when no entry has a design to export."""
    storage, names = export_optuna(study)
    return f"Optuna: {', '.join(names)} in {storage}   (optuna-dashboard {storage})" if names else ""

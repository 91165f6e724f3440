"""MLflow's model registry: a run's checkpoint folder (kdo's own state_dict plus config) as a model version."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.experiment.store import client

if TYPE_CHECKING:
    from orchestrator.experiment.tracking import Tracker


def register_student(tracker: Tracker, run_name: str) -> str:
    """`tracking.log_models`: a finished run's `student/` checkpoint as a version of `kdo-student-<run name>`."""
    return register_checkpoint(tracker.uri, tracker.run_id, f"kdo-student-{run_name}", "student",
                               f"the student of run {run_name}")


def register_checkpoint(tracking: str, run_id: str, name: str, folder: str, description: str) -> str:
    """Register a run's checkpoint folder (`teacher/`, `student/`: kdo's own state_dict plus config, not an MLflow
    flavour) as a version of model `name` in MLflow's model registry; returns `models:/<name>/<version>`. The
    newest version reused when it is that run's folder already (a resumed sweep finishing again)."""
    from mlflow.exceptions import MlflowException

    registry = client(tracking, registry=True)
    source = f"runs:/{run_id}/{folder}"
    try:
        registry.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        versions = registry.search_model_versions(f"name = '{name}'")
        newest = max(versions, key=lambda v: int(v.version), default=None)
        if newest is not None and newest.source == source:
            return f"models:/{name}/{newest.version}"
    return f"models:/{name}/{registry.create_model_version(name, source=source, run_id=run_id).version}"


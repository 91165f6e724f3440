"""The ledger: a sweep's or study's MLflow children, and every query and write about them.

A child run is one (setting, seed); its tags `kdo.setting_id`, `kdo.seed` and `kdo.status` say what it is and
how it ended. Results tables, `kdo report` and `kdo resume` are rebuilt from these children alone. This module
owns finding a parent by name, listing children (paged), starting, closing and settling
children, and replaying a finished child's epochs. MLflow is imported where it is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import ConfigError, check_name
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.config_files import absolute_uri, default_tracking_uri
from orchestrator.experiment.model_registry import register_student
from orchestrator.experiment.store import check_store, mask_uri
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.tracking import Tracker, log_datasets, run_params, run_tags, source_tags, start_run
from orchestrator.search.status import FINAL, HIDDEN, MLFLOW_STATUS, REDO, child_label, normalize

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient
PAGE_SIZE = 1000  # MLflow's own page size; `children` follows its page tokens


def setting_id(setting: dict[str, Any]) -> str:
    """The stable id of a setting ({config path: value}); a child's `kdo.setting_id`."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ queries
def _quote(value: str) -> str:
    """`value` as a string literal of an MLflow filter, which knows no escapes: quoted by a quote it lacks."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"cannot quote {value!r} in an MLflow filter: it holds both quote characters")


def children(client: MlflowClient, experiment_id: str, parent_run_id: str, *, running: bool = False,
             setting: str | None = None, trial: str | None = None, page_size: int = PAGE_SIZE,
             limit: int | None = None) -> list[Run]:
    """Every child run of `parent_run_id` (only RUNNING ones, one setting's, or those a Tune trial last ran,
    when asked), page by page; at most `limit` when given."""
    query = f"tags.mlflow.parentRunId = {_quote(parent_run_id)}"
    if running:
        query += " and attributes.status = 'RUNNING'"
    if setting is not None:
        query += f" and tags.`kdo.setting_id` = {_quote(setting)}"
    if trial is not None:
        query += f" and tags.`kdo.trial_id` = {_quote(trial)}"
    return _search(client, experiment_id, query, page_size, limit)


def _search(client: MlflowClient, experiment_id: str, query: str, page_size: int = PAGE_SIZE,
            limit: int | None = None) -> list[Run]:
    """Every run `query` matches, following MLflow's page tokens (its default page of 1,000 would truncate)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (limit is not None and len(runs) >= limit):
            return runs[:limit]


def find_parent(kind: str, name: str, tracking_uri: str | None, experiment: str, *, say: bool = True
                ) -> tuple[str, MlflowClient, Run]:
    """The newest parent run of the sweep or study (`kind`) named `name`: its store URI, a client and the run. When
    the name has several (a store written before names were unique), one line on stderr says which this is; names
    taken by newer work of the same file (`name-2`, ...) are named too."""
    check_name(name, "NAME")
    check_name(experiment, "--experiment")
    uri = absolute_uri(tracking_uri or default_tracking_uri())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"--tracking-uri: no MLflow store at {mask_uri(uri)}")
    check_store(uri, field="--tracking-uri")  # one line now, not a traceback after the client's retries
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no experiment '{experiment}' in {mask_uri(uri)}")
    parents = client.search_runs([exp.experiment_id],
                                 f"tags.`kdo.{kind}` = {_quote(name)} and tags.`kdo.kind` = {_quote(kind)}",
                                 order_by=["attributes.start_time DESC"], max_results=2)
    if not parents:
        raise ConfigError(f"NAME: no {kind} named '{name}' in {mask_uri(uri)} (experiment '{experiment}')")
    later = sorted(n for n in parent_names(kind, uri, experiment) if re.fullmatch(re.escape(name) + r"-\d+", n))
    if say and (len(parents) > 1 or later):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parents[0].info.start_time / 1000))
        others = f"; the same file ran again as {', '.join(later)}" if later else ""
        print(f"{kind} '{name}': the run started {started} (MLflow run {parents[0].info.run_id})"
              f"{' of several with this name' if len(parents) > 1 else ''}{others}", file=sys.stderr)
    return uri, client, parents[0]


def parent_names(kind: str, uri: str, experiment: str) -> set[str]:
    """The names of every sweep or study (`kind`) in the store (none if the store or experiment is new)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return set()
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    return {r.data.tags.get(f"kdo.{kind}", "") for r in _search(client, exp.experiment_id,
                                                                  f"tags.`kdo.kind` = {_quote(kind)}")}


def status_of(run: Run) -> str:
    """A child's status (`status.normalize`d): `running` while MLflow says RUNNING, else its `kdo.status` tag."""
    if run.info.status == "RUNNING":
        return "running"
    return normalize(run.data.tags.get("kdo.status", run.info.status.lower()))


def final_seeds(client: MlflowClient, experiment_id: str, parent_run_id: str, sid: str) -> dict[int, Run]:
    """The seeds of setting `sid` that ended for good (never rerun), with their runs."""
    return {int(r.data.tags["kdo.seed"]): r for r in children(client, experiment_id, parent_run_id, setting=sid)
            if status_of(r) in FINAL}


def point_of(run: Run) -> tuple[str | None, int]:
    """A child's (setting id, seed)."""
    return run.data.tags.get("kdo.setting_id"), int(run.data.tags.get("kdo.seed", -1))


def redo_attempts(runs: list[Run]) -> dict[tuple[str | None, int], list[Run]]:
    """Per (setting id, seed), the attempts among `runs` still to be redone (crashed, interrupted, or left RUNNING
    by a process that died), newest first."""
    out: dict[tuple[str | None, int], list[Run]] = {}
    for r in runs:
        if status_of(r) in (*REDO, "running"):
            out.setdefault(point_of(r), []).append(r)
    return {point: sorted(found, key=lambda r: r.info.start_time, reverse=True) for point, found in out.items()}


def final_points(client: MlflowClient, experiment_id: str, parent_run_id: str, *,
                 runs: list[Run] | None = None) -> set[tuple[str | None, int]]:
    """(setting id, seed) of every child that ended for good: what a resumed fixed design skips (among `runs`, the
    parent's children listed already, when given)."""
    listed = children(client, experiment_id, parent_run_id) if runs is None else runs
    return {point_of(r) for r in listed if status_of(r) in FINAL}


def logged_epochs(client: MlflowClient, run_id: str) -> int:
    """The last epoch a child has logged (0 if none): a continued attempt logs only the epochs after it."""
    return max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)


def seen_settings(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """Every distinct setting an adaptive sweep has tried, in a stable order (re-enqueued on resume)."""
    settings = [json.loads(r.data.tags["kdo.setting"]) for r in children(client, experiment_id, parent_run_id)
                if "kdo.setting" in r.data.tags]
    return list({setting_id(s): s for s in settings}.values())


def children_frame(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   parameters: list[str], tag_columns: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per child run of `parent_run_id`: setting, seed, parameters, status, accuracies, seconds, run id
    (and `tag_columns`: column name -> tag key)."""
    import pandas as pd

    rows = []
    for r in children(client, experiment_id, parent_run_id):
        status = status_of(r)
        if status in HIDDEN:
            continue
        m, tags = r.data.metrics, r.data.tags
        row = {"setting_id": tags.get("kdo.setting_id"), "seed": int(tags.get("kdo.seed", -1)), "status": status,
               "val_acc": m.get("selected_val_acc", m.get("val_acc", math.nan)),
               "test_acc": m.get("test_acc", math.nan),
               # the papers' protocols (runs logged before they were recorded: NaN, shown as n/a)
               "last_epoch_test_acc": m.get("last_epoch_test_acc", math.nan),
               "peak_test_acc": m.get("peak_test_acc", math.nan),
               "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000.0,
               "run_id": r.info.run_id, "reason": tags.get("kdo.reason", ""),
               **{col: tags.get(key) for col, key in (tag_columns or {}).items()}}
        for p in parameters:
            raw = r.data.params.get(p)
            try:
                row[p] = json.loads(raw) if raw is not None else None
            except json.JSONDecodeError:
                row[p] = raw
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["setting_id", "seed", *parameters, "status", "val_acc", "test_acc",
                                        "last_epoch_test_acc", "peak_test_acc", "seconds", "run_id", "reason",
                                        *(tag_columns or {})])
    return frame.sort_values(["setting_id", "seed"]).reset_index(drop=True)


def replay(client: MlflowClient, run: Run) -> Iterator[dict[str, Any]]:
    """A finished child's epochs, from MLflow, as the loop would yield them (resume: no rerun)."""
    status = run.data.tags["kdo.status"]
    history = {k: sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
               for k in ("val_acc", "train_loss")}
    for i, (val, loss) in enumerate(zip(history["val_acc"], history["train_loss"], strict=False)):
        row = {"val_acc": val.value, "train_loss": loss.value, "epoch": val.step}
        if i == len(history["val_acc"]) - 1 and status in ("finished", "diverged"):
            row.update(test_acc=run.data.metrics.get("test_acc", math.nan), status=status)
        yield row


# ------------------------------------------------------------------------------------------- writes
def start_child(ledger: LedgerRef, cfg: ExperimentConfig, setting: dict[str, Any], sid: str,
                tags: dict[str, str]) -> Tracker:
    """The MLflow child of one (setting, seed) under the parent: the run tags of any run, plus the ledger's; named by
    what it is (`child_label`), with `cfg.name` as the `kdo.run_name` tag."""
    tags = {**run_tags(cfg), "kdo.kind": "trial", f"kdo.{ledger.kind}": ledger.name, "kdo.setting_id": sid,
            "kdo.setting": json.dumps(setting, sort_keys=True), "kdo.run_name": cfg.name, **tags}
    tracker, _ = start_run(ledger.tracking_uri, ledger.experiment, child_label(tags, compact=True),
                           parent_run_id=ledger.parent_run_id, tags=tags, source=dict(ledger.source))
    tracker.log_params(run_params(cfg))
    if ledger.datasets:
        log_datasets(tracker, ledger.datasets)
    tracker.monitor_system(cfg.tracking.system_metrics_seconds)
    return tracker


def close_child(tracker: Tracker, status: str, cfg: ExperimentConfig | None = None) -> None:
    """End a child with its status and a description that says what it is and how it ended (the top of its page in
    the MLflow UI, above the metrics list); a finished one's student is registered when its config says
    `tracking.log_models` (as a version of `kdo-student-<run name>`)."""
    if cfg is not None and cfg.tracking.log_models and status == "finished":
        register_student(tracker, cfg.name)
    run = tracker.client.get_run(tracker.run_id)
    m, why = run.data.metrics, run.data.tags.get("kdo.reason", "")
    scores = (f": val {100 * m['selected_val_acc']:.2f}, test {100 * m['test_acc']:.2f} (points; the epoch chosen "
              f"on validation, {int(m.get('best_epoch', 0))})" if status == "finished" and "test_acc" in m
              and "selected_val_acc" in m else f" ({why})" if why else "")
    tracker.set_tags({"kdo.status": status, "kdo.early_stopped": str(status == "early_stopped").lower(),
                      "mlflow.note.content": f"{child_label(run.data.tags)}: {status}{scores}"})
    tracker.finish(MLFLOW_STATUS[status])


def settle_child(uri: str, run: Run, unfinished: str) -> None:
    """Terminate a child left RUNNING: with the outcome its loop recorded if it got that far, else `unfinished`."""
    recorded = run.data.tags.get("kdo.status")
    close_child(Tracker(uri, run.info.run_id), recorded if recorded in ("finished", "diverged") else unfinished)


def supersede(uri: str, run: Run) -> None:
    """An attempt a later one replaces: hidden from every table (its runs stay in MLflow for the record)."""
    close_child(Tracker(uri, run.info.run_id), "superseded")


def reopen(uri: str, run: Run) -> Tracker:
    """Continue an unfinished attempt in the same child run (a retried or resumed trial with a checkpoint)."""
    tracker = Tracker(uri, run.info.run_id)
    tracker.client.update_run(run.info.run_id, status="RUNNING")
    tracker.set_tags({"kdo.status": "running"})
    if "kdo.reason" in run.data.tags:  # why the attempt crashed: no longer so
        tracker.client.delete_tag(run.info.run_id, "kdo.reason")
    tracker.monitor_system(float(run.data.params.get("tracking.system_metrics_seconds", 0)), resume=True)
    return tracker


def close_running(uri: str, experiment_id: str, parent_run_id: str, unfinished: str,
                  stopped_trials: frozenset[str] = frozenset()) -> None:
    """Settle every child still RUNNING when a driver ends (or before a resume): the outcome its loop recorded,
    else `early_stopped` if its Tune trial was stopped by the scheduler (`stopped_trials`), else `unfinished`
    (`crashed` when its process died, `interrupted` when the driver was stopped or died)."""
    for run in children(mlflow_client(uri), experiment_id, parent_run_id, running=True):
        stopped = run.data.tags.get("kdo.trial_id") in stopped_trials
        settle_child(uri, run, "early_stopped" if stopped else unfinished)


@dataclass(frozen=True)
class LedgerRef:
    """Where a sweep's or study's children live: the parent run in its store and experiment."""

    name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    source: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(source_tags().items()))
    datasets: tuple[dict[str, str], ...] = ()  # `tracking.dataset_inputs` of the data every child trains on
    kind: str = "sweep"  # or "study": each child is tagged `kdo.<kind>` with the parent's name


def driver_interrupted(client: Any, ref: LedgerRef) -> bool:
    """Whether the driver was stopped (Ctrl-C, SIGTERM): it tags its parent before it stops the trials."""
    return client.get_run(ref.parent_run_id).data.tags.get("kdo.interrupted") == "true"

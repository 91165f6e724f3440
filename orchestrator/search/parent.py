"""The parent run of a sweep or a study, one lifecycle for both: its name claimed once, the run started (or found
and reopened by `kdo resume`), the work done under the driver lock and heartbeat, Ctrl-C/SIGTERM and a store that
stops answering handled, and the parent finished, or left for `kdo resume`. A sweep and a study pass only what
differs: their tags and files, what they train, and what they write when the work ends (`Summarise`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from orchestrator.errors import Interrupted
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.runner import Prepared
from orchestrator.experiment.store import check_store, store_errors, ui_hint, unreachable, write_view
from orchestrator.experiment.store import client as mlflow_client
from orchestrator.experiment.tracking import Tracker, dataset_inputs, log_datasets, start_run
from orchestrator.search import ledger
from orchestrator.search.driver import check_not_running, free_name, live_driver, lock_path, settle_abandoned
from orchestrator.search.ledger import LedgerRef
from orchestrator.search.tuner import forget_experiment, interruptible, stop_trials

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

Kind = Literal["sweep", "study"]
# Runs the trials; returns the ids of those that ended without an error (a run of one left RUNNING was stopped by
# the scheduler, not killed).
Train = Callable[[Prepared, LedgerRef], frozenset[str]]
Summarise = Callable[[str], str]  # writes the outcome on the parent (given its status); returns the status to end with
KDO_STATUS = {"FINISHED": "finished", "KILLED": "interrupted"}  # a parent's `kdo.status` by its MLflow status


def claim_name(kind: Kind, wanted: str, cfg: ExperimentConfig, *, explicit: bool) -> str:
    """The name the work runs under: `wanted` if free in the store; a taken one given explicitly is refused, a
    default one gets the first free suffix (`driver.free_name`), said on stderr at once (the CLI's and a notebook's
    first line). Asks the store before Ray starts."""
    assert cfg.tracking.uri is not None
    check_store(cfg.tracking.uri)
    name = free_name(kind, wanted, cfg.tracking.uri, cfg.tracking.experiment, explicit=explicit)
    if name != wanted:
        print(f"{kind} name '{wanted}' is taken in experiment '{cfg.tracking.experiment}': this one runs as "
              f"'{name}' (kdo report {name})", file=sys.stderr)
    return name


@dataclass
class ParentRun:
    """A sweep's or study's parent run in its store, and where its driver keeps Tune's state and its lock."""

    kind: Kind
    name: str
    tracker: Tracker
    experiment: str
    experiment_id: str
    storage_path: str

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def uri(self) -> str:
        return self.tracker.uri

    def ledger(self, prepared: Prepared) -> LedgerRef:
        """Where the children of this parent live, and the datasets every child trains on."""
        return LedgerRef(self.name, self.run_id, self.uri, self.experiment, self.experiment_id,
                         datasets=dataset_inputs(prepared.config.data, prepared.splits), kind=self.kind)


def start(kind: Kind, name: str, prepared: Prepared, tags: dict[str, str], params: dict[str, Any],
          files: dict[str, str]) -> ParentRun:
    """A new RUNNING parent run: its kind and name tags plus `tags`, `params`, `files` ({artifact file: text}) and
    the datasets of `prepared`."""
    cfg = prepared.config
    assert cfg.tracking.uri is not None
    tracker, experiment_id = start_run(cfg.tracking.uri, cfg.tracking.experiment, name,
                                       tags={"kdo.kind": kind, f"kdo.{kind}": name, **tags})
    tracker.log_params(params)
    for artifact, text in files.items():
        tracker.log_text(text, artifact)
    log_datasets(tracker, dataset_inputs(cfg.data, prepared.splits))
    write_view(cfg.tracking.uri, experiment_id, kind, name)
    tracker.set_tags({"mlflow.note.content": f"The {kind} {name}: its runs, best validation accuracy first, in the "
                                             f"UI's view `{name}` ({ui_hint(cfg.tracking.uri, experiment_id, name)})."})
    return ParentRun(kind, name, tracker, cfg.tracking.experiment, experiment_id, cfg.tracking.storage_path)


def find(kind: Kind, name: str, tracking_uri: str | None, experiment: str, *, to_resume: bool = False,
         force: bool = False) -> tuple[str, MlflowClient, Run]:
    """The newest parent of that kind and name (`ledger.find_parent`); runs a driver that is gone left RUNNING
    (killed, or it lost its store) are settled `crashed` first, the parent FAILED. One `to_resume` is refused
    while its driver is alive, unless `force`."""
    uri, client, run = ledger.find_parent(kind, name, tracking_uri, experiment)
    if to_resume and not force:
        check_not_running(run)
    settle_abandoned(uri, run)
    return uri, client, run


def nothing_to_resume(kind: Kind, uri: str, run: Run) -> bool:
    """Whether a parent found to resume ended FINISHED with no run left to redo (crashed, interrupted, running):
    then one line says so, and resuming starts no Ray and registers no model again."""
    if run.info.status != "FINISHED":
        return False
    children = ledger.children(mlflow_client(uri), run.info.experiment_id, run.info.run_id)
    if any(ledger.status_of(c) in ("crashed", "interrupted", "running") for c in children):
        return False
    name = run.data.tags[f"kdo.{kind}"]
    print(f"{kind} '{name}' finished: nothing to resume (its {len(children)} runs are final; `kdo report {name}` "
          "shows it again)", file=sys.stderr)
    return True


def reopen(kind: Kind, run: Run, uri: str, cfg: ExperimentConfig) -> ParentRun:
    """The parent `run` (from `find(..., to_resume=True)`) to finish, with the config of its work."""
    name = run.data.tags[f"kdo.{kind}"]
    return ParentRun(kind, name, Tracker(uri, run.info.run_id), cfg.tracking.experiment, run.info.experiment_id,
                     cfg.tracking.storage_path)


def hold(parent: ParentRun, prepare: Callable[[], Prepared], train: Train, summarise: Summarise, *,
         resumed: bool) -> None:
    """Do the parent's work under its driver lock and heartbeat: (when `resumed`, the children left RUNNING end
    `crashed` and the parent runs again) `prepare` the data and teacher, `train`, then settle the children still
    RUNNING, `summarise` and end the parent, however the work ended. Ctrl-C/SIGTERM stop the trials, end the
    parent KILLED and raise `Interrupted` with the resume command; a store that stops answering leaves the parent
    and its children open for `kdo resume` (`StoreUnreachable`)."""
    with live_driver(parent.tracker, lock_path(parent.storage_path, parent.name)):
        if resumed:
            ledger.close_running(parent.uri, parent.experiment_id, parent.run_id, "crashed")  # its driver is gone
        prepared = prepare()
        if resumed:
            parent.tracker.client.update_run(parent.run_id, status="RUNNING")
        ref = parent.ledger(prepared)
        status, stopped, unfinished = "FAILED", frozenset[str](), "crashed"
        try:
            parent.tracker.set_tags({"kdo.interrupted": "false"})  # a resumed parent was interrupted before
            with interruptible(lambda: parent.tracker.set_tags({"kdo.interrupted": "true"})):
                stopped = train(prepared, ref)
            status = "FINISHED"
        except Interrupted as exc:  # Tune may have ended the trials it stopped "without an error": none was early
            status, unfinished, stopped = "KILLED", "interrupted", frozenset()
            stop_trials()
            exc.resume_hint = f"kdo resume {parent.name}"
            raise
        finally:
            finish(parent, status, stopped, unfinished, summarise)


def finish(parent: ParentRun, status: str, stopped: frozenset[str], unfinished: str, summarise: Summarise) -> None:
    """Settle the children still RUNNING (`ledger.close_running`: `early_stopped` for the trials in `stopped`, else
    `unfinished`), summarise onto the parent, forget Tune's state once nothing is left to redo, end the parent. A
    store that stopped answering leaves the children and the parent as they are: one line, and `kdo resume`
    settles them."""
    lost = False
    with store_errors(parent.uri, resume_hint=f"kdo resume {parent.name}"):
        try:
            ledger.close_running(parent.uri, parent.experiment_id, parent.run_id, unfinished, stopped)
            status = summarise(status)
            if not ledger.redo_attempts(ledger.children(parent.tracker.client, parent.experiment_id, parent.run_id)):
                forget_experiment(parent.storage_path, parent.name)
        except Exception as err:
            lost, status = unreachable(err), "FAILED"
            raise
        finally:
            if not lost:
                parent.tracker.set_tags({"kdo.status": KDO_STATUS.get(status, "failed")})
                parent.tracker.finish(status)

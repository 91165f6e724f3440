"""The progress line of a run that ended, from its child on a real SQLite MLflow store (no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Metric, RunTag

from orchestrator.experiment.tracking import start_run
from orchestrator.search import ledger
from orchestrator.search.progress import run_line


def test_a_line_names_the_entry_setting_seed_status_and_scores(workdir: Path) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, experiment_id = start_run(uri, "kdo", "p", tags={"kdo.kind": "study", "kdo.study": "p"})
    client = parent.client
    children = {
        "kd": ({"method.params.temperature": 4.1234, "method.params.kd_weight": 0.5, "training.optimizer": "sgd"},
               "design", "finished", 1),
        "ce": ({}, "reference", "diverged", 0),
    }
    for label, (setting, role, status, seed) in children.items():
        run = client.create_run(experiment_id, run_name=label, tags={"mlflow.parentRunId": parent.run_id})
        client.log_batch(run.info.run_id, metrics=[Metric("selected_val_acc", 0.912, 0, 10),
                                                   Metric("test_acc", 0.908, 0, 10)],
                         tags=[RunTag("kdo.entry", label), RunTag("kdo.method", label), RunTag("kdo.role", role),
                               RunTag("kdo.setting", json.dumps(setting)), RunTag("kdo.seed", str(seed)),
                               RunTag("kdo.status", status), RunTag("kdo.trial_id", f"t-{label}")])
        client.set_terminated(run.info.run_id, "FINISHED")
    [kd] = ledger.children(client, experiment_id, parent.run_id, trial="t-kd")
    line = run_line(kd, ledger.status_of(kd), 5, 38)
    assert line.startswith("[ 5/38] kd temperature=4.12 kd_weight=0.5 training.optimizer=sgd seed 1: finished "
                           "val 91.20 test 90.80 ("), line
    [ce] = ledger.children(client, experiment_id, parent.run_id, trial="t-ce")
    assert run_line(ce, "diverged", 12, 38).startswith("[12/38] ce reference seed 0: diverged (")  # no scores

"""The ledger on a real SQLite MLflow store, built directly (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from orchestrator.experiment.tracking import start_run
from orchestrator.search import ledger


def _parent_with_children(workdir: Path, count: int) -> tuple[MlflowClient, str, str]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, experiment_id = start_run(uri, "kdo", "p", tags={"kdo.kind": "sweep", "kdo.sweep": "p"})
    client = parent.client
    for i in range(count):
        run = client.create_run(experiment_id, run_name=f"c{i}", tags={"mlflow.parentRunId": parent.run_id})
        client.log_batch(run.info.run_id, tags=[RunTag("kdo.setting_id", f"s{i}"), RunTag("kdo.seed", "0"),
                                                RunTag("kdo.status", "finished")])
        client.set_terminated(run.info.run_id, "FINISHED")
    return client, experiment_id, parent.run_id


def test_children_are_listed_page_by_page(workdir: Path) -> None:
    client, experiment_id, parent_id = _parent_with_children(workdir, 120)
    runs = ledger.children(client, experiment_id, parent_id, page_size=50)
    assert len(runs) == 120 and len({r.info.run_id for r in runs}) == 120
    assert len(ledger.children(client, experiment_id, parent_id, page_size=50, limit=7)) == 7
    assert len(ledger.final_points(client, experiment_id, parent_id)) == 120
    frame = ledger.children_frame(client, experiment_id, parent_id, [])
    assert len(frame) == 120 and set(frame["status"]) == {"finished"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_more_than_one_mlflow_page_of_children_is_listed(workdir: Path) -> None:
    client, experiment_id, parent_id = _parent_with_children(workdir, 1001)
    assert len(ledger.children(client, experiment_id, parent_id)) == 1001


def test_filter_values_are_quoted_by_a_quote_they_lack() -> None:
    assert ledger._quote("kd-tpe") == "'kd-tpe'"
    assert ledger._quote("it's") == '"it\'s"'
    with pytest.raises(ValueError, match="both quote characters"):
        ledger._quote("'\"")


def test_the_attempts_to_redo_are_keyed_by_point_newest_first(workdir: Path) -> None:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, experiment_id = start_run(uri, "kdo", "p", tags={"kdo.kind": "sweep", "kdo.sweep": "p"})
    client = parent.client
    made: dict[tuple[str, int, str], str] = {}
    for i, (sid, seed, status) in enumerate([("a", 0, "crashed"), ("a", 0, "interrupted"), ("a", 1, "finished"),
                                             ("b", 0, "running"), ("b", 1, "superseded"), ("b", 1, "diverged")]):
        run = client.create_run(experiment_id, start_time=1000 + i, tags={"mlflow.parentRunId": parent.run_id})
        client.log_batch(run.info.run_id, tags=[RunTag("kdo.setting_id", sid), RunTag("kdo.seed", str(seed)),
                                                RunTag("kdo.status", status)])
        if status != "running":  # left RUNNING by a process that died
            client.set_terminated(run.info.run_id, "FAILED")
        made[(sid, seed, status)] = run.info.run_id
    listed = ledger.children(client, experiment_id, parent.run_id)
    redo = {point: [r.info.run_id for r in runs] for point, runs in ledger.redo_attempts(listed).items()}
    assert redo == {("a", 0): [made["a", 0, "interrupted"], made["a", 0, "crashed"]],
                    ("b", 0): [made["b", 0, "running"]]}
    assert ledger.final_points(client, experiment_id, parent.run_id, runs=listed) == {("a", 1), ("b", 1)}
    one_setting = ledger.redo_attempts(ledger.children(client, experiment_id, parent.run_id, setting="a"))
    assert {seed: [r.info.run_id for r in runs] for (_, seed), runs in one_setting.items()} == {0: redo["a", 0]}

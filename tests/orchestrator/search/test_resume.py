"""A sweep driver killed with SIGKILL is finished by `kdo resume`: nothing lost, nothing run twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app


def _ray_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray" in cmdline and b"pytest" not in cmdline:
                pids.add(int(entry.name))
    return pids


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _finished_trials(db: Path) -> int:
    """Count finished trial runs with a read-only SQL query: an MlflowClient here could race the driver's
    first-use schema migration of the same file."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM tags a JOIN tags b ON a.run_uuid = b.run_uuid WHERE a.key = 'kdo.kind' "
                "AND a.value = 'trial' AND b.key = 'kdo.status' AND b.value = 'finished'").fetchone()[0]
    except sqlite3.Error:
        return 0


def kill_when_finished(driver: subprocess.Popen, db: Path, count: int, before: set[int]) -> None:
    """SIGKILL the driver's process group once `count` trials have finished, then the Ray processes it left."""
    try:
        deadline = time.monotonic() + 300
        while _finished_trials(db) < count:
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)  # a group of 2 short runs ends within a second
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        # The killed driver's local Ray runtime outlives it: stop what appeared, by PID, not `ray stop`.
        time.sleep(1)
        ours = _descendants(os.getpid())
        for pid in _ray_pids() - before - ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.parametrize(("sampler", "seeds"), [("sobol", ["0"]), ("tpe", ["0", "1"])])
def test_sigkilled_sweep_resumes_without_loss_or_repeat(workdir: Path, sampler: str, seeds: list[str]) -> None:
    before = _ray_pids()
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "sweep", "digits_kd", "--sampler", sampler, "--trials", "4",
         "--seeds", ",".join(seeds), "--scheduler", "none", "--concurrency", "1", "--set", "training.epochs=6",
         "--name", "killed", *(["--group-size", "2"] if sampler == "sobol" else [])],  # sobol: 2 groups of 2 runs
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when_finished(driver, workdir / "mlflow.db", 1, before)
    done_before = _finished_trials(workdir / "mlflow.db")
    assert 1 <= done_before < 4 * len(seeds)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    trials_before = len(optuna.load_study(study_name="killed", storage=storage).trials) if sampler == "tpe" else 0

    result = CliRunner().invoke(app, ["resume", "killed"])
    assert result.exit_code == 0, result.output

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(c.info.status != "RUNNING" for c in children)
    finished = [c for c in children if c.data.tags["kdo.status"] == "finished"]
    keys = [(c.data.tags["kdo.setting_id"], c.data.tags["kdo.seed"]) for c in finished]
    assert len(keys) == len(set(keys)) == 4 * len(seeds), "every planned (setting, seed) finished exactly once"
    assert len({sid for sid, _ in keys}) == 4, "four distinct settings"
    others = [c.data.tags["kdo.status"] for c in children if c.data.tags["kdo.status"] != "finished"]
    assert set(others) <= {"superseded"}, "the only other children are replaced attempts, closed"
    if sampler == "tpe":  # the same Optuna study went on, agreeing with the ledger: no trial left open, no duplicate
        trials = optuna.load_study(study_name="killed", storage=storage).trials
        assert len(trials) > trials_before >= 1
        complete = [json.dumps(t.params, sort_keys=True) for t in trials if t.state.name == "COMPLETE"]
        assert len(complete) == len(set(complete)) == 4
        assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL"}, "the killed trial ends FAIL, none RUNNING"


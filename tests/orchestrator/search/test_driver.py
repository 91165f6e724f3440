"""One live driver per name: taken names, and `kdo resume` beside a live driver (a real second process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.search.driver import check_not_running, lock_path
from orchestrator.study.robustness import RobustnessStudy


def _parent(workdir: Path, kind: str, name: str, tags: dict[str, str] | None = None) -> tuple[MlflowClient, str]:
    """A RUNNING parent in the working directory's store, as a driver starts one."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo")
    exp_id = exp.experiment_id if exp else client.create_experiment("kdo")
    run = client.create_run(exp_id, run_name=name, tags={"kdo.kind": kind, f"kdo.{kind}": name, **(tags or {})})
    return client, run.info.run_id


def test_a_taken_sweep_name_given_with_name_is_refused_before_anything_runs(workdir: Path) -> None:
    _parent(workdir, "sweep", "taken")
    result = CliRunner().invoke(app, ["sweep", "digits_kd", "--name", "taken"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().startswith("error: --name: a sweep named 'taken' exists already"), result.output
    assert not (workdir / "kdo_runs").exists()


def test_a_study_file_run_again_gets_the_next_free_name_and_an_explicit_one_is_refused(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = RobustnessStudy.from_yaml("demo")
    assert study.claim_name().name == "demo", "a new store: the file's name"
    assert capsys.readouterr().err == ""
    _parent(workdir, "study", "demo")
    _parent(workdir, "study", "demo-2")
    again = RobustnessStudy.from_yaml("demo").claim_name()
    assert again.name == "demo-3"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # said at once, from Python too
        "study name 'demo' is taken in experiment 'kdo': this one runs as 'demo-3' (kdo report demo-3)")
    from orchestrator.search.ledger import find_parent

    find_parent("study", "demo", None, "kdo")  # the name the user knows: newer runs of the file are named
    assert "study 'demo': the run started " in (err := capsys.readouterr().err) and \
        err.strip().endswith("; the same file ran again as demo-2"), err
    assert all(p.config.name.startswith("demo-3-") for p in again.points), "the points are planned anew"
    with pytest.raises(ConfigError, match="--name: a study named 'demo' exists already"):
        RobustnessStudy.from_yaml("demo").replace(name="demo").claim_name()


_HOLD = """
import sys, time
from orchestrator.experiment.tracking import Tracker
from orchestrator.search.driver import live_driver
from pathlib import Path
with live_driver(Tracker(sys.argv[1], sys.argv[2]), Path(sys.argv[3])):
    print("HOLDING", flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_resume_is_refused_while_the_driver_lives_and_allowed_at_once_after_it_is_killed(workdir: Path) -> None:
    client, run_id = _parent(workdir, "sweep", "live")
    lock = lock_path(str(workdir / "kdo_runs"), "live")
    assert lock is not None
    driver = subprocess.Popen([sys.executable, "-c", _HOLD, f"sqlite:///{workdir / 'mlflow.db'}", run_id, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "HOLDING"
        result = CliRunner().invoke(app, ["resume", "live"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (f"error: NAME: 'live' its driver (pid {driver.pid} on {os.uname().nodename}) "
                                         "is still running; stop it first, or pass --force"), result.output
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        check_not_running(client.get_run(run_id))  # the kernel released its lock: resumable at once
    finally:
        if driver.poll() is None:
            driver.kill()


def test_a_driver_on_another_host_is_trusted_while_its_heartbeat_is_fresh(workdir: Path) -> None:
    fresh = {"kdo.driver_host": "elsewhere", "kdo.driver_pid": "7", "kdo.heartbeat": f"{time.time():.0f}"}
    client, run_id = _parent(workdir, "sweep", "remote", fresh)
    with pytest.raises(ConfigError, match="its driver \\(pid 7 on elsewhere\\) is still running"):
        check_not_running(client.get_run(run_id))
    client.set_tag(run_id, "kdo.heartbeat", f"{time.time() - 600:.0f}")
    check_not_running(client.get_run(run_id))  # ten minutes silent: gone

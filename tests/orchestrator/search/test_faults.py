"""The ledger under real faults: a trial worker SIGKILLed, the driver stopped by SIGINT (SIGTERM takes the same
handler), an older ledger's words. Each driver runs in its own process with its own local Ray runtime, marked by an
environment tag its Ray processes inherit, so the test stops exactly those processes afterwards."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.errors import Interrupted
from orchestrator.search.tuner import interruptible
from tests.orchestrator.search.test_cluster import (
    _pids,
    _read,
    _terminate,
    _with_descendants,
    free_port,
    joined_node,
    mlflow_server,
    ray_cluster,
)

EPOCHS = 10


def _query(db: Path, sql: str) -> list[tuple]:
    """A read-only query on the driver's store (an MlflowClient here could race its first-use migration)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.Error:
        return []


def _trial_progress(db: Path) -> list[tuple[str, str, int, str]]:
    """(run id, MLflow status, last logged epoch, the pid its tag names) of every trial child."""
    return _query(db, "SELECT r.run_uuid, r.status, COALESCE(MAX(m.step), 0), COALESCE(p.value, '') FROM runs r "
                      "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'kdo.kind' AND t.value = 'trial' "
                      "LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'kdo.pid' LEFT JOIN metrics m ON "
                      "m.run_uuid = r.run_uuid AND m.key = 'val_acc' GROUP BY r.run_uuid")


def _half_way(db: Path) -> list[int]:
    """The processes of trial children that are RUNNING and past epoch 2."""
    return [int(pid) for _, status, epoch, pid in _trial_progress(db) if status == "RUNNING" and epoch >= 3 and pid]


def _tagged_ray_processes(tag: str, before: set[int]) -> set[int]:
    """The Ray processes started since `before` by a process whose environment carries `tag` (or descend from
    one: workers whose title overwrote their environment block)."""
    new = _pids() - before - _with_descendants({os.getpid()})
    needle = f"KDO_TEST_DRIVER={tag}".encode()
    roots = {pid for pid in new if needle in _read(pid, "environ").split(b"\0")}
    return {pid for pid in _with_descendants(roots) & new if b"ray" in _read(pid, "cmdline")}


class Driver:
    """`kdo ...` in a subprocess with its own session, and the Ray processes it starts."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.tag, self.before, self.workdir = uuid.uuid4().hex, _pids(), workdir
        env = {**(env or os.environ), "KDO_TEST_DRIVER": self.tag}
        self.log = workdir.parent / f"{workdir.name}-driver.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=workdir, env=env,
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the driver ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)

    def ray_processes(self) -> set[int]:
        return _tagged_ray_processes(self.tag, self.before)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _terminate(self.ray_processes(), grace=2.0)


def _children(workdir: Path, kind: str = "sweep") -> tuple[MlflowClient, object, list]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], f"tags.`kdo.kind` = '{kind}'")
    return client, parent, client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def _each_point_finished_once(client: MlflowClient, children: list, points: int) -> None:
    finished = [c for c in children if c.data.tags["kdo.status"] == "finished"]
    keys = [(c.data.tags["kdo.setting_id"], c.data.tags["kdo.seed"]) for c in finished]
    assert len(keys) == len(set(keys)) == points, "every (setting, seed) finished exactly once"
    for child in finished:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"each epoch logged once: {steps}"
    assert all(c.info.status != "RUNNING" for c in children)


def _kdo_temp_files() -> set[str]:
    """What kdo's processes left in the temp directory (all of it is named kdo-*; Ray's own session is not)."""
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("kdo")}


def _study(teacher: Path, workdir: Path) -> list[str]:
    study = workdir.parent / f"{workdir.name}-study.yaml"
    study.write_text(f"name: faulty\nconfig: digits_kd\nmethods: {{kd: null}}\nn_settings: 2\nseeds: [0]\n"
                     f"references: [ce]\nconcurrency: 1\ncheckpoint_seconds: 0\n"
                     f"set: [training.epochs={EPOCHS}, teacher.architecture=null, teacher.checkpoint={teacher}]\n")
    return ["study", str(study)]


def _outcomes(workdir: Path, kind: str) -> list[tuple]:
    """Every counted child as (entry, setting, seed, status, val_acc, test_acc): what the tables are made of."""
    _, _, children = _children(workdir, kind)
    return sorted((c.data.tags.get("kdo.entry", ""), c.data.tags["kdo.setting_id"], c.data.tags["kdo.seed"],
                   c.data.tags["kdo.status"], c.data.metrics.get("selected_val_acc", -1.0),
                   c.data.metrics.get("test_acc", -1.0))
                  for c in children if c.data.tags["kdo.status"] != "superseded")


def _same_as_without_faults(faulted: list[tuple], unfaulted: list[tuple]) -> None:
    assert [row[:4] for row in faulted] == [row[:4] for row in unfaulted], "the same rows, each once"
    for got, want in zip(faulted, unfaulted, strict=True):
        assert got[4:] == pytest.approx(want[4:], abs=1e-6), f"{got} differs from the run without faults"


@pytest.fixture(scope="module")
def unfaulted(tmp_path_factory: pytest.TempPathFactory, teacher_checkpoint: Path) -> Callable[[str], list[tuple]]:
    """The outcomes of the faulted sweep (or study) run once without faults, in a folder of its own."""
    done: dict[str, list[tuple]] = {}

    def outcomes(kind: str) -> list[tuple]:
        if kind not in done:
            folder = tmp_path_factory.mktemp(f"unfaulted-{kind}")
            driver = Driver(folder, _sweep(teacher_checkpoint) if kind == "sweep" else _study(teacher_checkpoint,
                                                                                               folder))
            try:
                assert driver.proc.wait(timeout=300) == 0, driver.output()[-3000:]
            finally:
                driver.stop()
            done[kind] = _outcomes(folder, kind)
        return done[kind]
    return outcomes


def _sweep(teacher: Path) -> list[str]:
    """A sobol sweep of one run per trial (`--group-size 1`): its faults hit one run; the study below is grouped."""
    return ["sweep", "digits_kd", "--sampler", "sobol", "--trials", "4", "--scheduler", "none", "--concurrency", "1",
            "--group-size", "1",
            "--checkpoint-seconds", "0", "--set", f"training.epochs={EPOCHS}", "--set", "teacher.architecture=null",
            "--set", f"teacher.checkpoint={teacher}", "--name", "faulty"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("retries", [1, 0])
def test_a_killed_trial_worker_continues_from_its_checkpoint(workdir: Path, teacher_checkpoint: Path,
                                                             retries: int, unfaulted: Callable) -> None:
    """max-failures 1: Tune retries the trial from its checkpoint in the same child. 0: the child ends
    `crashed`; `kdo resume` continues it from the checkpoint its tag names (and the best may change)."""
    driver = Driver(workdir, [*_sweep(teacher_checkpoint), "--max-failures", str(retries)])
    try:
        db = workdir / "mlflow.db"
        driver.wait_for(lambda: bool(_half_way(db)), "a trial half way")
        for pid in _half_way(db):
            os.kill(pid, signal.SIGKILL)  # the trial's worker process
        assert driver.proc.wait(timeout=400) == 0, driver.output()[-3000:]
    finally:
        driver.stop()
    client, parent, children = _children(workdir)
    statuses = sorted(c.data.tags["kdo.status"] for c in children)
    if retries:
        assert statuses == ["finished"] * 4, "the retried trial continued its own child"
    else:
        assert statuses == ["crashed"] + ["finished"] * 3, statuses
        result = CliRunner().invoke(app, ["resume", "faulty"])
        assert result.exit_code == 0, result.output
        client, parent, children = _children(workdir)
        assert sorted(c.data.tags["kdo.status"] for c in children) == ["finished"] * 4, "continued in place"
    assert parent.info.status == "FINISHED" and "best.method.params.temperature" in parent.data.tags
    _each_point_finished_once(client, children, 4)
    assert not (workdir / "kdo_runs" / "faulty").exists(), "nothing left to resume: Tune's state is removed"
    _same_as_without_faults(_outcomes(workdir, "sweep"), unfaulted("sweep"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_reach_the_same_stop_and_leave_the_handlers_as_they_were(sig: signal.Signals) -> None:
    """Both signals go through one handler (the slow test below stops a real sweep and a study with SIGINT)."""
    marks: list[str] = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as stopped, interruptible(lambda: marks.append("tagged")):
        os.kill(os.getpid(), sig)  # a real signal to this process; Tune is not running, so it stops here
        time.sleep(5)  # not reached: the handler raises
    assert stopped.value.signum == sig and marks == ["tagged"]
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("kind", "sig"), [("sweep", signal.SIGINT), ("study", signal.SIGINT)])
def test_a_stopped_driver_closes_its_runs_interrupted_and_resume_finishes(workdir: Path, teacher_checkpoint: Path,
                                                                          kind: str, sig: signal.Signals,
                                                                          unfaulted: Callable) -> None:
    if kind == "sweep":
        args, points = _sweep(teacher_checkpoint), 4
    else:
        args, points = _study(teacher_checkpoint, workdir), 2 + 1 + 1  # design, defaults, the ce reference
    temp_before = _kdo_temp_files()
    driver = Driver(workdir, args)
    try:
        db = workdir / "mlflow.db"
        # The sweep's runs train one per trial: one ends before the next is half way. The study's four train as one
        # group: all of them are half way, and the interrupted ones continue from their own checkpoints on resume.
        driver.wait_for(lambda: (kind == "study" or any(s == "FINISHED" for _, s, _, _ in _trial_progress(db)))
                        and bool(_half_way(db)), "one run done and one half way")
        if sig == signal.SIGINT:
            os.killpg(driver.proc.pid, sig)  # as a terminal's Ctrl-C does: the whole foreground process group
        else:
            os.kill(driver.proc.pid, sig)  # as `kill PID` does
        assert driver.proc.wait(timeout=120) == 128 + sig, driver.output()[-3000:]
    finally:
        driver.stop()
    output = driver.output()
    assert "kdo resume faulty" in output and "Tuner.restore" not in output, output[-3000:]
    client, parent, children = _children(workdir, kind)
    assert parent.info.status == "KILLED"
    statuses = [c.data.tags.get("kdo.status") for c in children]
    assert "interrupted" in statuses and set(statuses) <= {"finished", "interrupted"}, statuses

    result = CliRunner().invoke(app, ["resume", "faulty"])
    assert result.exit_code == 0, result.output
    client, parent, children = _children(workdir, kind)
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["kdo.status"] for c in children} <= {"finished", "superseded"}
    _each_point_finished_once(client, children, points)
    _same_as_without_faults(_outcomes(workdir, kind), unfaulted(kind))
    assert _kdo_temp_files() - temp_before == set(), "the driver, the trials, resume and the report left no files"


WHERE = """
from methods.kd import KDParams, KnowledgeDistillation
from orchestrator import register_method


@register_method("kd_where")
class KDWhere(KnowledgeDistillation):
    \"\"\"KD that tags its run with the Ray node it trains on and the file this plugin was imported from.\"\"\"
    Params = KDParams

    def setup(self, ctx):
        import ray

        super().setup(ctx)
        ctx.set_tags({"where.node": ray.get_runtime_context().get_node_id(), "where.file": __file__})
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trials_of_a_lost_node_continue_from_their_checkpoints_on_the_others(workdir: Path,
                                                                             teacher_checkpoint: Path) -> None:
    """Two nodes (a `ray start --head` and a second `ray start` joined to it); the second is SIGKILLed, raylet
    and workers, while one of its trials is half way: Tune retries that trial on the head from its checkpoint. The
    method is a plugin whose file lies only in the driver's folder (named by the space file): every trial imports
    the copy Ray shipped (runtime resources), on both nodes. Then the driver is SIGKILLed and `kdo resume` finishes
    the sweep, shipping the recorded plugin again."""
    (workdir / "where.py").write_text(WHERE)
    (workdir / "where_space.yaml").write_text("method: kd_where\nplugins: [where.py]\nparameters:\n"
                                              "  temperature: {type: float, low: 1.0, high: 8.0, log: true}\n")
    args = [*_sweep(teacher_checkpoint), "--space", "where_space.yaml", "--set", "method.name=kd_where"]
    with ray_cluster(num_cpus=1) as cluster, joined_node(cluster, num_cpus=1) as node_processes:
        driver = Driver(workdir, [*args, "--concurrency", "2", "--max-failures", "2", "--address", cluster.address],
                        env=cluster.driver_env)
        try:
            db = workdir / "mlflow.db"
            driver.wait_for(lambda: bool(set(_half_way(db)) & node_processes()), "a trial half way on node 2")
            lost = node_processes()
            for pid in lost:
                os.kill(pid, signal.SIGKILL)
            seen = {run for run, *_ in _trial_progress(db)}
            driver.wait_for(lambda: any(run not in seen for run, *_ in _trial_progress(db)) and bool(_half_way(db)),
                            "a later trial half way on the head")
            os.killpg(driver.proc.pid, signal.SIGKILL)
            driver.proc.wait(timeout=60)
        finally:
            driver.stop()
        resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resume", "faulty", "--address",
                                  cluster.address], cwd=workdir, env=cluster.driver_env, capture_output=True,
                                 text=True, timeout=400)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, parent, children = _children(workdir)
    assert {c.data.tags["kdo.status"] for c in children} <= {"finished", "superseded"}
    _each_point_finished_once(client, children, 4)
    assert parent.info.status == "FINISHED"
    nodes = {c.data.tags["where.node"] for c in children if "where.node" in c.data.tags}
    assert len(nodes) == 2, nodes  # by Ray node id: trials ran on the head and on the second node
    files = {c.data.tags["where.file"] for c in children if "where.file" in c.data.tags}
    assert files and all("runtime_resources" in f and str(workdir) not in f for f in files), files


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tracking_server_lost_mid_sweep_ends_it_in_one_line_and_resume_finishes_it(workdir: Path,
                                                                                    teacher_checkpoint: Path) -> None:
    """The `mlflow server` is stopped while a trial is half way: that trial stops with a one-line reason, the
    other is tried too (it cannot start its run), the driver exits 1 naming `kdo resume` with no traceback and
    the parent and the open child are left as they are. The server is started again on the same port and store:
    `kdo report` settles the open child `crashed`, `kdo resume` runs every point to the end, each once."""
    server_dir = workdir / "server"
    server_dir.mkdir()
    port = free_port()
    db = server_dir / "srv.db"
    # Retries bounded low here (MLflow's own variables; kdo's default is 5 retries, about 30 s a call).
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    args = [*_sweep(teacher_checkpoint), "--trials", "2", "--set", f"tracking.uri=http://127.0.0.1:{port}"]
    with mlflow_server(server_dir, port) as url:
        driver = Driver(workdir, args, env=env)
        try:
            driver.wait_for(lambda: bool(_half_way(db)), "a trial half way")
        except BaseException:
            driver.stop()
            raise
    try:  # the server is gone
        assert driver.proc.wait(timeout=300) == 1, driver.output()[-3000:]
    finally:
        driver.stop()
    out = driver.output()
    assert "Traceback" not in out, out[-3000:]
    assert (f"error: the MLflow store at {url} stopped answering (1 retries spent); once it answers, "
            "`kdo resume faulty` settles the runs left open and finishes the work") in out, out[-3000:]
    assert "its runs could not be read (the MLflow store did not answer)" in out, out[-3000:]
    with mlflow_server(server_dir, port):
        client = MlflowClient(url)
        [parent] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id],
                                      "tags.`kdo.kind` = 'sweep'")
        assert parent.info.status == "RUNNING", "the lost driver could not end its parent"
        report = CliRunner().invoke(app, ["report", "faulty", "--tracking-uri", url])
        assert report.exit_code == 0, report.output
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert [c.data.tags["kdo.status"] for c in children] == ["crashed"], "the open child was settled"
        assert client.get_run(parent.info.run_id).info.status == "FAILED"
        resumed = CliRunner().invoke(app, ["resume", "faulty", "--tracking-uri", url], env=env)
        assert resumed.exit_code == 0, resumed.output
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.data.tags["kdo.status"] for c in children) == ["finished"] * 2, "continued in place"
        _each_point_finished_once(client, children, 2)
        assert client.get_run(parent.info.run_id).info.status == "FINISHED"

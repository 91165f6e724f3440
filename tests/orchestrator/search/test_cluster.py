"""Sweeps against real external services: a `ray start` cluster and an `mlflow server`.

Both services are started by the test itself and stopped by PID afterwards (never `ray stop`, which would
kill every Ray process on the machine, the pytest session's own runtime included).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.search.sweep import sweep
from tests.conftest import digits_config

BIN = Path(sys.executable).parent
KD = {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9}}
TEACHER = {"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 2, "lr": 0.05}}
MARKER = "KDO_TEST_CLUSTER"  # in the environment of `ray start`, inherited by the processes of its cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ processes
def _pids() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours
        return b""


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; [] if gone."""
    return _read(pid, "stat").decode(errors="replace").rsplit(")", 1)[-1].split()


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return bool(stat) and stat[0] not in ("Z", "X")


def _with_descendants(roots: set[int]) -> set[int]:
    parents = {}
    for pid in _pids():
        stat = _stat(pid)
        if len(stat) > 1:
            parents[pid] = int(stat[1])
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _cluster_processes(before: set[int], tag: str, temp_dir: str) -> set[int]:
    """Processes that appeared since `before`, belong to the cluster and mention ray.

    A process belongs to the cluster if it carries the `ray start` environment tag (GCS, raylet, monitors,
    most workers), names the cluster's private temp dir on its command line, or descends from one that
    does (the agents and workers whose title, set by setproctitle, overwrote their environment block).
    Other sessions' Ray processes that started meanwhile are left alone, and so are pytest and its
    descendants (the session's own `ray.init` runtime lives there).
    """
    new = _pids() - before - _with_descendants({os.getpid()})
    needle = f"{MARKER}={tag}".encode()
    roots = {pid for pid in new if needle in _read(pid, "environ").split(b"\0")
             or temp_dir.encode() in _read(pid, "cmdline")}
    members = _with_descendants(roots) & new
    return {pid for pid in members if b"ray" in _read(pid, "cmdline")}


def _terminate(pids: set[int], grace: float = 5.0) -> set[int]:
    """SIGTERM, then SIGKILL whatever is still alive after `grace` seconds; returns the survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = {p for p in pids if _alive(p)}
        if not pids:
            break
    return pids


def _auth_mode() -> str:
    """The auth mode both `ray start` and the driver must use.

    `ray start` turns token auth on by itself when a token exists (~/.ray/auth_token), but a driver's
    `ray.init(address=<host:port>)` turns it on only with RAY_AUTH_MODE=token (only `address="auto"`
    auto-enables it): pin the mode on both sides.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"]
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").is_file())
    return "token" if has_token else "disabled"


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port of its GCS, for `--address` / `ray.init(address=...)`
    temp_dir: Path
    driver_env: dict[str, str]  # the environment a driver process needs to join it

    @property
    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def diagnose(self, chars: int = 1500) -> str:
        """The tails of the GCS and raylet logs, for failure messages."""
        parts = []
        for name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err"):
            path = self.logs / name
            text = path.read_text(errors="replace")[-chars:] if path.exists() else "(missing)"
            parts.append(f"--- {name}:\n{text}")
        return "\n".join(parts)


@contextmanager
def ray_cluster(num_cpus: int = 2, num_gpus: int = 0) -> Iterator[RayCluster]:
    """A one-node `ray start --head` cluster on free ports, stopped by PID afterwards (never `ray stop`).

    Its temp dir is a short private folder (Ray's socket paths must stay under 107 characters), so its
    logs never mix with other runtimes'. Reusable for tests that kill and resume a driver on one cluster.
    """
    port, client_port, agent_port = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="kdo-ray-")
    tag = uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base["RAY_AUTH_MODE"] = _auth_mode()
    before = _pids()
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus), "--include-dashboard=false",
             "--disable-usage-stats", "--ray-client-server-port", str(client_port),
             "--dashboard-agent-listen-port", str(agent_port), "--temp-dir", temp_dir],
            env={**base, MARKER: tag}, check=True, capture_output=True, text=True, timeout=150)
        yield RayCluster(f"127.0.0.1:{port}", Path(temp_dir), base)
    finally:
        left = _terminate(_cluster_processes(before, tag, temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"ray cluster processes survived SIGKILL: {sorted(left)}"


@contextmanager
def joined_node(cluster: RayCluster, num_cpus: int = 1, env: dict[str, str] | None = None
                ) -> Iterator[Callable[[], set[int]]]:
    """A second node (`ray start --address`) joined to `cluster` (with `env` on top of the driver's: e.g. a HOME of
    its own); yields a function that gives its processes now (its raylet and the workers it started), so a test can
    kill the node. Stopped by PID afterwards."""
    tag, before = uuid.uuid4().hex, _pids()
    unmatched = f"/{tag}/"  # its processes name the head's temp dir too: tell them apart by the tag alone
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--address", cluster.address, "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(num_cpus), "--disable-usage-stats", "--dashboard-agent-listen-port",
             str(free_port())],
            env={**cluster.driver_env, **(env or {}), MARKER: tag}, check=True, capture_output=True, text=True,
            timeout=150)
        yield lambda: _cluster_processes(before, tag, unmatched)
    finally:
        _terminate(_cluster_processes(before, tag, unmatched), grace=2.0)


# ------------------------------------------------------------------------------------------ tests
def _kdo(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 220) -> tuple[int, str, str, int]:
    """`kdo ARGS` in a subprocess: exit code, stdout, stderr, pid."""
    proc = subprocess.Popen([str(BIN / "kdo"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err, proc.pid


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_on_a_ray_start_cluster_and_gpu_trials_packed_on_its_logical_gpu(workdir: Path) -> None:
    """`kdo sweep --address` from another process runs its trials on that cluster and logs them to MLflow. The
    cluster has one logical GPU (`--num-gpus 1`, no CUDA here): `use_gpu: true` trials at 0.25 GPU each are
    granted a quarter of it, all on GPU 0, and each ends `crashed` with one line saying what Ray gave it."""
    config = workdir / "digits.yaml"
    config.write_text(yaml.safe_dump(digits_config(method=KD, teacher=TEACHER, training={"epochs": 2, "lr": 0.05},
                                                   scaling={"use_gpu": False})))
    gpu_config = workdir / "digits-gpu.yaml"
    gpu_config.write_text(yaml.safe_dump(digits_config(training={"epochs": 2, "lr": 0.05}, scaling={
        "use_gpu": True, "gpus_per_worker": 0.25, "cpus_per_worker": 0.5})))
    with ray_cluster(num_cpus=2, num_gpus=1) as cluster:
        # A separate process: this one may already hold the session's own `ray.init` runtime.
        code, out, err, pid = _kdo(["sweep", str(config), "--address", cluster.address, "--trials", "2",
                                    "--sampler", "random", "--concurrency", "2", "--name", "cluster-test"],
                                   workdir, cluster.driver_env)
        assert code == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}\n{cluster.diagnose()}"
        assert "cluster-test" in out, out
        # The driver really joined that cluster: its core-worker log lies in the cluster's own session.
        drivers = [p.name for p in cluster.logs.glob(f"python-core-driver-*_{pid}.log")]
        assert drivers, sorted(p.name for p in cluster.logs.iterdir())
        code, out, err, _ = _kdo(["sweep", str(gpu_config), "--address", cluster.address, "--trials", "4",
                                  "--sampler", "sobol", "--concurrency", "4", "--name", "gpu-test"],
                                 workdir, cluster.driver_env)
        assert code == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}\n{cluster.diagnose()}"
        assert "Traceback" not in out + err, err[-5000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep' and tags.`kdo.sweep` = 'cluster-test'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    assert all(c.info.status != "RUNNING" for c in children), [c.info.status for c in children]
    assert all(c.data.tags["kdo.status"] in ("finished", "early_stopped") for c in children)
    [gpu_parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep' and tags.`kdo.sweep` = 'gpu-test'")
    reasons = [c.data.tags.get("kdo.reason", "") for c in
               client.search_runs([exp], f"tags.mlflow.parentRunId = '{gpu_parent.info.run_id}'")
               if c.data.tags["kdo.status"] == "crashed"]
    assert len(reasons) == 4, reasons
    for reason in reasons:
        assert reason.startswith("RuntimeError: scaling.use_gpu: Ray gave the worker on ") and "GPU 0.25" in reason
        assert "(GPU ids [0]), but torch" in reason and "finds no CUDA device there" in reason, reason
    lines = [line for line in out.splitlines() if ": crashed (RuntimeError: scaling.use_gpu" in line]
    assert len(lines) == 4, out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readmes_multi_node_recipe_with_an_authenticated_store(workdir: Path, tmp_path_factory) -> None:
    """The README's "On several machines", on 127.0.0.1: a head, a worker node that joins with the head's token
    copied into a HOME of its own (`RAY_AUTH_MODE=token`), an `mlflow server --app-name basic-auth`, and a sweep
    whose store URI carries the credentials. Its trials run on both nodes (by Ray node id: a plugin method tags
    it), the credentials never reach a param or a tag, and a client without them is refused."""
    from tests.orchestrator.search.test_faults import WHERE

    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    node_home = tmp_path_factory.mktemp("node-home")
    (node_home / ".ray").mkdir()
    mode = _auth_mode()
    if mode == "token":  # the README's `scp <head>:.ray/auth_token ~/.ray/` (a machine with auth off has none)
        shutil.copy(token, node_home / ".ray" / "auth_token")
    (workdir / "where.py").write_text(WHERE)
    (workdir / "where_space.yaml").write_text("method: kd_where\nplugins: [where.py]\nparameters:\n"
                                              "  temperature: {type: float, low: 1.0, high: 8.0, log: true}\n")
    server_dir = workdir / "server"
    server_dir.mkdir()
    with mlflow_server(server_dir, admin_password="kdo-recipe-pw") as url, ray_cluster(num_cpus=1) as cluster, \
            joined_node(cluster, num_cpus=1, env={"HOME": str(node_home), "RAY_AUTH_MODE": mode}):
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials: no runs
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401
        store = url.replace("http://", "http://admin:kdo-recipe-pw@")
        code, out, err, _ = _kdo(["sweep", "digits_kd", "--space", "where_space.yaml", "--set",
                                  "method.name=kd_where", "--sampler", "sobol", "--trials", "4", "--group-size", "1",
                                  "--concurrency", "2", "--address", cluster.address, "--name", "recipe", "--set",
                                  "training.epochs=2", "--set", "teacher.training.epochs=2"],
                                 workdir, {**cluster.driver_env, "MLFLOW_TRACKING_URI": store})
        assert code == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}\n{cluster.diagnose()}"
        assert "kdo-recipe-pw" not in out + err and "admin:***@" in out, out[-2000:]
        client = MlflowClient(store)
        exp = client.get_experiment_by_name("kdo").experiment_id
        children = client.search_runs([exp], "tags.`kdo.sweep` = 'recipe' and tags.`kdo.kind` = 'trial'")
        assert sorted(c.data.tags["kdo.status"] for c in children) == ["finished"] * 4
        assert len({c.data.tags["where.node"] for c in children}) == 2  # both nodes trained, by Ray node id
        for c in children:
            assert not [v for v in [*c.data.params.values(), *c.data.tags.values()] if "kdo-recipe-pw" in v]


@contextmanager
def mlflow_server(cwd: Path, port: int | None = None, admin_password: str | None = None) -> Iterator[str]:
    """`mlflow server` on `port` (default: a free one) with a SQLite store in `cwd`; yields its URL, stops its
    process group. With `admin_password`, the README's authenticated server: `--app-name basic-auth`, its admin
    user `admin` created with that password, a Flask secret key."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = (cwd / "server.log").open("wb")
    auth = ["--app-name", "basic-auth"] if admin_password else []
    secrets = {"MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex} if admin_password else {}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", *auth, "--backend-store-uri", f"sqlite:///{cwd / 'srv.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # Tracking only: without its job runner (7 huey consumers) it is healthy ~5x sooner on 2 cores.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **secrets})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow server exited {proc.returncode}:\n{_tail(cwd / 'server.log')}"
            assert time.monotonic() < deadline, f"mlflow server not healthy in 90 s:\n{_tail(cwd / 'server.log')}"
            time.sleep(0.5)
        yield url
    finally:
        left = _stop_group(proc)
        log.close()
        assert not left, f"mlflow server process group {proc.pid} survived SIGKILL"


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> bool:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` s; True if something survived."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, else it lingers as a zombie of this process
            if not _group_alive(proc.pid):
                return False
            time.sleep(0.2)
    return _group_alive(proc.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_runtime")
def test_sweep_against_an_mlflow_server(workdir: Path) -> None:
    """Trials log their children, per-epoch metrics and the parent's artifacts through an HTTP tracking server."""
    server_dir = workdir / "server"
    server_dir.mkdir()
    epochs = 2
    cfg = digits_config(training={"epochs": epochs, "lr": 0.05})
    space = {"parameters": {"training.lr": {"type": "choice", "values": [0.02, 0.05]}}}
    with mlflow_server(server_dir) as url:
        result = sweep(cfg, space, trials=2, sampler="grid", concurrency=2, name="server-test",
                       overrides=[f"tracking.uri={url}"])
        assert result.tracking_uri == url
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("kdo").experiment_id
        [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep' and tags.`kdo.sweep` = 'server-test'")
        assert parent.info.status == "FINISHED"
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == 2
        assert sorted(float(c.data.params["training.lr"]) for c in children) == [0.02, 0.05]
        for child in children:
            assert child.info.status == "FINISHED"
            history = client.get_metric_history(child.info.run_id, "val_acc")
            assert len(history) == epochs, [(m.step, m.value) for m in history]
        assert "results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert (server_dir / "mlartifacts").is_dir(), "artifacts are stored under the server's cwd"
    assert not (workdir / "mlflow.db").exists(), "nothing was logged to the default local store"

"""Sweeps on a real local Ray runtime, real Optuna, real SQLite MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop
from orchestrator.experiment.tracking import start_run
from orchestrator.search import ledger
from orchestrator.search.parent import ParentRun, finish
from orchestrator.search.sweep import load_sweep, sweep
from tests.conftest import digits_config

KD = {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9}}
TEACHER = {"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 3, "lr": 0.05}}


def _space_file(workdir: Path, space: dict) -> str:
    path = workdir.parent / f"{workdir.name}-space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


@pytest.mark.parametrize(("space", "needle"), [
    ({"parameters": {"tempx": {"type": "float", "low": 1, "high": 2}}},
     "parameter 'method.params.tempx' = 1.0 is invalid: method.params.tempx: unknown field; allowed: temperature"),
    ({"parameters": {"temperature": {"type": "float", "low": 0, "high": 20}}},
     "'method.params.temperature' = 0.0 is invalid: method.params.temperature: Input should be greater than 0"),
    ({"parameters": {"temperature": {"type": "float", "low": 8, "high": 2}}}, "low must be < high"),
    ({"parameters": {"training.lr": {"type": "float", "low": -1, "high": 1, "log": True}}}, "log scale needs low > 0"),
    ({"parameters": {"training.optimizer": {"type": "choice", "values": []}}}, "non-empty 'values'"),
    ({"parameters": {"kd_weight": {"type": "float", "low": 0, "high": 101}}}, "less than or equal to 100"),
    ({"parameters": {"kd_weight": {"type": "float", "low": 0, "high": 3}}},
     "'method.params.kd_weight' = 3.0 is invalid: method.params.ce_weight: give it when kd_weight > 1"),
    ({"method": "ce", "parameters": {"training.lr": {"type": "float", "low": 0.1, "high": 1}}},
     "space is for method 'ce' but the config runs 'kd'"),
    ({"parameters": {"temperature": {"type": "normal", "low": 1, "high": 2}}}, "'float', 'int' or 'choice'"),
    ({"parameters": {"data.val_fraction": {"type": "choice", "values": [0.2, 0.1]}}},
     "parameter 'data.val_fraction' cannot vary per trial: data, teacher, scaling and tracking are prepared once"),
])
def test_bad_space_is_one_line_exit_2_nothing_started(workdir: Path, space: dict, needle: str) -> None:
    result = CliRunner().invoke(app, ["sweep", "digits_kd", "--space", _space_file(workdir, space)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert list(workdir.iterdir()) == [], "no MLflow store, no Ray storage, no cache"


@pytest.mark.parametrize(("args", "needle"), [
    (["--sampler", "bayes"], "--sampler: unknown sampler 'bayes'; allowed: tpe, random, sobol, grid"),
    (["--sampler", "sobol", "--trials", "5"], "power of two (got 5; try 4 or 8)"),
    (["--sampler", "grid", "--scheduler", "asha"], "a fixed grid design runs every point in full"),
    (["--space", "nope"], "--space: 'nope' is neither a file nor a shipped space; shipped: ce, dafl, "),
    (["--seeds", "0,0"], "--seeds: distinct integers in 0..2147483647, e.g. 0,1,2 (got [0, 0])"),
    (["--seeds", "0,2147483648"], "--seeds: distinct integers in 0..2147483647, e.g. 0,1,2 (got [0, 2147483648])"),
    (["--seeds", "-1"], "--seeds: distinct integers in 0..2147483647"),
    (["--max-failures", "-1"], "--max-failures: retries of a crashed trial, 0 to 100 (got -1)"),
    (["--set", "data.val_fraction=0", "--set", "training.selection=last", "--set", "teacher.training.selection=last"],
     "data.val_fraction: 0 leaves no validation split, which a sweep selects on (val_acc); allowed: 0 < val_fraction"),
])
def test_bad_sweep_options(workdir: Path, args: list[str], needle: str) -> None:
    result = CliRunner().invoke(app, ["sweep", "digits_kd", *args])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert list(workdir.iterdir()) == []


SOURCE = ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "mlflow.source.git.commit")


def _datasets(run: object) -> dict[str, tuple[str, str]]:
    return {i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs}


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("ray_runtime")
def test_asha_sweep_logs_parent_and_children_and_trains_the_teacher_once(workdir: Path) -> None:
    cfg = digits_config(method=KD, teacher=TEACHER, training={"epochs": 3, "lr": 0.05},
                        tracking={"system_metrics_seconds": 0})  # off (`kdo run`'s test sees them on)
    result = sweep(cfg, "kd", trials=4, sampler="tpe", concurrency=2, seeds=[0, 1], name="asha-test")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["kdo.sampler"] == "tpe"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 * 2, "one child per (setting, seed)"
    assert all(c.info.status != "RUNNING" for c in children)
    for child in children:
        p = child.data.params
        assert 1.0 <= float(p["method.params.temperature"]) <= 20.0
        assert 0.0 <= float(p["method.params.kd_weight"]) <= 1.0
        assert 0.005 <= float(p["training.lr"]) <= 0.5
        assert child.data.tags["kdo.status"] in ("finished", "early_stopped")
        assert len(client.get_metric_history(child.info.run_id, "val_acc")) >= 1
        # The driver's source tags (not the Ray worker's script) and the datasets it loaded, on every child.
        assert {k: child.data.tags[k] for k in SOURCE} == {k: parent.data.tags[k] for k in SOURCE}
        assert _datasets(child) == _datasets(parent) and set(_datasets(child)) == {"training", "validation", "test"}
        assert not [k for k in child.data.metrics if k.startswith("system/")]
    assert parent.data.tags["mlflow.source.name"].endswith(("pytest", "py"))
    finished = [c for c in children if c.data.tags["kdo.status"] == "finished"]
    assert finished and all(len(client.get_metric_history(c.info.run_id, "val_acc")) == 3 for c in finished)
    assert len(client.search_runs([exp], "tags.`kdo.kind` = 'teacher'")) == 1, "teacher trained once per sweep"
    # The Optuna study beside the store (optuna-dashboard opens it): one trial per setting, none left open.
    trials = optuna.load_study(study_name="asha-test", storage=f"sqlite:///{workdir / 'optuna.db'}").trials
    settings = {json.dumps(json.loads(c.data.tags["kdo.setting"]), sort_keys=True) for c in children}
    assert sorted(json.dumps({k.replace("__", "."): v for k, v in t.params.items()}, sort_keys=True)
                  for t in trials) == sorted(settings)
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert {"results.csv", "config.yaml", "space.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = result.best()
    assert parent.data.tags["best_setting_id"] == best.name
    assert parent.data.tags["best_model"] == "models:/kdo-student-asha-test/1"  # the best student, registered
    version = client.get_model_version("kdo-student-asha-test", "1")
    assert version.source == f"runs:/{parent.data.tags['best_run_id']}/student"
    assert parent.data.metrics["best_val_acc"] == pytest.approx(best["val_acc_mean"])
    # `kdo report` rebuilds the same table from MLflow alone.
    again = load_sweep("asha-test")
    assert again.frame[["run_id", "status"]].sort_values("run_id").values.tolist() == \
        result.frame[["run_id", "status"]].sort_values("run_id").values.tolist()
    report = CliRunner().invoke(app, ["report", "asha-test"])
    assert report.exit_code == 0 and best.name in report.output
    # Resuming a sweep that finished has nothing to do: one line, the table, no model version registered again.
    resumed = CliRunner().invoke(app, ["resume", "asha-test"])
    assert resumed.exit_code == 0 and "sweep 'asha-test' finished: nothing to resume" in resumed.output
    assert best.name in resumed.output
    assert [str(v.version) for v in client.search_model_versions("name = 'kdo-student-asha-test'")] == ["1"]


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("ray_runtime")
def test_children_left_running_keep_the_outcome_their_loop_recorded(workdir: Path) -> None:
    # Tune may tear a trial process down right after its last report, before it closes its MLflow run:
    # the sweep's finisher must not turn such a finished run into an early-stopped one. A child left RUNNING
    # with no outcome is early_stopped only when its Tune trial ended without an error (the scheduler stopped
    # it); otherwise its process died: crashed, and resume redoes it.
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, exp = start_run(uri, "kdo", "p", tags={"kdo.kind": "sweep"})
    tags = {"kdo.kind": "trial", "kdo.setting_id": "s1", "kdo.setting": "{}"}
    done, _ = start_run(uri, "kdo", "done", tags={**tags, "kdo.seed": 0}, parent_run_id=parent.run_id)
    done.log_metrics({"val_acc": 0.8, "selected_val_acc": 0.8, "test_acc": 0.7}, step=1)
    done.set_tags({"kdo.status": "finished"})
    cut, _ = start_run(uri, "kdo", "cut", tags={**tags, "kdo.setting_id": "s2", "kdo.seed": 0},
                       parent_run_id=parent.run_id)
    cut.log_metrics({"val_acc": 0.3}, step=1)
    cut.set_tags({"kdo.trial_id": "t-cut"})
    died, _ = start_run(uri, "kdo", "died", tags={**tags, "kdo.setting_id": "s3", "kdo.seed": 0,
                                                  "kdo.trial_id": "t-died"}, parent_run_id=parent.run_id)
    finish(ParentRun("sweep", "p", parent, "kdo", exp, str(workdir / "kdo_runs")), "FINISHED",
           frozenset({"t-cut"}), "crashed", summarise=lambda status: status)
    frame = ledger.children_frame(MlflowClient(uri), exp, parent.run_id, []).set_index("setting_id")
    assert frame.loc["s1", "status"] == "finished" and frame.loc["s2", "status"] == "early_stopped"
    assert frame.loc["s3", "status"] == "crashed"
    client = MlflowClient(uri)
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert client.get_run(cut.run_id).info.status == "KILLED"
    assert client.get_run(died.run_id).info.status == "FAILED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"


@pytest.mark.timeout(240)
def test_grid_sweep_counts_a_diverged_setting_and_finishes_the_rest(workdir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.search.sweep as sweep_module

    # Spies around the real checks (the base's, then each point's teacher and method check) and provision: their
    # calls, in order.
    events: list[tuple[str, str]] = []
    real_check, real_point_check = sweep_module.check, sweep_module.check_teacher_checkpoint
    real_provision = sweep_module.provision

    def check(config: object, *args: object, **kwargs: object) -> object:
        cfg = real_check(config, *args, **kwargs)
        events.append(("check", cfg.name))
        return cfg

    def check_point(cfg: object, *args: object, **kwargs: object) -> object:
        events.append(("check", cfg.name))
        return real_point_check(cfg, *args, **kwargs)

    def provision(cfg: object, **kwargs: object) -> object:
        events.append(("provision", cfg.name))
        return real_provision(cfg, **kwargs)

    monkeypatch.setattr(sweep_module, "check", check)
    monkeypatch.setattr(sweep_module, "check_teacher_checkpoint", check_point)
    monkeypatch.setattr(sweep_module, "provision", provision)
    cfg = digits_config(student={"architecture": "mlp", "args": {}},
                        training={"epochs": 2, "lr": 0.05, "momentum": 0.99})
    space = {"parameters": {"training.lr": {"type": "choice", "values": [0.01, 0.05, 10.0]}}}
    result = sweep(cfg, space, sampler="grid", concurrency=2, name="grid-nan", group_size=3)
    # The base config, then each (setting, seed) once, all before the one provision that starts Ray.
    assert [kind for kind, _ in events] == ["check"] * 4 + ["provision"], events
    assert sorted(name for _, name in events[1:4]) == sorted(f"grid-nan-{sid[:6]}-s0"
                                                             for sid in result.dataframe()["setting_id"])
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for run_id in result.dataframe()["run_id"]:  # the run tags of `kdo run`, on every child
        tags = client.get_run(run_id).data.tags
        assert (tags["kdo.dataset"], tags["kdo.student"], tags["kdo.teacher"]) == ("digits", "mlp", "none")
        assert tags["kdo.version"] == "0.1.0"
    assert client.get_run(result.parent_run_id).data.tags["kdo.version"] == "0.1.0"
    frame = result.dataframe().set_index("training.lr")
    assert len(frame) == 3
    assert frame.loc[10.0, "status"] == "diverged"
    assert (frame.loc[[0.01, 0.05], "status"] == "finished").all()
    assert frame.loc[0.05, "test_acc"] > 0.3
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert client.get_run(frame.loc[10.0, "run_id"]).info.status == "FAILED"
    assert result.best()["training.lr"] != 10.0
    # One grouped trial trained the three; each child equals its run alone, the diverged one's included.
    assert len({client.get_run(run_id).data.tags["kdo.trial_id"] for run_id in frame["run_id"]}) == 1
    for lr, run_id in frame["run_id"].items():
        alone = load_config(cfg, [f"training.lr={lr}"])
        history = train_loop(alone, load_splits(alone.data), log=None).history
        logged = sorted(client.get_metric_history(run_id, "val_acc"), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx([row["val_acc"] for row in history], abs=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_runtime")
def test_a_data_parallel_trial_whose_worker_is_killed_continues_from_its_checkpoint(workdir: Path,
                                                                                   teacher_checkpoint: Path) -> None:
    """Two DDP workers per trial. Rank 0 is SIGKILLed past epoch 3: Tune retries the trial (max_failures 1), which
    continues from Ray Train's newest checkpoint in the same child, each epoch logged once, with the results of
    the same run without faults (`kdo run`'s data-parallel path, beside it); nothing of either is left in the
    storage folder."""
    import ray.train  # noqa: F401  (imported once here: its first import from two threads at once is circular)

    from orchestrator.experiment.runner import run
    from tests.orchestrator.search.test_faults import _half_way

    epochs = 16  # epochs take a fraction of a second: a window wide enough to kill rank 0 past epoch 3
    cfg = digits_config(method=KD, teacher={"checkpoint": str(teacher_checkpoint)},
                        training={"epochs": epochs, "lr": 0.05}, scaling={"num_workers": 2, "cpus_per_worker": 0.25})
    space = {"parameters": {"temperature": {"type": "choice", "values": [2.0]}}}
    killed: list[int] = []
    unfaulted: list = []
    done = threading.Event()

    def kill_rank_0_half_way() -> None:
        while not killed and not done.wait(0.5):
            for pid in _half_way(workdir / "mlflow.db"):  # rank 0 tags its child with its own pid
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    def reference() -> None:
        try:
            unfaulted.append(run(cfg, ["method.params.temperature=2.0"]))
        except BaseException as err:  # shown by the assertion below, not lost in the thread
            unfaulted.append(err)

    threads = [threading.Thread(target=kill_rank_0_half_way, daemon=True), threading.Thread(target=reference)]
    for thread in threads:
        thread.start()
    try:
        faulted = sweep(cfg, space, sampler="grid", concurrency=1, name="ddp-faulty", max_failures=1,
                        checkpoint_seconds=0).dataframe()
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=300)
    assert killed, "rank 0 was killed half way"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run_id] = faulted["run_id"]
    child = client.get_run(run_id)
    assert child.data.tags["kdo.status"] == "finished" and child.data.params["scaling.num_workers"] == "2"
    children = client.search_runs([child.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{child.data.tags['mlflow.parentRunId']}'")
    assert len(children) == 1, "the retried trial continued its own child"
    [clean] = unfaulted
    assert not isinstance(clean, BaseException), f"the reference run raised {clean!r}"
    for result in (child.info.run_id, clean.run_id):
        assert [m.step for m in client.get_metric_history(result, "val_acc")] == list(range(1, epochs + 1))
    # The reference is `kdo run`'s own data-parallel path (this was a test of its own): it trains and reads back.
    assert clean.status == "finished" and clean.test_acc > 0.5  # chance is 0.1
    assert list(clean.history["epoch"]) == list(range(1, epochs + 1))
    assert client.get_run(clean.run_id).data.params["scaling.num_workers"] == "2"
    assert (faulted["val_acc"].iloc[0], faulted["test_acc"].iloc[0]) == pytest.approx((clean.val_acc, clean.test_acc),
                                                                                      abs=1e-6)
    assert not [p.name for p in (workdir / "kdo_runs").iterdir() if p.name.startswith(("ddp-", "test-"))]


RUN_LINE = re.compile(r"^\[ *(\d+)/(\d+)\] kd kd_weight=\S+ temperature=\S+ .*seed (\d+): (\w+)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_piped_adaptive_sweep_prints_one_line_per_seed_run_then_the_table(workdir: Path) -> None:
    """Without a terminal: one line per (setting, seed) run, ASHA's stops included, with the ledger's status; no
    Tune tables or result boxes, no worker output; then the top-settings table and the MLflow command."""
    cfg = digits_config(method=KD, teacher=TEACHER, training={"epochs": 4, "lr": 0.05},
                        scaling={"cpus_per_worker": 0.5})
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--space", "kd", "--trials",
                           "4", "--seeds", "0,1", "--concurrency", "2", "--name", "piped"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=540)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for noise in ("Trial status", "\u256d", "Traceback", "pid="):
        assert noise not in out, out
    lines = [m.groups() for line in done.stdout.splitlines() if (m := RUN_LINE.match(line))]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'sweep'")
    children = ledger.children(client, exp, parent.info.run_id)
    assert len(children) == 8 and len(lines) == 8, done.stdout
    assert [int(i) for i, *_ in lines] == list(range(1, 9)) and {t for _, t, *_ in lines} == {"8"}
    assert sorted((seed, status) for _, _, seed, status in lines) == sorted(
        (c.data.tags["kdo.seed"], ledger.status_of(c)) for c in children)
    tail = done.stdout[done.stdout.index("sweep piped: top settings"):]
    assert "MLflow: mlflow ui" in tail


@pytest.mark.usefixtures("ray_runtime")
def test_packed_trials_that_run_more_threads_than_cores_say_so_once(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.experiment.config import load_config
    from orchestrator.search.tuner import trial_resources

    one = load_config(digits_config(scaling={"cpus_per_worker": 1.0}))
    assert trial_resources(one, False, 2) == ({"cpu": 1.0, "gpu": 0.0}, 2)
    assert capsys.readouterr().err == ""  # two one-thread trials on the session's 2 CPUs: one thread per core
    half = load_config(digits_config(scaling={"cpus_per_worker": 0.5}))
    for _ in range(2):
        trial_resources(half, False, 4)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: up to 4 trials at once on a node of 2 CPUs, 1 torch thread(s) each: oversubscribed, "
                   "each runs slower; scaling.cpus_per_worker=1 (or --concurrency 2) runs as many threads as cores"]

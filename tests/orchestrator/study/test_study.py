"""Robustness studies on a real local Ray runtime and a real SQLite MLflow store, on digits."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.tracking import start_run
from orchestrator.search import ledger
from orchestrator.search.status import HIDDEN
from orchestrator.study.display import print_study
from orchestrator.study.optuna_export import export_optuna
from orchestrator.study.report import write_report
from orchestrator.study.results import read_results
from orchestrator.study.robustness import RobustnessStudy, shipped_studies
from tests.conftest import digits_config
from tests.orchestrator.search.test_resume import _finished_trials, _ray_pids, kill_when_finished

TEACHER = {"architecture": "cnn", "args": {"width": 8}, "training": {"epochs": 3, "lr": 0.05}}
# lr 10 with momentum 0.99 diverges, which the study must count as failures, not drop.
CE_SPACE = {"parameters": {"training.lr": {"type": "choice", "values": [0.01, 0.02, 0.05, 10.0]}},
            "fixed": {"training.momentum": 0.99}}


def _config(epochs: int = 2) -> dict:
    return digits_config(method={"name": "kd"}, teacher=TEACHER, training={"epochs": epochs, "lr": 0.05},
                         student={"architecture": "mlp", "args": {}}, scaling={"cpus_per_worker": 0.5})


def _study_file(workdir: Path, **changes: object) -> str:
    spec = {"name": "s", "config": _config(), "methods": {"kd": None}, "n_settings": 4, "seeds": [0, 1]}
    spec.update(changes)
    path = workdir / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the order of `methods` is the order of the table
    return str(path)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"methods": {"kdx": None}}, "study.methods: unknown method 'kdx'; allowed: ce, "),
    ({"n_settings": 6}, "study.n_settings: a Sobol design needs a power of two (got 6; try 4 or 8)"),
    ({"compare": [["kd", "ce"]]}, "study.compare: 'ce' is not a method of this study; allowed: kd"),
    ({"seeds": [0, 0]}, "study.seeds: distinct integers in 0..2147483647, e.g. [0, 1, 2] (got [0, 0])"),
    ({"seeds": [0, 2**31]}, "study.seeds: distinct integers in 0..2147483647, e.g. [0, 1, 2] (got [0, 2147483648])"),
    ({"max_failures": -1}, "study.max_failures: Input should be greater than or equal to 0 (got -1)"),
    ({"design": "lhs"}, "study.design: Input should be 'sobol', 'grid' or 'random'"),
    ({"budget": 3}, "study.budget: unknown field; allowed: name, config, methods"),
    ({"name": "x/y"}, "study.name: 'x/y' is not a valid name: letters, digits, '_', '.', '-' (up to 100, "),
    ({"methods": {"kd": {"space": {"parameters": {"tempx": {"type": "float", "low": 1, "high": 2}}}}}},
     "method.params.tempx: unknown field; allowed: temperature"),
    ({"methods": {"kd": {"params": {"temperature": -1}}}}, "study.methods.kd: method.params.temperature"),
    ({"references": ["nope"]}, "study.references: unknown method 'nope'"),
    ({"methods": {"kd_ls": {"method": "kdx"}}}, "study.methods.kd_ls.method: unknown method 'kdx'; allowed: ce, "),
    ({"methods": {"kd": {"method": "dkd"}}}, "study.methods: label 'kd' is the name of a method but runs 'dkd'"),
    ({"methods": {"kd+ls": {"method": "kd"}}}, "study.methods: label 'kd+ls': letters, digits, '_', '-' and '.'"),
    ({"methods": {"kd_ls": {"method": "kd", "params": {"logit_standardization": 3}}}},
     "study.methods.kd_ls: method.params.logit_standardization"),
    ({"n_settings": 0, "compare": [["kd", "kd"]]}, "study.compare: robustness needs a design; with n_settings 0"),
    ({"n_settings": 0, "include_defaults": False}, "study.n_settings: 0 runs each entry at its defaults only, so"),
    ({"methods": {"kd": {"config": "digits_kd"}}},
     "study.methods.kd.config: its teacher section differs from the study's config; allowed: the same teacher"),
    ({"methods": {"kd": {"config": "fashion_mnist_kd"}}}, "study.methods.kd.config: its data section differs"),
    ({"set": ["data.val_fraction=0", "training.selection=last", "teacher.training.selection=last"]},
     "data.val_fraction: 0 leaves no validation split, which a study selects on (val_acc); allowed: 0 < val_fraction"),
])
def test_bad_study_is_one_line_exit_2_nothing_started(workdir: Path, changes: dict, needle: str) -> None:
    result = CliRunner().invoke(app, ["study", _study_file(workdir, **changes)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("\n") == 1, result.output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "kdo_runs").exists()


LABELLED = {"kd": None, "kd_ls": {"method": "kd", "params": {"logit_standardization": True}, "space": "kd_ls"}}


def test_label_entries_plan_their_method_under_their_label() -> None:
    study = RobustnessStudy("labels", _config(), {**LABELLED, "dkd": None}, n_settings=2, seeds=[0, 1])
    assert study.methods == ["kd", "kd_ls", "dkd", "ce"] and set(study.spaces) == {"kd", "kd_ls", "dkd"}
    assert len(study.points) == 3 * (2 + 1) * 2 + 2
    runs = {"kd": "kd", "kd_ls": "kd", "dkd": "dkd", "ce": "ce"}
    for point in study.points:
        label = point.tags["kdo.entry"]
        assert point.config.method.name == runs[label], label
        assert point.config.method.params.get("logit_standardization", False) == (label == "kd_ls")
    ls = [p for p in study.points if p.tags["kdo.entry"] == "kd_ls"]
    defaults = next(p for p in ls if p.tags["kdo.role"] == "defaults").config.method.params
    assert (defaults["temperature"], defaults["kd_weight"], defaults["ce_weight"]) == (2.0, 9.0, 0.1)  # LS paper
    assert all(p.config.method.params["ce_weight"] == 0.1 for p in ls)  # fixed by the kd_ls space
    sids = {label: {p.setting_id for p in study.points if p.tags["kdo.entry"] == label} for label in runs}
    assert not sids["kd"] & sids["kd_ls"], "the same setting of two entries is two settings"
    again = study.replace(seeds=[0])  # the spec round trip keeps the entries
    assert again.spec.methods["kd_ls"].method == "kd" and len(again.points) == len(study.points) // 2


def test_results_tables_and_verdicts_name_rows_by_label(workdir: Path) -> None:
    study = RobustnessStudy("labelled", _config(), LABELLED, n_settings=2, seeds=[0])
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, experiment_id = start_run(uri, "kdo", "labelled", tags={"kdo.kind": "study", "kdo.study": "labelled"})
    ref = ledger.LedgerRef("labelled", parent.run_id, uri, "kdo", experiment_id)
    for i, point in enumerate(study.points):  # children as the trials write them, with made-up accuracies
        child = ledger.start_child(ref, ExperimentConfig.model_validate(point.config), point.setting,
                                   point.setting_id, point.tags)
        child.log_metrics({"val_acc": 0.5 + 0.05 * i, "test_acc": 0.5}, step=1)
        ledger.close_child(child, "finished")
        if point.tags["kdo.entry"] == "ce":  # a child of a study from before labels: `kdo.method` alone
            MlflowClient(uri).delete_tag(child.run_id, "kdo.entry")
    parent.finish("FINISHED")
    loaded = read_results(study.spec, study.base, study.spaces, uri, experiment_id, parent.run_id)
    frame = loaded.results()
    assert list(dict.fromkeys(frame["method"])) == ["kd", "kd_ls", "ce"]
    tags = {r: MlflowClient(uri).get_run(r).data.tags for r in frame["run_id"]}
    assert {t["kdo.method"] for t in tags.values()} == {"kd", "ce"}
    assert {t.get("kdo.entry") for t in tags.values()} == {"kd", "kd_ls", None}
    assert list(loaded.summary().index) == ["kd", "kd_ls", "ce"]
    assert loaded.compare("kd_ls", "kd")["a"] == "kd_ls"
    out = io.StringIO()
    print_study(loaded, console=Console(file=out, width=200))  # the console table and verdicts (the report's too)
    assert "│ kd_ls " in out.getvalue() and "kd more robust than kd_ls: " in out.getvalue()
    registered = loaded.register_best()  # each entry's best run (highest val) in the model registry
    assert registered == {"best_model.kd": "models:/kdo-student-labelled.kd/1",
                          "best_model.kd_ls": "models:/kdo-student-labelled.kd_ls/1"}
    best_kd = frame[frame["method"] == "kd"].sort_values("val_acc")["run_id"].iloc[-1]
    assert MlflowClient(uri).get_model_version("kdo-student-labelled.kd", "1").source == f"runs:/{best_kd}/student"
    assert loaded.register_best() == registered, "registering again reuses the version"
    storage, names = export_optuna(loaded)  # `kdo export optuna`: one Optuna study per entry, beside the store
    assert storage == f"sqlite:///{workdir.resolve() / 'optuna.db'}" and names == ["labelled.kd", "labelled.kd_ls"]
    means = loaded.setting_means()
    for label in ("kd", "kd_ls"):
        trials = optuna.load_study(study_name=f"labelled.{label}", storage=storage).trials
        design = means[(means["method"] == label) & ~means["defaults"]]
        assert sorted(t.value for t in trials) == pytest.approx(sorted(design["score"]))
        assert set(trials[0].params) == set(loaded.spaces[label].parameters)


def test_a_defaults_only_study_runs_each_entry_on_its_own_config_and_reports_without_verdicts(workdir: Path) -> None:
    own = {**_config(epochs=3), "method": {"name": "kd", "params": {"temperature": 2.0}},
           "training": {"epochs": 3, "lr": 0.02}}  # kd's own config: its params and training, the study's teacher
    study = RobustnessStudy("repro", _config(), {"kd": {"config": own, "params": {"kd_weight": 0.5}}, "dkd": None},
                            n_settings=0, seeds=[0, 1], references=["ce"])
    assert [(p.tags["kdo.entry"], p.tags["kdo.role"]) for p in study.points] == [
        ("kd", "defaults")] * 2 + [("dkd", "defaults")] * 2 + [("ce", "reference")] * 2
    kd = study.points[0].config
    assert {"temperature": 2.0, "kd_weight": 0.5}.items() <= kd.method.params.items()
    assert kd.training.lr == 0.02 and study.points[2].config.training.lr == 0.05  # dkd: the study's
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    parent, experiment_id = start_run(uri, "kdo", "repro", tags={"kdo.kind": "study", "kdo.study": "repro"})
    ref = ledger.LedgerRef("repro", parent.run_id, uri, "kdo", experiment_id)
    for i, point in enumerate(study.points):
        child = ledger.start_child(ref, ExperimentConfig.model_validate(point.config), point.setting,
                                   point.setting_id, point.tags)
        child.log_metrics({"val_acc": 0.6 + 0.1 * (i // 2) + 0.02 * (i % 2), "test_acc": 0.5 + 0.1 * (i // 2)},
                          step=1)
        ledger.close_child(child, "finished")
    parent.finish("FINISHED")
    loaded = read_results(study.spec, study.base, study.spaces, uri, experiment_id, parent.run_id)
    summary = loaded.summary()
    assert list(summary.index) == ["kd", "dkd", "ce"] and loaded.comparisons() == []
    assert summary.loc["dkd", "default_val"] == pytest.approx(71.0)  # seeds 70 and 72: mean ± std over seeds
    out = io.StringIO()
    print_study(loaded, console=Console(file=out, width=200))
    assert "│ dkd " in out.getvalue() and "more robust" not in out.getvalue()
    assert "dkd" in write_report(loaded, workdir / "report").read_text()


def test_shipped_studies_validate() -> None:
    assert {"kd_temperature", "demo", "logit_baselines"} <= set(shipped_studies())
    real = {**dict.fromkeys(("logit_baselines", "fashion_mnist_reproduction", "rdskd_vs_dafl"), "fashion_mnist"),
            "cifar100_logit_baselines": "cifar100", "cifar100_logit_baselines_wrn": "cifar100"}
    for name in shipped_studies():
        study = RobustnessStudy.from_yaml(name)
        assert study.points and all(p.config.data.name == real.get(name, "digits") for p in study.points)


@pytest.mark.slow  # two minutes of real study: the fast suite's budget is the whole suite's eight
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_runtime")
def test_study_runs_counts_failures_and_is_rebuilt_from_mlflow(workdir: Path) -> None:
    study = RobustnessStudy("small", _config(), {"kd": None, "ce": CE_SPACE}, n_settings=4, seeds=[0, 1],
                            concurrency=4)
    assert len(study.points) == 2 * (4 + 1) * 2  # (design + defaults) x seeds per method; ce is studied here
    study.run()
    frame = study.results()
    assert len(frame) == 20 and set(frame["method"]) == {"kd", "ce"}
    assert set(frame["role"]) == {"design", "defaults"}
    assert frame.groupby(["method", "setting_id"]).size().eq(2).all()
    lr = "training.lr"
    diverged = frame[frame["status"] == "diverged"]
    assert len(diverged) == 2 and (diverged[lr] == 10.0).all(), "the huge learning rates diverge, and are kept"
    assert set(frame["status"]) <= {"finished", "diverged"}

    summary = study.summary()
    assert summary.loc["ce", "failed_runs"] == len(diverged) and summary.loc["kd", "failed_runs"] == 0
    assert summary.loc["ce", "worst"] == pytest.approx(study.chance)  # a fully diverged setting, at chance
    dropped = study.summary("drop")
    assert dropped.loc["ce", "worst"] > study.chance and dropped.loc["ce", "failed_runs"] == len(diverged)
    assert summary.loc["kd", "settings"] == 4 and "default_val" in summary
    verdict = study.compare("kd", "ce")
    assert verdict["verdict"] in ("holds", "does not hold", "inconclusive")

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"distribution.png", "ecdf.png", "expected_best.png", "importance.png", "params_kd.png"} <= plots
    assert {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "report.md", "report.html"}
    runs_before = len(client.search_runs([exp], ""))
    digests = set()
    for run_id in frame["run_id"]:  # the run tags of `kdo run`, on every child
        child = client.get_run(run_id)
        tags = child.data.tags
        assert (tags["kdo.dataset"], tags["kdo.student"]) == ("digits", "mlp")
        assert tags["kdo.teacher"].startswith("cnn (trained, key ")
        # MLflow's view of it: the driver's source tags, the three splits as inputs, system metrics.
        assert all(tags[k] == parent.data.tags[k] for k in ("mlflow.source.name", "mlflow.source.git.commit"))
        inputs = {i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in child.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"} and {n for n, _ in inputs.values()} == {"digits"}
        digests.add(tuple(sorted(inputs.items())))
        assert "system/cpu_utilization_percentage" in child.data.metrics
    assert len(digests) == 1, "every child trained on the same splits"
    assert parent.data.tags["best_model.kd"] == "models:/kdo-student-small.kd/1"

    loaded = RobustnessStudy.load("small")
    assert loaded.results().drop(columns="seconds").equals(frame.drop(columns="seconds"))
    assert loaded.summary().round(6).equals(summary.round(6))
    assert len(client.search_runs([exp], "")) == runs_before, "loading reran nothing"

    result = CliRunner().invoke(app, ["report", "small", "--report", str(workdir / "out" / "small")])
    assert result.exit_code == 0, result.output
    assert "kd more robust than ce:" in result.output and "MLflow: mlflow ui" in result.output
    page = (workdir / "out" / "small.html").read_text()
    assert page.count("<img") >= 5 and "Verdict rule" in page and "failures left out" in page


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.usefixtures("ray_runtime")
def test_sigkilled_study_resumes_without_loss_or_repeat(workdir: Path) -> None:
    spec = _study_file(workdir, name="killed", methods={"kd": None, "ce": None}, n_settings=4, seeds=[0, 1],
                       config=_config(epochs=3), concurrency=1)
    before = _ray_pids()
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "study", spec], cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when_finished(driver, workdir / "mlflow.db", 2, before)
    total = 2 * 5 * 2
    assert 2 <= _finished_trials(workdir / "mlflow.db") < total

    result = CliRunner().invoke(app, ["resume", "killed"])
    assert result.exit_code == 0, result.output
    assert "kd more robust than ce:" in result.output

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    finished = [c for c in children if c.data.tags["kdo.status"] == "finished"]
    keys = [(c.data.tags["kdo.setting_id"], c.data.tags["kdo.seed"]) for c in finished]
    assert len(keys) == len(set(keys)) == total, "every planned (method, setting, seed) finished exactly once"
    assert {c.data.tags["kdo.status"] for c in children} <= {"finished", "superseded"}
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "distribution.png" in plots
    assert len(RobustnessStudy.load("killed").results()) == total


RUN_LINE = re.compile(r"^\[ *(\d+)/(\d+)\] (\S+) .*seed (\d+): (\w+)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_piped_study_prints_one_line_per_run_then_the_table(workdir: Path) -> None:
    """Without a terminal: the teacher's first and last line, one line per run with its ledger status, no Tune
    tables, no worker tracebacks, then the table, the verdict, the report and the MLflow command."""
    spec = _study_file(workdir, methods={"kd": None, "ce": {"space": CE_SPACE}}, n_settings=4, seeds=[0],
                      concurrency=2)
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "study", spec], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=540)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for noise in ("Trial status", "\u256d", "Traceback", "pid="):  # Tune's tables and boxes, workers' output
        assert noise not in out, out
    lines = [m.groups() for line in done.stdout.splitlines() if (m := RUN_LINE.match(line))]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.kind` = 'study'")
    children = [c for c in ledger.children(client, exp, parent.info.run_id) if ledger.status_of(c) not in HIDDEN]
    assert len(children) == 10 and len(lines) == len(children), done.stdout
    assert [int(i) for i, *_ in lines] == list(range(1, 11)) and {t for _, t, *_ in lines} == {"10"}
    printed = sorted((label, seed, status) for _, _, label, seed, status in lines)
    assert printed == sorted((c.data.tags["kdo.entry"], c.data.tags["kdo.seed"], ledger.status_of(c))
                             for c in children)
    assert ("ce", "0", "diverged") in printed, "lr 10 diverges, and its line says so"
    teacher = [line for line in done.stdout.splitlines() if line.startswith("[teacher-")]
    assert len(teacher) == 2 and teacher[0].endswith("training 3 epochs") and "epoch 3/3" in teacher[1], teacher
    tail = done.stdout[done.stdout.index("study s: val accuracy"):]
    assert "kd more robust than ce:" in tail and "report: " in tail and "MLflow: mlflow ui" in tail
    assert len(done.stdout.splitlines()) <= len(children) + 25, done.stdout

"""End to end on a real local Ray runtime and a real SQLite MLflow store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator import run
from orchestrator.cli import app
from orchestrator.experiment.config import ExperimentConfig, teacher_key
from tests.conftest import digits_config, needs_fashion_mnist

pytestmark = pytest.mark.usefixtures("ray_runtime")
KD = {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9}}


def _store(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


@pytest.mark.timeout(120)
def test_kdo_run_logs_config_metrics_tags_and_checkpoint(workdir: Path, teacher_checkpoint: Path) -> None:
    cfg = workdir / "kd.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method=KD, teacher={"checkpoint": str(teacher_checkpoint)})))
    result = CliRunner().invoke(app, ["run", str(cfg), "--set", "training.epochs=4",
                                      "--set", "tracking.log_models=true"])
    assert result.exit_code == 0, result.output
    assert "test_acc=" in result.output and "#/experiments/" in result.output

    client = _store(workdir)
    [run_info] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    assert run_info.info.status == "FINISHED"
    assert run_info.data.params["method.name"] == "kd" and run_info.data.params["training.epochs"] == "4"
    assert run_info.data.tags["kdo.method"] == "kd" and run_info.data.tags["kdo.dataset"] == "digits"
    tags = run_info.data.tags  # MLflow's own source tags; the commit is this checkout's
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] and tags["mlflow.source.name"]
    inputs = {i.tags[0].value: i.dataset for i in run_info.inputs.dataset_inputs}  # the UI's Dataset column
    assert set(inputs) == {"training", "validation", "test"} and {d.name for d in inputs.values()} == {"digits"}
    assert json.loads(inputs["test"].profile)["num_rows"] == 360 and len({d.digest for d in inputs.values()}) == 3
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):  # at least its end sample
        assert client.get_metric_history(run_info.info.run_id, key), key
    assert run_info.data.tags["kdo.version"] == "0.1.0"
    history = client.get_metric_history(run_info.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2, 3, 4]
    for key in ("train_loss", "loss/ce", "loss/kd", "lr", "epoch_seconds", "images_per_s"):
        assert len(client.get_metric_history(run_info.info.run_id, key)) == 4, key
    metrics = run_info.data.metrics
    assert metrics["teacher_test_acc"] > 0.9 and metrics["test_acc"] > 0.3
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert {"config.yaml", "student"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_info.info.run_id, "student")] == ["student/student.pt"]
    # tracking.log_models: the student is a model version too, whose files are that checkpoint.
    version = client.get_model_version("kdo-student-test", "1")
    assert version.source == f"runs:/{run_info.info.run_id}/student" and version.run_id == run_info.info.run_id


@pytest.mark.timeout(180)
def test_described_teacher_is_trained_once_and_runs_reproduce(workdir: Path) -> None:
    cfg = digits_config(method=KD, teacher={"architecture": "cnn", "args": {"width": 8},
                                            "training": {"epochs": 3, "lr": 0.05}})
    first = run(cfg)
    second = run(cfg)
    client = _store(workdir)
    experiment = client.get_experiment_by_name("kdo").experiment_id
    teachers = client.search_runs([experiment], "tags.`kdo.kind` = 'teacher'")
    assert len(teachers) == 1, "the second run reused the cached teacher"
    assert len(list((workdir / ".kdo" / "teachers").glob("*.pt"))) == 1
    assert first.teacher_test_acc == second.teacher_test_acc and first.teacher_test_acc > 0.5
    # Same config, same seed: the same numbers, epoch by epoch.
    assert list(first.history["train_loss"]) == list(second.history["train_loss"])
    assert first.test_acc == second.test_acc

    # The teacher's MLflow run serves as a teacher by URI too.
    uri = f"runs:/{teachers[0].info.run_id}/teacher"
    third = run(digits_config(method=KD, teacher={"checkpoint": uri}), ["training.epochs=1"])
    assert third.status == "finished" and third.teacher_test_acc == first.teacher_test_acc
    # ... and as the version of a registered model named after its cache key, holding kdo's own checkpoint.
    model = teachers[0].data.tags["kdo.model"]
    assert model == f"models:/kdo-teacher-{teacher_key(ExperimentConfig.model_validate(cfg))}/1"
    fourth = run(digits_config(method=KD, teacher={"checkpoint": model}), ["training.epochs=1"])
    assert fourth.status == "finished" and fourth.teacher_test_acc == first.teacher_test_acc


@pytest.mark.timeout(120)
def test_kdo_teacher_train_prints_a_usable_checkpoint(workdir: Path) -> None:
    cfg = workdir / "t.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method=KD, teacher={
        "architecture": "mlp", "args": {"hidden": [64]}, "training": {"epochs": 2}})))
    result = CliRunner().invoke(app, ["teacher", "train", str(cfg)])
    assert result.exit_code == 0, result.output
    path = result.output.split("checkpoint: ")[1].split()[0]
    assert Path(path).is_file() and path.startswith(str(workdir))
    again = CliRunner().invoke(app, ["run", str(cfg), "--set", f"teacher={{checkpoint: {path}}}",
                                     "--set", "training.epochs=1"])
    assert again.exit_code == 0, again.output


@pytest.mark.timeout(180)
def test_no_validation_split_teacher_and_student_log_no_val_acc(workdir: Path) -> None:
    cfg = workdir / "noval.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method=KD, teacher={
        "architecture": "mlp", "args": {"hidden": [64]}, "training": {"epochs": 2, "selection": "last"},
        "data": {"augment": False}})))
    noval = ["--set", "data.val_fraction=0", "--set", "training.selection=last"]
    trained = CliRunner().invoke(app, ["teacher", "train", str(cfg), *noval])
    assert trained.exit_code == 0, trained.output
    assert "teacher mlp: no validation split test_acc=" in trained.output
    result = CliRunner().invoke(app, ["run", str(cfg), *noval])
    assert result.exit_code == 0, result.output
    assert "status=finished no validation split test_acc=" in result.output and "(epoch 3)" in result.output

    client = _store(workdir)
    experiment = client.get_experiment_by_name("kdo").experiment_id
    [teacher_run] = client.search_runs([experiment], "tags.`kdo.kind` = 'teacher'")
    [student_run] = client.search_runs([experiment], "tags.`kdo.kind` = 'student'")
    for run_info in (teacher_run, student_run):
        assert run_info.info.status == "FINISHED" and run_info.data.params["data.val_fraction"] == "0.0"
        assert [k for k in run_info.data.metrics if "val_acc" in k] == [], "never logged, not logged as 0"
        assert len(client.get_metric_history(run_info.info.run_id, "test_acc")) == 1
    assert "teacher_test_acc" in student_run.data.metrics
    # teacher.data: the teacher trained without augmentation, the student with it.
    assert (teacher_run.data.params["data.augment"], student_run.data.params["data.augment"]) == ("False", "True")
    assert student_run.data.params["teacher.data.augment"] == "False"
    assert len(client.get_metric_history(student_run.info.run_id, "train_loss")) == 3


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kdo_run_fashion_mnist_kd_trains_teacher_and_student_on_the_real_files(workdir: Path) -> None:
    # The config's teacher trains 10 epochs (for the reproduction table); 2 and 3 student epochs prove the real files.
    result = CliRunner().invoke(app, ["run", "fashion_mnist_kd", "--set", "teacher.training.epochs=2",
                                      "--set", "training.epochs=3"])
    assert result.exit_code == 0, result.output
    client = _store(workdir)
    experiment = client.get_experiment_by_name("kdo").experiment_id
    [student_run] = client.search_runs([experiment], "tags.`kdo.kind` = 'student'")
    assert student_run.data.tags["kdo.dataset"] == "fashion_mnist"
    assert student_run.data.params["data.image_size"] == "32"
    metrics = student_run.data.metrics
    assert metrics["teacher_test_acc"] > 0.85 and metrics["test_acc"] > 0.8  # chance is 0.1; measured 0.881 / 0.860


@pytest.mark.parametrize(("override", "needle"), [
    ("scaling.use_gpu=true", "scaling.use_gpu: true, but the Ray cluster has no GPU (use auto or false)"),
    ("scaling.cpus_per_worker=3", "scaling.cpus_per_worker: 3, but no node has more than 2 CPUs"),
    ("scaling.num_workers=3", "scaling.num_workers: 3 workers x 1 CPUs, but the cluster has 2"),
])
def test_a_request_the_cluster_can_never_grant_is_one_line_before_anything_runs(workdir: Path, override: str,
                                                                               needle: str) -> None:
    """Ray would hold it pending for ever; the session runtime has 2 CPUs and no GPU."""
    result = CliRunner().invoke(app, ["run", "digits_kd", "--set", override])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {needle}", result.output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "kdo_runs").exists()

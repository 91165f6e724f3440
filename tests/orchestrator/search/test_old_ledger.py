"""A ledger written before the one-lifecycle change resumes: the parent and children are written here by hand with
`MlflowClient`, exactly as kdo wrote them then (the tags, `kdo.options`, `kdo.parameters`, `kdo.setting`, `kdo.sweep`
on a study's children, the older `error` and `orphaned` words), in this test's own store (a SQLite file made
elsewhere keeps absolute paths). `kdo resume` keeps the finished child, redoes the crashed one in a new child and
leaves the orphan hidden."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from methods.networks import build_network
from orchestrator.cli import app
from orchestrator.experiment.checkpoints import save_network
from tests.conftest import digits_config

KD_SPACE = {"method": "kd", "parameters": {"temperature": {"type": "choice", "values": [2.0, 8.0], "low": None,
                                                           "high": None, "log": False, "grid_points": 3}},
            "fixed": {}}


def _setting_id(setting: dict[str, Any]) -> str:
    """The setting id kdo wrote then (a child's `kdo.setting_id`)."""
    return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _config(workdir: Path, teacher: Path) -> dict[str, Any]:
    cfg = digits_config(method={"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9}},
                        teacher={"checkpoint": str(teacher)}, student={"architecture": "mlp", "args": {}},
                        training={"epochs": 2, "lr": 0.05, "seed": 0})
    cfg["tracking"] = {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "storage_path": str(workdir / "kdo_runs")}
    return cfg


def _child(client: MlflowClient, exp: str, parent: str, ledger_name: str, cfg: dict[str, Any],
           setting: dict[str, Any], seed: int, sid: str, status: str, extra: dict[str, str], workdir: Path) -> str:
    """One child as the trials wrote it: the run tags, the ledger's tags, the config as params, and how it ended."""
    name = f"{ledger_name}-{sid[:6]}-s{seed}"
    run_cfg = {**cfg, "name": name, "training": {**cfg["training"], "seed": seed}}
    run = client.create_run(exp, run_name=name, tags={
        "mlflow.parentRunId": parent, "kdo.method": "kd", "kdo.dataset": "digits", "kdo.student": "mlp",
        "kdo.teacher": cfg["teacher"]["checkpoint"], "kdo.seed": str(seed), "kdo.version": "0.9.0",
        "kdo.data_free": "false", "kdo.kind": "trial", "kdo.sweep": ledger_name, "kdo.setting_id": sid,
        "kdo.setting": json.dumps(setting, sort_keys=True), "kdo.trial_id": f"t{seed}", "kdo.host": "gone",
        "kdo.pid": "1", **extra})
    run_id = run.info.run_id
    for key, value in _flat(run_cfg).items():
        client.log_param(run_id, key, value)
    if status == "finished":
        for epoch, (loss, val) in enumerate(((1.2, 0.6), (0.7, 0.8)), start=1):
            client.log_metric(run_id, "train_loss", loss, step=epoch)
            client.log_metric(run_id, "val_acc", val, step=epoch)
        for key, value in {"test_acc": 0.75, "selected_val_acc": 0.8, "best_epoch": 2.0}.items():
            client.log_metric(run_id, key, value, step=2)
        student = workdir / "student.pt"
        save_network(student, build_network("mlp", num_classes=10, in_channels=1, image_size=8), architecture="mlp",
                     args={}, num_classes=10, in_channels=1, image_size=8, val_acc=0.8, epoch=2, test_acc=0.75)
        client.log_artifact(run_id, str(student), "student")
        client.set_tag(run_id, "kdo.early_stopped", "false")
    else:
        client.log_metric(run_id, "train_loss", 1.3, step=1)
        client.set_tag(run_id, "kdo.reason", "RuntimeError: worker died")
    client.set_tag(run_id, "kdo.status", status)
    client.set_terminated(run_id, "FINISHED" if status == "finished" else "FAILED")
    return run_id


def _old_ledger(kind: str, workdir: Path, teacher: Path) -> tuple[str, str]:
    """A sweep (grid over two temperatures, seed 0) or a study (kd at its defaults, seeds 0 and 1) whose driver
    ended FAILED: one child finished, one crashed (`error`), and one `orphaned`. Returns (finished, crashed)."""
    cfg = _config(workdir, teacher)
    client = MlflowClient(cfg["tracking"]["uri"])
    exp = client.create_experiment("kdo", artifact_location=(workdir / "mlruns").as_uri())
    if kind == "sweep":
        tags = {"kdo.kind": "sweep", "kdo.sweep": "old", "kdo.method": "kd", "kdo.space": "space",
                "kdo.sampler": "grid", "kdo.scheduler": "none", "kdo.seeds": "0",
                "kdo.parameters": json.dumps(["method.params.temperature"]),
                "kdo.options": json.dumps({"sampler": "grid", "scheduler": "none", "trials": 8, "concurrency": 2,
                                           "metric": "val_acc", "seeds": [0], "max_failures": 0, "design_seed": 0,
                                           "checkpoint_seconds": 30.0, "group_size": 0})}
        points = [({"method.params.temperature": t}, 0) for t in (2.0, 8.0)]
        sids = [_setting_id(setting) for setting, _ in points]
        extra: list[dict[str, str]] = [{}, {}]
    else:
        tags = {"kdo.kind": "study", "kdo.study": "old", "kdo.methods": "kd", "kdo.design": "sobol", "kdo.seeds": "0,1"}
        points = [({}, 0), ({}, 1)]
        sids = [_setting_id({"method": "kd", "role": "defaults"})] * 2
        extra = [{"kdo.role": "defaults", "kdo.study": "old", "kdo.entry": "kd"}] * 2
    parent = client.create_run(exp, run_name="old", tags={
        **tags, "kdo.version": "0.9.0", "kdo.driver_host": "gone", "kdo.driver_pid": "1", "kdo.driver_lock": "",
        "kdo.heartbeat": "0", "kdo.interrupted": "false"}).info.run_id
    client.log_text(parent, yaml.safe_dump(cfg, sort_keys=False), "config.yaml")
    if kind == "sweep":
        for key, value in _flat(cfg).items():
            client.log_param(parent, key, value)
        client.log_text(parent, json.dumps({**KD_SPACE, "source": "space"}, indent=2), "space.json")
    else:
        spec = {"name": "old", "config": cfg, "methods": {"kd": {"method": None, "config": None, "params": {},
                                                                 "space": KD_SPACE}},
                "design": "sobol", "n_settings": 0, "seeds": [0, 1], "include_defaults": True, "references": [],
                "metric": "val_acc", "delta": 1.0, "compare": [], "concurrency": 2, "max_failures": 0,
                "checkpoint_seconds": 30.0, "group_size": 0, "design_seed": 0, "set": [],
                "tracking": {"uri": cfg["tracking"]["uri"], "experiment": "kdo"}}
        client.log_text(parent, json.dumps(spec, indent=2), "study.json")
    done = _child(client, exp, parent, "old", cfg, *points[0], sids[0], "finished", extra[0], workdir)
    crashed = _child(client, exp, parent, "old", cfg, *points[1], sids[1], "error", extra[1], workdir)
    orphan = client.create_run(exp, run_name="orphan", tags={
        "mlflow.parentRunId": parent, "kdo.setting_id": "gone", "kdo.seed": "0", "kdo.status": "orphaned",
        "kdo.kind": "trial", "kdo.sweep": "old"})
    client.set_terminated(orphan.info.run_id, "KILLED")
    client.set_tag(parent, "kdo.status", "failed")
    client.set_terminated(parent, "FAILED")
    return done, crashed


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.parametrize("kind", ["sweep", "study"])
def test_a_ledger_written_before_resumes(workdir: Path, teacher_checkpoint: Path, kind: str) -> None:
    done, crashed = _old_ledger(kind, workdir, teacher_checkpoint)
    report = CliRunner().invoke(app, ["report", "old"])
    assert report.exit_code == 0, report.output
    result = CliRunner().invoke(app, ["resume", "old"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], f"tags.`kdo.kind` = '{kind}'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    statuses = {c.info.run_id: c.data.tags["kdo.status"] for c in children}
    assert parent.info.status == "FINISHED" and parent.data.tags["kdo.status"] == "finished"
    assert statuses[done] == "finished", "the finished child was kept"
    assert statuses[crashed] == "superseded", "the crash was redone in a new child"
    redone = [c for c in children if c.info.run_id not in (done, crashed) and c.data.tags["kdo.setting_id"] != "gone"]
    assert [c.data.tags["kdo.status"] for c in redone] == ["finished"]
    assert len(client.get_metric_history(redone[0].info.run_id, "val_acc")) == 2
    shown = CliRunner().invoke(app, ["report", "old"])
    assert shown.exit_code == 0 and "gone" not in shown.output, shown.output

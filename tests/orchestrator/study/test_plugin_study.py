"""The README's "Bring your own method", as a user runs it: a folder holding only their files (the DIST plugin, its
space, a study), every command in a subprocess of its own (the method registry is process-global)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[3]
KDO = str(Path(sys.executable).parent / "kdo")
SHORT = ["--set", "training.epochs=2", "--set", "teacher.training.epochs=2"]


def _kdo(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KDO, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_plugin_method_through_run_a_grouped_sweep_a_study_and_a_report_without_it(workdir: Path) -> None:
    for name in ("dist_kd.py", "dist.yaml", "study.yaml"):
        shutil.copy(ROOT / "examples" / "dist" / name, workdir / name)
    study = yaml.safe_load((workdir / "study.yaml").read_text())
    study.update(n_settings=2, seeds=[0], set=["training.epochs=2", "teacher.training.epochs=2"])
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))

    run = _kdo(["run", "digits_kd", "--plugin", "dist_kd.py", "--set", "method.name=dist", "--set",
                "method.params={}", *SHORT], workdir)
    assert run.returncode == 0 and "status=finished" in run.stdout, run.stdout + run.stderr
    ddp = _kdo(["run", "digits_kd", "--plugin", "dist_kd.py", "--set", "method.name=dist", "--set", "method.params={}",
                "--set", "scaling.num_workers=2", *SHORT], workdir)  # Ray Train's two DDP workers import it too
    assert ddp.returncode == 0 and "status=finished" in ddp.stdout, ddp.stdout + ddp.stderr

    sweep = _kdo(["sweep", "digits_kd", "--space", "dist.yaml", "--sampler", "sobol", "--trials", "2", "--seeds", "0,1",
                  "--name", "dist-sweep", "--set", "method.name=dist", "--set", "method.params={}", *SHORT], workdir)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kdo").experiment_id
    [parent] = client.search_runs([exp], "tags.`kdo.sweep` = 'dist-sweep' and tags.`kdo.kind` = 'sweep'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["kdo.status"] for c in children) == ["finished"] * 4
    assert {c.data.params["method.name"] for c in children} == {"dist"}
    trials = [c.data.tags["kdo.trial_id"] for c in children]
    assert len(set(trials)) == 2, trials  # grouped: each seed's two settings trained in one trial

    done = _kdo(["study", "study.yaml"], workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "│ dist " in done.stdout and "dist more robust than kd:" in done.stdout, done.stdout[-3000:]
    assert "dist more robust than dkd:" in done.stdout

    (workdir / "dist_kd.py").rename(workdir / "moved.py")  # the plugin is gone: the ledger still answers
    report = _kdo(["report", "dist-vs-kd"], workdir)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    warnings = [line for line in report.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: plugins: plugin {workdir / 'dist_kd.py'}: no such file or folder (relative paths "
                        f"are tried beside the file that names them, then in {workdir}) (recorded by study "
                        "dist-vs-kd); its results are read from the ledger alone"], report.stderr
    assert "│ dist " in report.stdout and "dist more robust than kd:" in report.stdout
    resumed = _kdo(["resume", "dist-vs-kd"], workdir)  # finished: nothing to do, and no plugin needed to say so
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "study 'dist-vs-kd' finished: nothing to resume" in resumed.stderr and "Ray" not in resumed.stderr


_NOTEBOOK = """
import ray
from orchestrator import run

ray.init(num_cpus=1, log_to_driver=False)  # Ray started before kdo hears of the plugin, as in a notebook
result = run("digits_kd", ["method.name=dist", "method.params={}", "training.epochs=1", "teacher.training.epochs=1"],
             plugins=["dist_kd.py"])
print(result.status)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_plugin_reaches_the_workers_of_a_ray_started_before_it_was_named(workdir: Path) -> None:
    """One machine: every worker imports the plugin from its path (no job-level py_modules to ship it)."""
    shutil.copy(ROOT / "examples" / "dist" / "dist_kd.py", workdir / "dist_kd.py")
    done = subprocess.run([sys.executable, "-c", _NOTEBOOK], cwd=workdir, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "finished"

"""The GPU check runs here on the CPU at a small size, with what the GPU machine lacks made unimportable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABSENT = ("ray", "mlflow", "optuna", "sklearn", "scipy", "pandas", "matplotlib")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_gpu_check_runs_on_the_cpu_without_ray_mlflow_optuna_or_scikit_learn(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("ratio kdo/anchor:") == 1 and out.count("grouped / one at a time:") == 2, out
    assert "train_loss difference 0.00e+00" in out, out  # grouped members equal their solo runs
    assert "projected hours: one 240-epoch KD run " in out and "study cifar100_logit_baselines (25 runs" in out, out
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--size", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument '--size'" in bad.stderr

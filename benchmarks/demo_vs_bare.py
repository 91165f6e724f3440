"""The demo's job against its training: `kdo demo` (a fresh process: imports, Ray, Tune, MLflow, the report; the
teacher already cached) vs the same 38 runs trained one at a time by the bare in-process loop (`train_loop`, no
Ray, no MLflow), in one run of this script. The teacher is trained once first (timed apart), and both sides use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import ray

from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop
from orchestrator.experiment.runner import check, provision
from orchestrator.study.robustness import RobustnessStudy


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="kdo-demo-vs-bare-")
    os.chdir(workdir)  # mlflow.db, the teacher cache (.kdo/) and the report land here
    study = RobustnessStudy.from_yaml("demo")
    configs = [ExperimentConfig.model_validate(p.config) for p in study.points]
    start = time.perf_counter()
    prepared = provision(check(configs[0]))  # trains the teacher into .kdo/, which `kdo demo` then finds
    teacher_s = time.perf_counter() - start
    ray.shutdown()  # `kdo demo` starts its own local runtime, as it does for a user
    splits = load_splits(configs[0].data)

    start = time.perf_counter()
    for cfg in configs:
        train_loop(cfg, splits, prepared.teacher if cfg.teacher is not None else None, log=None)
    bare_s = time.perf_counter() - start

    kdo = [os.path.join(os.path.dirname(sys.executable), "kdo"), "demo"]
    start = time.perf_counter()
    done = subprocess.run(kdo, capture_output=True, text=True, env={**os.environ, "CI": "1"})
    job_s = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"kdo demo failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    print(f"demo study: {len(configs)} runs, {configs[0].training.epochs} epochs each; working dir {workdir}")
    print(f"teacher, trained once first: {teacher_s:.1f} s")
    print(f"bare train_loop, one run at a time, in process: {bare_s:.1f} s")
    print(f"kdo demo, a fresh process, teacher cached:     {job_s:.1f} s")
    print(f"kdo demo / bare: {job_s / bare_s:.2f}x")


if __name__ == "__main__":
    main()

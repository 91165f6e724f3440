"""Fixed cost of kdo's machinery: the same digits KD work as a bare in-process `train_loop`, through `run`
(Ray task + MLflow), through `run` with Ray Train's TorchTrainer (1 worker) and as a one-trial `sweep`
(Tune trial + MLflow parent/child); `ray.init` is timed apart."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.launch import init_ray
from orchestrator.experiment.loop import train_loop
from orchestrator.experiment.runner import check, provision, run
from orchestrator.search.sweep import sweep


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (digits_kd ships 20)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per path; the median is shown")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every path trains")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="kdo-overhead-")
    os.chdir(workdir)  # mlflow.db, kdo_runs/ and the teacher cache land here, not in the repo
    overrides = [f"training.epochs={args.epochs}", f"scaling.use_gpu={args.device == 'cuda'}",
                 f"tracking.uri=sqlite:///{workdir}/mlflow.db"]

    start = time.perf_counter()
    init_ray()
    ray_init = time.perf_counter() - start
    prepared = provision(check("digits_kd", overrides))  # trains and caches the teacher: not timed
    cfg = prepared.config
    via_ray_train = load_config(cfg, ["scaling.trainer=ray_train"])
    one_point = {"parameters": {"temperature": {"type": "choice", "values": [cfg.method.params["temperature"]]}}}

    def bare() -> None:
        # The Ray worker pins torch to cpus_per_worker threads; the bare loop gets the same.
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        train_loop(cfg, load_splits(cfg.data), prepared.teacher, device=torch.device(args.device), log=None)

    bare()  # untimed: the Ray worker that `run` reuses is already warm from training the teacher
    rows = [("bare train_loop", timed(bare, args.repeats)),
            ("run (Ray task + MLflow)", timed(lambda: run(cfg), args.repeats)),
            ("run, scaling.trainer=ray_train", timed(lambda: run(via_ray_train), args.repeats)),
            ("sweep, 1 trial (Tune + MLflow)", timed(lambda: sweep(cfg, one_point, sampler="grid"), args.repeats))]

    print(f"\ndigits_kd, {args.epochs} epochs on {args.device}, median of {args.repeats}; working dir {workdir}")
    print(f"ray.init (once, not in any row): {ray_init:.2f} s")
    print(f"{'path':<32} {'seconds':>9} {'vs bare':>8}")
    for path, seconds in rows:
        print(f"{path:<32} {seconds:>9.2f} {seconds / rows[0][1]:>7.2f}x")


if __name__ == "__main__":
    main()

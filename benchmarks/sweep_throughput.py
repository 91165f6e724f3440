"""Sweep throughput (trials/hour): the same fixed grid of small digits KD trials run one at a time by `sweep()`
vs packed several at once on fractional CPUs (or fractional GPUs with --device cuda)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Any

import ray

from orchestrator.experiment.config import ExperimentConfig
from orchestrator.experiment.launch import init_ray
from orchestrator.experiment.runner import check, provision
from orchestrator.search.sweep import SweepResult, sweep


def grid_space(trials: int) -> dict[str, Any]:
    """A one-axis grid: `trials` KD temperatures 1, 2, ..., so every setting is one trial."""
    return {"parameters": {"temperature": {"type": "choice", "values": [float(t) for t in range(1, trials + 1)]}}}


def timed_sweep(cfg: ExperimentConfig, space: dict[str, Any], name: str, concurrency: int,
                overrides: list[str]) -> tuple[SweepResult, float]:
    """One whole `sweep()` call on a grid (every point run in full) and its wall-clock seconds."""
    start = time.perf_counter()
    result = sweep(cfg, space, sampler="grid", concurrency=concurrency, name=name, overrides=overrides)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8, help="grid size: settings (one trial each)")
    parser.add_argument("--epochs", type=int, default=5, help="student epochs per trial")
    parser.add_argument("--packed-concurrency", type=int, default=8, help="trials the packed sweep runs at once")
    parser.add_argument("--cpus-per-trial-packed", type=float, default=0.25, help="scaling.cpus_per_worker, packed")
    parser.add_argument("--gpus-per-trial-packed", type=float, default=0.25,
                        help="scaling.gpus_per_worker, packed (--device cuda only)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the trials train")
    args = parser.parse_args()
    if not 1 <= args.trials <= 100:
        parser.error("--trials: 1 to 100 (each setting is a KD temperature 1, 2, ..., trials)")

    workdir = tempfile.mkdtemp(prefix="kdo-sweep-throughput-")
    os.chdir(workdir)  # mlflow.db, kdo_runs/ and the teacher cache land here, not in the repo
    cuda = args.device == "cuda"
    init_ray()
    cpus = ray.cluster_resources().get("CPU", 1.0)
    base = [f"training.epochs={args.epochs}", f"scaling.use_gpu={cuda}", f"tracking.uri=sqlite:///{workdir}/mlflow.db"]
    cfg = provision(check("digits_kd", base)).config  # trains and caches the teacher: not timed
    space = grid_space(args.trials)

    serial = [f"scaling.cpus_per_worker={cpus}", "scaling.gpus_per_worker=1"]
    packed = [f"scaling.cpus_per_worker={args.cpus_per_trial_packed}",
              f"scaling.gpus_per_worker={args.gpus_per_trial_packed}"]  # GPUs ignored unless use_gpu
    fits = math.floor(cpus / args.cpus_per_trial_packed)
    if cuda:
        fits = min(fits, math.floor(ray.cluster_resources().get("GPU", 0) / args.gpus_per_trial_packed))
    at_once = min(args.packed_concurrency, args.trials, fits)
    # Packed runs first, so one-off driver warm-up (imports, first Tune run) counts against packing.
    runs = [(f"packed x{args.packed_concurrency}", *timed_sweep(cfg, space, "throughput-packed",
                                                                args.packed_concurrency, packed)),
            ("serial", *timed_sweep(cfg, space, "throughput-serial", 1, serial))]

    print(f"\ndigits_kd grid of {args.trials} KD temperatures, {args.epochs} epochs each, on {args.device}; "
          f"{cpus:g} CPUs; working dir {workdir}")
    print(f"serial: 1 at a time, {cpus:g} CPUs{', 1 GPU' if cuda else ''} per trial")
    print(f"packed: up to {at_once} at a time, {args.cpus_per_trial_packed:g} CPUs"
          f"{f', {args.gpus_per_trial_packed:g} GPUs' if cuda else ''} per trial")
    print(f"{'sweep':<12} {'trials':>6} {'finished':>8} {'seconds':>9} {'trials/h':>9}  statuses")
    rates = {}
    for label, result, seconds in runs:
        statuses = result.dataframe()["status"]
        rates[label] = len(statuses) / seconds * 3600
        counts = ", ".join(f"{k} {v}" for k, v in statuses.value_counts().items())
        print(f"{label:<12} {len(statuses):>6} {int((statuses == 'finished').sum()):>8} {seconds:>9.1f} "
              f"{rates[label]:>9.0f}  {counts}")
    packed_rate, serial_rate = rates.values()
    print(f"packed / serial trials/h: {packed_rate / serial_rate:.2f}x")


if __name__ == "__main__":
    main()

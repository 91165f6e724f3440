"""Sweep throughput (trials/hour): one fixed grid of KD settings (one seed) run by `sweep()` three ways, in one run:
one trial at a time on every CPU (`serial`), several trials packed at once on fractional CPUs (`packed`, or
fractional GPUs with --device cuda), and every setting in one grouped trial on shared batches and teacher passes
(`grouped`, `--group-size`). Ratios are against `serial` in the same run.

`--data digits`: digits_kd (cnn 32 -> cnn 4). `--data cifar`: resnet32x4 -> resnet8x4 on CIFAR-shaped synthetic
data (32x32x3; 10 classes, so a small set still stratifies), where the teacher's forward pass is two thirds of a
KD step's work."""

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
    """A one-axis grid: `trials` KD temperatures 1, 2, ..., so every setting is one run."""
    return {"parameters": {"temperature": {"type": "choice", "values": [float(t) for t in range(1, trials + 1)]}}}


def base_config(data: str, size: int, epochs: int) -> str | dict[str, Any]:
    if data == "digits":
        return "digits_kd"
    synthetic = {"num_train": size, "num_test": 256, "channels": 3, "image_size": 32, "num_classes": 10}
    return {"name": "cifar_synthetic",
            "data": {"name": "synthetic", "synthetic": synthetic, "val_fraction": 0.1, "batch_size": 64},
            "student": {"architecture": "resnet8x4"},
            "teacher": {"architecture": "resnet32x4", "training": {"epochs": 1, "lr": 0.05}},
            "method": {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1}},
            "training": {"epochs": epochs, "lr": 0.05}}


def timed_sweep(cfg: ExperimentConfig, space: dict[str, Any], name: str, concurrency: int, group_size: int,
                overrides: list[str]) -> tuple[SweepResult, float]:
    """One whole `sweep()` call on a grid (every point run in full) and its wall-clock seconds."""
    start = time.perf_counter()
    result = sweep(cfg, space, sampler="grid", concurrency=concurrency, name=name, overrides=overrides,
                   group_size=group_size)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", choices=("digits", "cifar"), default="digits", help="digits_kd, or resnet32x4 -> "
                        "resnet8x4 on synthetic CIFAR-shaped data")
    parser.add_argument("--size", type=int, default=512, help="synthetic training images (--data cifar)")
    parser.add_argument("--trials", type=int, default=8, help="grid size: settings (KD temperatures 1..trials)")
    parser.add_argument("--epochs", type=int, default=5, help="student epochs per run")
    parser.add_argument("--packed-concurrency", type=int, default=8, help="trials the packed sweep runs at once")
    parser.add_argument("--cpus-per-trial-packed", type=float, default=0.25, help="scaling.cpus_per_worker, packed")
    parser.add_argument("--gpus-per-trial-packed", type=float, default=0.25,
                        help="scaling.gpus_per_worker, packed (--device cuda only)")
    parser.add_argument("--group-size", type=int, default=0, help="runs per grouped trial (0: all the settings)")
    parser.add_argument("--modes", default="packed,serial,grouped", help="comma-separated: packed, serial, grouped")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the trials train")
    args = parser.parse_args()
    if not 1 <= args.trials <= 64:
        parser.error("--trials: 1 to 64 (each setting is a KD temperature 1, 2, ..., trials)")
    modes = args.modes.split(",")
    if not modes or set(modes) - {"packed", "serial", "grouped"}:
        parser.error("--modes: a comma-separated subset of packed, serial, grouped")

    workdir = tempfile.mkdtemp(prefix="kdo-sweep-throughput-")
    os.chdir(workdir)  # mlflow.db, kdo_runs/ and the teacher cache land here, not in the repo
    cuda = args.device == "cuda"
    init_ray()
    cpus = ray.cluster_resources().get("CPU", 1.0)
    base = [f"training.epochs={args.epochs}", f"scaling.use_gpu={cuda}", f"tracking.uri=sqlite:///{workdir}/mlflow.db"]
    cfg = provision(check(base_config(args.data, args.size, args.epochs), base)).config  # the teacher: not timed
    space = grid_space(args.trials)

    whole = [f"scaling.cpus_per_worker={cpus}", "scaling.gpus_per_worker=1"]
    packed = [f"scaling.cpus_per_worker={args.cpus_per_trial_packed}",
              f"scaling.gpus_per_worker={args.gpus_per_trial_packed}"]  # GPUs ignored unless use_gpu
    fits = math.floor(cpus / args.cpus_per_trial_packed)
    if cuda:
        fits = min(fits, math.floor(ray.cluster_resources().get("GPU", 0) / args.gpus_per_trial_packed))
    at_once = min(args.packed_concurrency, args.trials, fits)
    plans = {"packed": (f"packed x{at_once}", args.packed_concurrency, 1, packed),
             "serial": ("serial", 1, 1, whole),
             "grouped": (f"grouped x{args.group_size or args.trials}", 1, args.group_size or args.trials, whole)}
    # In the order given (packed first by default, so one-off driver warm-up counts against packing).
    runs = [(plans[m][0], *timed_sweep(cfg, space, f"throughput-{m}", *plans[m][1:])) for m in modes]

    print(f"\n{cfg.name}: a grid of {args.trials} KD temperatures, {args.epochs} epochs each, on {args.device}; "
          f"{cpus:g} CPUs; working dir {workdir}")
    print(f"serial: 1 trial at a time, {cpus:g} CPUs{', 1 GPU' if cuda else ''} per trial; packed: up to {at_once} "
          f"at a time, {args.cpus_per_trial_packed:g} CPUs{f', {args.gpus_per_trial_packed:g} GPUs' if cuda else ''} "
          f"each; grouped: {args.group_size or args.trials} runs per trial, 1 trial at a time on {cpus:g} CPUs")
    print(f"{'sweep':<12} {'runs':>5} {'finished':>8} {'seconds':>9} {'runs/h':>8}  statuses")
    rates = {}
    for label, result, seconds in runs:
        statuses = result.dataframe()["status"]
        rates[label] = len(statuses) / seconds * 3600
        counts = ", ".join(f"{k} {v}" for k, v in statuses.value_counts().items())
        print(f"{label:<12} {len(statuses):>5} {int((statuses == 'finished').sum()):>8} {seconds:>9.1f} "
              f"{rates[label]:>8.0f}  {counts}")
    if "serial" in rates:
        for label, rate in rates.items():
            if label != "serial":
                print(f"{label} / serial runs/h: {rate / rates['serial']:.2f}x")


if __name__ == "__main__":
    main()

"""The bare loop, grouped vs one at a time: N KD students (resnet8x4, temperatures 1..N) of one resnet32x4 teacher on
CIFAR-shaped synthetic data, trained by `iterate_epochs` one after another, then by `iterate_group` together (each
batch drawn once, one teacher forward per batch). Prints student images/s both ways, their ratio, the largest
difference between a member's and its solo run's last train loss, and the share of the device's peak that the
counted FLOPs reach. Needs torch and pydantic only (no Ray, MLflow, Optuna, scikit-learn): it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from methods.networks import build_network
from orchestrator.experiment.checkpoints import build_from_checkpoint, load_checkpoint, save_network
from orchestrator.experiment.config import ExperimentConfig, load_config
from orchestrator.experiment.data import Splits, load_splits
from orchestrator.experiment.factories import build_student
from orchestrator.experiment.group import Member, iterate_group
from orchestrator.experiment.loop import iterate_epochs

TEACHER, STUDENT = "resnet32x4", "resnet8x4"


def configs(args: argparse.Namespace) -> list[ExperimentConfig]:
    synthetic = {"num_train": args.size, "num_test": args.test_size, "channels": 3, "image_size": 32,
                 "num_classes": 100}
    raw = {"name": "grouped-loop",
           "data": {"name": "synthetic", "synthetic": synthetic, "val_fraction": 0.0, "batch_size": args.batch_size},
           "student": {"architecture": STUDENT},
           "teacher": {"architecture": TEACHER, "training": {"selection": "last"}},
           "method": {"name": "kd", "params": {"kd_weight": 0.9, "ce_weight": 0.1}},
           "training": {"epochs": args.epochs, "selection": "last",
                        "precision": "bf16" if args.bf16 else "fp32", "channels_last": args.channels_last}}
    return [load_config(raw, [f"method.params.temperature={t}"]) for t in range(1, args.students + 1)]


def step_flops(cfg: ExperimentConfig, splits: Splits, teacher: torch.nn.Module,
               device: torch.device) -> tuple[float, float]:
    """FLOPs per image of the teacher's forward and of the student's forward + backward (torch's counter)."""
    student = build_student(cfg, splits).to(device)
    info = splits.info
    x = torch.randn(8, info.channels, info.image_size, info.image_size, device=device)
    with FlopCounterMode(display=False) as counted, torch.no_grad():
        teacher(x)
    teacher_flops = counted.get_total_flops() / len(x)
    with FlopCounterMode(display=False) as counted:
        student(x).sum().backward()
    return teacher_flops, counted.get_total_flops() / len(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--students", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="synthetic training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=256, help="synthetic num_test (evaluation only)")
    parser.add_argument("--epochs", type=int, default=1)
    on = argparse.BooleanOptionalAction
    parser.add_argument("--bf16", action=on, default=False, help="training.precision=bf16")
    parser.add_argument("--channels-last", action=on, default=False, help="training.channels_last")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak (H200 dense bf16: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfgs = configs(args)
    splits = load_splits(cfgs[0].data)
    info = splits.info
    net = build_network(TEACHER, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
    with tempfile.TemporaryDirectory() as tmp:  # random init: throughput needs no trained teacher
        ckpt = load_checkpoint(save_network(Path(tmp) / "t.pt", net, architecture=TEACHER, args={},
                                            num_classes=info.num_classes, in_channels=info.channels,
                                            image_size=info.image_size))
    teacher_flops, student_flops = step_flops(cfgs[0], splits, build_from_checkpoint(ckpt).to(device).eval(), device)

    sync(device)
    start = time.perf_counter()
    solo = [list(iterate_epochs(cfg, splits, ckpt, device=device, log=None))[-1] for cfg in cfgs]
    sync(device)
    solo_s = time.perf_counter() - start
    start = time.perf_counter()
    grouped = list(iterate_group([Member(cfg) for cfg in cfgs], splits, ckpt, device=device))[-1]
    sync(device)
    grouped_s = time.perf_counter() - start

    images = len(cfgs) * args.epochs * len(splits.train_y)
    drift = max(abs(g["train_loss"] - s["train_loss"]) for g, s in zip(grouped, solo, strict=True) if g)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    tc = cfgs[0].training
    print(f"device: {name}, torch {torch.__version__}; {TEACHER} -> {args.students} x {STUDENT} KD, "
          f"{len(splits.train_y)} images 3x32x32, batch {args.batch_size}, {args.epochs} epochs, {tc.precision}, "
          f"channels_last={tc.channels_last}")
    print(f"FLOPs per image: teacher forward {teacher_flops / 1e9:.2f} G, student forward+backward "
          f"{student_flops / 1e9:.2f} G")
    for label, seconds, flops in (("one at a time", solo_s, teacher_flops + student_flops),
                                  ("grouped", grouped_s, teacher_flops / len(cfgs) + student_flops)):
        tflops = images * flops / seconds / 1e12
        peak = f", {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOPS" if args.peak_tflops else ""
        print(f"{label:<14} {seconds:8.1f} s  {images / seconds:10,.0f} student images/s  {tflops:.2f} TFLOPS{peak}")
    print(f"grouped / one at a time: {solo_s / grouped_s:.2f}x; largest last-epoch train_loss difference {drift:.2e}")


if __name__ == "__main__":
    main()

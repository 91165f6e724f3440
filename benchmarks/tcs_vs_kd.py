"""TCS (cached teacher coordinates, no teacher during training) vs vanilla KD (teacher forward every step): wall
time per epoch and peak memory of the steady epochs, same teacher/student pair and data, measured in one run.

docs/METHODS.md target 8: TCS at ~0.5x the time and ~0.75x the memory of KD. Each method runs `iterate_epochs` in its
own spawned process; epoch 1 is warm-up. Memory is the peak over the epochs after the first: CUDA
`torch.cuda.max_memory_allocated` (reset after epoch 1); CPU the process's peak RSS (VmHWM, reset after epoch 1 via
/proc/self/clear_refs) minus its RSS at that reset. TCS's one-off teacher pass (in `setup`) is timed separately.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from methods.networks import build_network
from orchestrator.experiment.checkpoints import load_checkpoint, save_network
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import iterate_epochs


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(device: torch.device) -> int:
    """Start a fresh peak window; returns the baseline it is measured against (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def _peak(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_kib("VmHWM") * 1024 - baseline


def measure(method: str, params: dict[str, Any], args: dict[str, Any], teacher_path: str,
            queue: mp.Queue) -> None:
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    raw = {"name": f"bench-{method}", "data": {"name": "synthetic", "val_fraction": 0.1, "batch_size": args["batch"],
                                               "synthetic": {"num_train": args["size"], "num_test": 256,
                                                             "channels": 3, "image_size": 32, "num_classes": 100}},
           "student": {"architecture": args["student"]},
           "teacher": {"checkpoint": teacher_path, "cache_dir": args["cache_dir"]},
           "method": {"name": method, "params": params}, "training": {"epochs": args["epochs"], "seed": 0}}
    cfg = load_config(raw, [f"training.precision={args['precision']}"])
    splits = load_splits(cfg.data)
    ckpt = load_checkpoint(teacher_path)
    start = time.perf_counter()
    epochs = iterate_epochs(cfg, splits, ckpt, device=device, log=None)
    seconds, baseline = [], 0
    for history in epochs:
        if history["epoch"] == 1:
            setup_and_first = time.perf_counter() - start
            baseline = _reset_peak(device)
        else:
            seconds.append(history["epoch_seconds"])
    queue.put({"method": method, "epoch_seconds": statistics.mean(seconds), "peak_bytes": _peak(device, baseline),
               "setup_and_first_epoch_s": setup_and_first, "val_acc": history["val_acc"]})


def _measure_or_report(method: str, params: dict[str, Any], args: dict[str, Any], teacher_path: str,
                       queue: mp.Queue) -> None:
    try:
        measure(method, params, args, teacher_path, queue)
    except Exception:  # the parent must hear of it instead of waiting forever
        queue.put({"error": traceback.format_exc()})


def run_isolated(method: str, params: dict[str, Any], args: dict[str, Any], teacher_path: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_or_report, args=(method, params, args, teacher_path, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{method} failed:\n{result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--size", type=int,
                        help="synthetic num_train (>= 10 per class); default 1024 on cpu, 50000 on cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per method; the first is warm-up")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default on cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    size = args.size or (50_000 if cuda else 1024)
    precision = "bf16" if (cuda if args.bf16 is None else args.bf16) else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_network(args.teacher, num_classes=100, in_channels=3, image_size=32)  # random init suffices
        path = save_network(Path(tmp) / "teacher.pt", teacher, architecture=args.teacher, args={}, num_classes=100,
                            in_channels=3, image_size=32)
        shared = {"device": args.device, "student": args.student, "size": size, "batch": args.batch_size,
                  "epochs": max(2, args.epochs), "threads": args.threads, "precision": precision,
                  "cache_dir": str(Path(tmp) / "cache")}
        kd = run_isolated("kd", {"temperature": 4.0, "kd_weight": 0.9}, shared, str(path))
        tcs = run_isolated("tcs", {}, shared, str(path))
    name = torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, {args.threads} threads)"
    print(f"device: {name}, torch {torch.__version__}, {precision}")
    print(f"{args.teacher} -> {args.student}, {size} synthetic 3x32x32 images, batch {args.batch_size}, "
          f"{shared['epochs']} epochs (first skipped)")
    mem = "max_memory_allocated" if cuda else "peak RSS over the steady epochs"
    for r in (kd, tcs):
        print(f"{r['method']:>4}: {r['epoch_seconds']:.3f} s/epoch, {mem} {r['peak_bytes'] / 2**20:,.1f} MiB, "
              f"setup + epoch 1 {r['setup_and_first_epoch_s']:.2f} s")
    print(f"ratio tcs/kd: time {tcs['epoch_seconds'] / kd['epoch_seconds']:.2f}x, "
          f"memory {tcs['peak_bytes'] / max(1, kd['peak_bytes']):.2f}x (docs/METHODS.md target 8: ~0.5x, ~0.75x)")


if __name__ == "__main__":
    main()

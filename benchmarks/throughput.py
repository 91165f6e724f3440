"""Training images/s of resnet32x4 -> resnet8x4 KD on CIFAR-shaped synthetic data: kdo's `train_loop` vs an
anchor loop written the way RepDistiller/mdistiller do it (per-sample torchvision transforms in a DataLoader)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from methods.networks import build_network
from orchestrator.experiment.checkpoints import build_from_checkpoint, load_checkpoint, save_network
from orchestrator.experiment.config import ExperimentConfig, load_config
from orchestrator.experiment.data import Splits, load_splits
from orchestrator.experiment.loop import train_loop

TEACHER, STUDENT = "resnet32x4", "resnet8x4"


def steady_rate(rates: list[float]) -> float:
    """Mean images/s over the epochs after the first (warm-up), or the only epoch."""
    return statistics.mean(rates[1:] if len(rates) > 1 else rates)


def kdo_config(args: argparse.Namespace) -> ExperimentConfig:
    synthetic = {"num_train": args.size, "num_test": args.test_size, "channels": 3, "image_size": 32,
                 "num_classes": 100}
    raw = {"name": "throughput",
           "data": {"name": "synthetic", "synthetic": synthetic, "val_fraction": 0.0, "batch_size": args.batch_size},
           "student": {"architecture": STUDENT},
           "teacher": {"architecture": TEACHER, "training": {"selection": "last"}},
           "method": {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1}},
           "training": {"epochs": args.epochs, "selection": "last"}}  # no validation split: no scikit-learn
    return load_config(raw, [f"training.precision={'bf16' if args.bf16 else 'fp32'}",
                             f"training.channels_last={args.channels_last}", f"training.compile={args.compile}"])


class AnchorDataset(Dataset):
    """CIFAR-style per-sample dataset: HWC uint8 images, a PIL image and a transform chain per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def anchor_loop(cfg: ExperimentConfig, splits: Splits, teacher_ckpt: dict[str, Any], device: torch.device,
                workers: int) -> tuple[list[float], float]:
    """Per-epoch images/s and the last epoch's mean loss of the anchor: fp32, teacher forward every step,
    a * CE + b * T^2 * KL (mdistiller's weights, as in the kdo config), SGD."""
    tc, info = cfg.training, splits.info
    torch.manual_seed(tc.seed)
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(splits.mean, splits.std)])
    loader = DataLoader(AnchorDataset(splits.train_x, splits.train_y, transform), batch_size=cfg.data.batch_size,
                        shuffle=True, num_workers=workers)
    student = build_network(STUDENT, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size).to(device)
    teacher = build_from_checkpoint(teacher_ckpt).to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    p = cfg.method.params
    temperature = p["temperature"]
    rates, mean_loss = [], float("nan")
    for _ in range(tc.epochs):
        student.train()
        loss_sum, start = 0.0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = student(x)
            with torch.no_grad():
                teacher_logits = teacher(x)
            kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                          reduction="batchmean") * temperature**2
            loss = p["ce_weight"] * F.cross_entropy(logits, y) + p["kd_weight"] * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()  # the repos' AverageMeter: one host sync per step
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(splits.train_y) / (time.perf_counter() - start))
        mean_loss = loss_sum / len(loader)
    return rates, mean_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", type=int, help="synthetic num_train; default 2048 on cpu, "
                                                 "50000 on cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=512, help="synthetic num_test (evaluation only)")
    parser.add_argument("--epochs", type=int, default=2, help="per side; the first is warm-up when > 1")
    parser.add_argument("--workers", type=int, help="anchor DataLoader workers; default 2 on cpu, 8 on cuda")
    on = argparse.BooleanOptionalAction
    parser.add_argument("--bf16", action=on, help="kdo side: training.precision=bf16 (default on cuda)")
    parser.add_argument("--channels-last", action=on, help="kdo side: training.channels_last (default on cuda)")
    parser.add_argument("--compile", action=on, default=False, help="kdo side: training.compile")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.size = args.size or (50_000 if cuda else 2048)
    args.workers = (8 if cuda else 2) if args.workers is None else args.workers
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    device = torch.device(args.device)

    cfg = kdo_config(args)
    splits = load_splits(cfg.data)
    info = splits.info
    teacher = build_network(TEACHER, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size)  # random init: throughput needs no trained teacher
    with tempfile.TemporaryDirectory() as tmp:
        path = save_network(Path(tmp) / "teacher.pt", teacher, architecture=TEACHER, args={},
                            num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
        teacher_ckpt = load_checkpoint(path)

    history = train_loop(cfg, splits, teacher_ckpt, device=device, log=None).history
    kdo = steady_rate([h["images_per_s"] for h in history])
    anchor_per_epoch, anchor_loss = anchor_loop(cfg, splits, teacher_ckpt, device, args.workers)
    anchor = steady_rate(anchor_per_epoch)

    tc = cfg.training
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"{TEACHER} -> {STUDENT} KD, {len(splits.train_y)} training images 3x32x32, 100 classes, "
          f"batch {args.batch_size}, {tc.epochs} epochs" + (" (first skipped as warm-up)" if tc.epochs > 1 else ""))
    print(f"kdo    train_loop ({tc.precision}, channels_last={tc.channels_last}, compile={tc.compile}): "
          f"{kdo:,.0f} images/s (last epoch's loss {history[-1]['train_loss']:.3f})")
    print(f"anchor DataLoader ({args.workers} workers, fp32): {anchor:,.0f} images/s (last epoch's loss "
          f"{anchor_loss:.3f})")
    print(f"ratio kdo/anchor: {kdo / anchor:.2f}x")


if __name__ == "__main__":
    main()

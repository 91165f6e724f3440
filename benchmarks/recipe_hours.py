"""Hours of the CIFAR-100 table's recipe on this device, projected from measured epochs: the pair config
`cifar100_resnet32x4_resnet8x4` as shipped (batch 64, SGD, its schedule), on CIFAR-100-shaped synthetic data (at full
size the 45,000 images kdo trains on after its validation split, and the 10,000 test images; scaled down with --size),
each epoch timed end to end (training steps, then the test pass every kdo epoch makes; the validation pass, a forward
over 5,000 images, about 1% of an epoch, is left out so that no scikit-learn split is needed). It prints the
hours of one 240-epoch KD run, of the teacher's own 240-epoch run, and of the study
`cifar100_logit_baselines` (its entries x seeds at the pair's cost, plus the teacher once). Run by
`benchmarks/gpu_check.sh`; no Ray, MLflow or network."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from methods.networks import build_network
from orchestrator.experiment.checkpoints import save_network
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop

PAIR = "cifar100_resnet32x4_resnet8x4"
STUDY = Path(__file__).resolve().parents[1] / "search_spaces" / "studies" / "cifar100_logit_baselines.yaml"
FULL_TRAIN, FULL_TEST = 45_000, 10_000  # the images kdo trains on (CIFAR-100's 50,000 less 10% validation), and test


def epoch_seconds(overrides: list[str], teacher: str | None, device: torch.device) -> float:
    """Seconds of one epoch after the first (warm-up), at the size the overrides give."""
    cfg = load_config(PAIR, overrides)
    history = train_loop(cfg, load_splits(cfg.data), torch.load(teacher, weights_only=True) if teacher else None,
                         device=device, log=None).history
    seconds = [h["epoch_seconds"] for h in history]
    return statistics.mean(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", type=int, default=FULL_TRAIN, help="synthetic training images")
    parser.add_argument("--test-size", type=int, default=FULL_TEST)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per run; the first is warm-up")
    on = argparse.BooleanOptionalAction
    parser.add_argument("--bf16", action=on, help="training.precision=bf16 (default on cuda)")
    parser.add_argument("--channels-last", action=on, help="training.channels_last (default on cuda)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    bf16 = cuda if args.bf16 is None else args.bf16
    channels_last = cuda if args.channels_last is None else args.channels_last
    base = load_config(PAIR)
    data = ["data.name=synthetic", f"data.synthetic.num_train={args.size}", f"data.synthetic.num_test={args.test_size}",
            "data.val_fraction=0", "training.selection=last",
            "data.synthetic.channels=3", "data.synthetic.image_size=32", "data.synthetic.num_classes=100",
            f"training.epochs={args.epochs}", f"training.precision={'bf16' if bf16 else 'fp32'}",
            f"training.channels_last={str(channels_last).lower()}"]
    with tempfile.TemporaryDirectory() as tmp:
        assert base.teacher is not None and base.teacher.architecture is not None
        net = build_network(base.teacher.architecture, num_classes=100, in_channels=3, image_size=32)
        path = save_network(Path(tmp) / "teacher.pt", net, architecture=base.teacher.architecture, args={},
                            num_classes=100, in_channels=3, image_size=32)  # random weights: time needs no training
        kd = epoch_seconds([*data, "teacher.architecture=null", f"teacher.checkpoint={path}"], str(path), device)
    # The teacher's own run: the teacher architecture as the student of a ce run, at its batch size.
    teacher = epoch_seconds([*data, "teacher=null", "method.name=ce", "method.params={}",
                             f"student.architecture={base.teacher.architecture}",
                             f"data.batch_size={base.teacher.batch_size}"], None, device)
    # An epoch's time scales with the images it trains on and evaluates: CIFAR-100's over the ones measured.
    scale = (FULL_TRAIN / args.size) * base.training.epochs / 3600
    run_h, teacher_h = kd * scale, teacher * scale
    study = yaml.safe_load(STUDY.read_text())
    runs = (len(study["methods"]) + len(study.get("references", []))) * len(study["seeds"])
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {name}; {PAIR} recipe (batch {base.data.batch_size}, {base.training.schedule} "
          f"{base.training.milestones}), {'bf16' if bf16 else 'fp32'}, channels_last={channels_last}; "
          f"{args.size} training images measured, projected to {FULL_TRAIN}"
          + (" (a smoke run: too small to project from)" if args.size < 5000 else ""))
    print(f"epoch: KD {kd:.2f} s, teacher {teacher:.2f} s at this size")
    print(f"projected hours: one {base.training.epochs}-epoch KD run {run_h:.2f} h, the teacher's run "
          f"{teacher_h:.2f} h; study {study['name']} ({runs} runs + the teacher once) {runs * run_h + teacher_h:.1f} h")


if __name__ == "__main__":
    main()

"""EKD's claim, measured: every sub-net of one EKD run against the same architecture trained alone with CE (same
data, optimizer, schedule and epochs), over seeds through `orchestrator.run`; mean ± std of test/val accuracy,
and the training time of one EKD run against the sum of the individual runs.

    .venv/bin/python benchmarks/ekd_vs_alone.py --config digits_ekd --seeds 0 1 2
    .venv/bin/python benchmarks/ekd_vs_alone.py --config digits_ekd --set data.name=synthetic ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from typing import Any

from methods.ddnn import DDNNResNet
from methods.networks import build_network
from orchestrator.experiment.config import ExperimentConfig, load_config
from orchestrator.experiment.data import dataset_info
from orchestrator.experiment.runner import RunResult, run


def alone_config(cfg: ExperimentConfig, net: DDNNResNet, subnet: int) -> ExperimentConfig:
    """`cfg` with the student replaced by sub-net `subnet`'s standalone network, trained with plain CE."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}_alone_{net.subnet_names[subnet]}"
    raw["student"] = {"architecture": "ddnn_resnet", "args": net.standalone_args(subnet)}
    raw["method"] = {"name": "ce", "params": {}}
    return load_config(raw)


def build_ddnn(cfg: ExperimentConfig) -> DDNNResNet:
    info = dataset_info(cfg.data)
    net = build_network(cfg.student.architecture, num_classes=info.num_classes, in_channels=info.channels,
                        image_size=cfg.data.image_size or info.image_size, **cfg.student.args)
    if not isinstance(net, DDNNResNet):
        raise SystemExit(f"{cfg.name}: student.architecture must be a DDNN; got {cfg.student.architecture}")
    return net


def train_seconds(result: RunResult) -> float:
    """Seconds spent in training steps (the loop's epoch_seconds), without evaluation or Ray/MLflow set-up."""
    return float(result.history["epoch_seconds"].sum())


def _cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):6.2f} ± {100 * spread:4.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits_ekd", help="an EKD config (YAML path or shipped name)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override a field of every run: a.b=value (repeatable)")
    parser.add_argument("--workdir", default=None, help="where mlflow.db and Ray state go (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="kdo-ekd-vs-alone-")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    base = load_config(args.config, [*args.overrides, f"tracking.uri=sqlite:///{os.path.abspath('mlflow.db')}"])
    net = build_ddnn(base)
    names = net.subnet_names
    ekd: dict[str, dict[str, list[float]]] = {n: {"val": [], "test": []} for n in names}
    alone: dict[str, dict[str, list[float]]] = {n: {"val": [], "test": []} for n in names}
    seconds: dict[str, list[float]] = {"ekd": [], "alone": [], "ekd_wall": [], "alone_wall": []}
    for seed in args.seeds:
        cfg = load_config(base, [f"training.seed={seed}"])
        result = run(cfg)
        final: dict[str, Any] = result.history.iloc[-1].to_dict()
        selected = result.history[result.history["epoch"] == result.best_epoch].iloc[0].to_dict()
        for n in names:
            ekd[n]["test"].append(float(final[f"test_acc/{n}"]))
            ekd[n]["val"].append(float(selected[f"val_acc/{n}"]))
        seconds["ekd"].append(train_seconds(result))
        seconds["ekd_wall"].append(result.seconds)
        total = wall = 0.0
        for k, n in enumerate(names):
            alone_result = run(alone_config(cfg, net, k))
            alone[n]["test"].append(alone_result.test_acc)
            alone[n]["val"].append(alone_result.val_acc)
            total += train_seconds(alone_result)
            wall += alone_result.seconds
        seconds["alone"].append(total)
        seconds["alone_wall"].append(wall)

    print(f"\n{base.name}: {base.data.name}, {base.training.epochs} epochs, seeds {args.seeds}, "
          f"params {dict(base.method.params)}; working dir {workdir}")
    print("accuracy, % (mean ± std over seeds); EKD val is the selected epoch's (chosen on the headline's val_acc)")
    print(f"{'network':<14} {'blocks':<12} {'EKD test':>14} {'alone test':>14} {'EKD val':>14} {'alone val':>14}")
    for k, n in enumerate(names):
        blocks = "-".join(map(str, net.configs[k]))
        print(f"{n:<14} {blocks:<12} {_cell(ekd[n]['test']):>14} {_cell(alone[n]['test']):>14} "
              f"{_cell(ekd[n]['val']):>14} {_cell(alone[n]['val']):>14}")
    mean = statistics.mean
    print(f"training seconds per seed (sum of epoch_seconds): one EKD run {mean(seconds['ekd']):.1f}, "
          f"the {len(names)} networks alone {mean(seconds['alone']):.1f}")
    print(f"wall seconds per seed (incl. evaluation, Ray, MLflow): one EKD run {mean(seconds['ekd_wall']):.1f}, "
          f"alone {mean(seconds['alone_wall']):.1f}")


if __name__ == "__main__":
    main()

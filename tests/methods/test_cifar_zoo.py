"""The CIFAR-100 table's networks and recipe: each network against the parameter count RepDistiller's own code gives
(`methods/cifar_zoo.py` cites the files), its features at 32x32, and every `cifar100_*` pair config validating and
training a step on CIFAR-100-shaped synthetic data with an untrained teacher of its architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods.networks import FeatureNet, build_network
from orchestrator.experiment.checkpoints import save_network
from orchestrator.experiment.config import load_config
from orchestrator.experiment.config_files import shipped_configs
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop

# Counted by running HobbitLong/RepDistiller models/{resnetv2,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py for 100 classes;
# the features are the ones its forward(is_feat=True) returns between the stem and the pooled vector.
REPDISTILLER = {
    "resnet50_bottleneck": (23_705_252, [(256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    "mobilenetv2_half": (812_836, [(12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflenet_v1": (949_258, [(240, 16), (480, 8), (960, 4)], 960),
    "shufflenet_v2": (1_355_528, [(116, 16), (232, 8), (464, 4)], 1024),
}
PAIRS = sorted(n for n in shipped_configs() if n.startswith("cifar100_"))


@pytest.mark.parametrize("name", sorted(REPDISTILLER))
def test_the_table_networks_have_repdistillers_parameter_counts_and_features(name: str) -> None:
    params, stages, width = REPDISTILLER[name]
    net = build_network(name, num_classes=100, in_channels=3, image_size=32)
    assert isinstance(net, FeatureNet) and sum(p.numel() for p in net.parameters()) == params
    logits, feats = net.eval()(torch.randn(2, 3, 32, 32), features=True)
    assert logits.shape == (2, 100) and feats["penultimate"].shape == (2, width) == (2, net.feature_dim)
    assert [tuple(feats[s].shape[1:]) for s in net.stage_names] == [(c, h, h) for c, h in stages]
    assert torch.allclose(net.classifier(feats["penultimate"]), logits, atol=1e-5)  # what LSH and TCS fold into


def test_the_table_has_its_thirteen_pairs_with_the_codebases_recipe() -> None:
    assert len(PAIRS) == 13
    for name in PAIRS:
        cfg = load_config(name)
        light = cfg.student.architecture in ("mobilenetv2_half", "shufflenet_v1", "shufflenet_v2")
        for training, lr in ((cfg.training, 0.01 if light else 0.05), (cfg.teacher.training, 0.05)):
            assert (training.epochs, training.optimizer, training.lr, training.momentum, training.weight_decay,
                    training.schedule, training.milestones, training.gamma) == (
                240, "sgd", lr, 0.9, 5e-4, "multistep", [150, 180, 210], 0.1), name
        assert (cfg.data.name, cfg.data.batch_size, cfg.teacher.batch_size, cfg.data.augment) == \
            ("cifar100", 64, 64, True)
        assert name == f"cifar100_{cfg.teacher.architecture}_{cfg.student.architecture}"


@pytest.fixture(scope="module")
def untrained_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One untrained checkpoint per teacher architecture of the table, saved once for every pair."""
    folder, out = tmp_path_factory.mktemp("cifar-teachers"), {}
    for arch in sorted({load_config(n).teacher.architecture for n in PAIRS}):
        torch.manual_seed(0)
        net = build_network(arch, num_classes=100, in_channels=3, image_size=32)
        out[arch] = save_network(folder / f"{arch}.pt", net, architecture=arch, args={}, num_classes=100,
                                 in_channels=3, image_size=32)
    return out


@pytest.mark.parametrize("name", PAIRS)
def test_each_pair_trains_a_step_on_cifar100_shaped_data(name: str, untrained_teachers: dict[str, Path]) -> None:
    teacher = load_config(name).teacher.architecture
    cfg = load_config(name, ["data.name=synthetic", "data.synthetic.num_train=2000", "data.synthetic.num_test=10",
                             "data.batch_size=8", "data.val_fraction=0.05", "data.train_fraction=0.01",
                             "training.epochs=1",
                             "teacher.architecture=null", f"teacher.checkpoint={untrained_teachers[teacher]}"])
    assert (cfg.data.synthetic.channels, cfg.data.synthetic.image_size, cfg.data.synthetic.num_classes) == (3, 32, 100)
    out = train_loop(cfg, load_splits(cfg.data), torch.load(untrained_teachers[teacher], weights_only=True), log=None)
    assert out.status == "finished" and out.history[-1]["train_loss"] == out.history[-1]["train_loss"]  # 3 steps


def test_the_cifar100_study_plans_with_its_published_numbers_and_refuses_an_unknown_row() -> None:
    from orchestrator.errors import ConfigError
    from orchestrator.study.robustness import RobustnessStudy

    study = RobustnessStudy.from_yaml("cifar100_logit_baselines")  # plans every run; trains nothing
    assert study.methods == ["kd", "dkd", "kd_ls", "dkd_ls", "ce"] and len(study.points) == 5 * 5
    assert {p.config.name.split("-")[0] for p in study.points} == {"cifar100_logit_baselines"}
    published = {k: (v.accuracy, v.protocol) for k, v in study.spec.published.items()}
    assert published == {"kd": (73.33, "best test epoch"), "dkd": (76.32, "best test epoch"),
                         "kd_ls": (76.62, "best test epoch"), "dkd_ls": (77.01, "best test epoch"),
                         "ce": (72.50, "last epoch"), "teacher": (79.42, "last epoch")}
    ls = next(p.config for p in study.points if p.tags.get("kdo.entry") == "kd_ls")
    assert ls.method.params["logit_standardization"] and ls.method.params["temperature"] == 2.0  # LS's defaults
    with pytest.raises(ConfigError, match="study.published: no row 'crd' in this study; allowed: kd, dkd"):
        study.replace(published={"crd": {"accuracy": 75.5, "protocol": "last epoch", "source": "CRD"}})


def test_published_numbers_meet_kdos_number_under_their_own_protocol() -> None:
    """The pairing rule: a 'best test epoch' number beside kdo's peak column, a 'last epoch' one beside its last
    epoch's, the teacher beside the teacher's test accuracy; a row without finished runs reads n/a."""
    from types import SimpleNamespace

    import pandas as pd

    from orchestrator.study.published import published_display, published_table
    from orchestrator.study.spec import Published

    protocols = pd.DataFrame({"selected": [75.0, 72.0], "selected_std": [0.5, 0.4], "last_epoch": [75.5, 72.1],
                              "last_epoch_std": [0.6, 0.3], "peak": [76.0, 72.9], "peak_std": [0.2, 0.1]},
                             index=["kd", "ce"])
    published = {"kd": Published(accuracy=73.33, protocol="best test epoch", source="mdistiller"),
                 "ce": Published(accuracy=72.50, protocol="last epoch", source="CRD"),
                 "dkd": Published(accuracy=76.32, protocol="best test epoch", source="mdistiller"),
                 "teacher": Published(accuracy=79.42, protocol="last epoch", source="CRD")}
    study = SimpleNamespace(protocols=lambda: protocols, teacher=lambda: {"val": 80.0, "test": 79.0},
                            spec=SimpleNamespace(published=published))
    table = published_table(study)
    assert table.loc["kd", "kdo"] == 76.0 and table.loc["kd", "difference"] == pytest.approx(76.0 - 73.33)
    assert table.loc["ce", "kdo"] == 72.1 and table.loc["teacher", "kdo"] == 79.0
    shown = published_display(study)
    assert shown.loc["dkd", "kdo, same protocol"] == "n/a" and shown.loc["kd", "kdo, same protocol"] == "76.00 ± 0.20"
    assert shown.loc["teacher", "kdo, selected on val"] == "79.00 (n=1)" and shown.loc["ce", "difference"] == "-0.40"

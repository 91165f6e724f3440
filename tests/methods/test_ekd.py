"""EKD: the loss and its gradient paths, BN recalibration per sub-net, and a real `kdo run digits_ekd`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from methods import get_method
from methods.ddnn import DDNNResNet
from methods.ekd import EKDParams, EmbeddedKD, attention_map, recalibrate_bn
from methods.networks import build_network
from orchestrator.cli import app
from orchestrator.errors import ConfigError
from orchestrator.experiment.config import load_config

DIGITS = {"num_classes": 10, "in_channels": 1, "image_size": 8}


def _net(**args: object) -> DDNNResNet:
    torch.manual_seed(0)
    net = build_network("ddnn_resnet", **DIGITS, **{"blocks": [3, 3], "subnets": [[1, 1]], "widths": [8, 16],
                                                     **args})
    assert isinstance(net, DDNNResNet)
    return net


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_attention_map_is_a_unit_vector_of_channel_energy() -> None:
    f = torch.randn(2, 5, 4, 4)
    a = attention_map(f)
    assert a.shape == (2, 16)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    assert torch.allclose(a[0], f[0].pow(2).mean(0).flatten() / f[0].pow(2).mean(0).norm())


def test_total_loss_is_the_weighted_sum_of_the_parts() -> None:
    params = EKDParams(temperature=3.0, kl_weight=0.5, attention_weight=200.0, subnet_ce_weight=0.7)
    distiller = EmbeddedKD(_net(subnets=[[1, 1], [2, 2]]), None, params)
    x, y = _batch()
    loss, parts = distiller(x, y)
    assert set(parts) == {"ce/full", *(f"{t}/sub_{d}" for t in ("ce", "kl", "at") for d in ("1-1", "2-2"))}
    expected = parts["ce/full"] + sum(0.7 * parts[f"ce/sub_{d}"] + 0.5 * parts[f"kl/sub_{d}"]
                                      + 200.0 * parts[f"at/sub_{d}"] for d in ("1-1", "2-2"))
    assert torch.allclose(loss, expected)
    assert all(v > 0 for k, v in parts.items() if not k.startswith("ce"))
    # The KL is T^2 KL(p_F^T || p_k^T) from the full net to the sub-net.
    net = distiller.student
    z_full, z_sub = net.forward_subnet(x, 0), net.forward_subnet(x, 1)
    kl = F.kl_div(F.log_softmax(z_sub / 3, 1), F.softmax(z_full / 3, 1), reduction="batchmean") * 9
    assert torch.allclose(parts["kl/sub_1-1"], kl, atol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_distillation_gradients_reach_the_full_net_only_without_detach(detach: bool) -> None:
    distiller = EmbeddedKD(_net(), None, EKDParams(detach_teacher=detach))
    parts = distiller.losses(*_batch())
    sum(v for k, v in parts.items() if k.startswith(("kl/", "at/"))).backward()
    net = distiller.student
    full_only = [p for stage in net.stages for block in list(stage)[1:] for p in block.parameters()]
    shared = list(net.stages[0][0].parameters()) + list(net.classifier.parameters())
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in full_only]
    assert (not any(reached)) if detach else all(reached)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared), "the sub-net's own path learns"


def test_recalibration_gives_each_subnet_its_own_cumulative_statistics() -> None:
    net = _net()
    batches = [(torch.randn(8, 1, 8, 8) * (i + 1), torch.zeros(8, dtype=torch.long)) for i in range(3)]
    untouched = net.stages[1][2].bn2.running_mean.clone()  # a block only the full net runs
    recalibrate_bn(net, 1, iter(batches), 3)
    with torch.no_grad():
        conv = net.stem[0]
        expected = torch.stack([conv(b).mean(dim=(0, 2, 3)) for b, _ in batches]).mean(0)
    assert torch.allclose(net.stem[1].running_mean, expected, atol=1e-5)  # an equal-weight average
    assert net.stem[1].momentum == 0.1 and net.training
    assert torch.equal(net.stages[1][2].bn2.running_mean, untouched)
    sub_stats = net.stages[1][0].bn2.running_var.clone()
    recalibrate_bn(net, 0, iter(batches), 3)
    assert not torch.allclose(net.stages[1][0].bn2.running_var, sub_stats), "the full net's inputs differ there"
    assert not torch.equal(net.stages[1][2].bn2.running_mean, untouched)


def test_setup_checks_fail_with_one_line() -> None:
    ekd = get_method("ekd")
    assert not ekd.needs_teacher
    with pytest.raises(ValueError, match="ekd needs a DDNN student"):
        ekd.check_setup(EKDParams(), student=build_network("cnn", **DIGITS), teacher=None, num_workers=1)
    with pytest.raises(ValueError, match="bn_mode: 'private' needs student.args.private_bn: true"):
        ekd.check_setup(EKDParams(bn_mode="private"), student=_net(), teacher=None, num_workers=1)
    with pytest.raises(ConfigError, match=r"^student.architecture: ekd needs a DDNN student") as err:
        load_config("digits_ekd", ["student.architecture=resnet8", "student.args={}"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="method.params.attention_weight"):
        load_config("digits_ekd", ["method.params.attention_weight=-1"])
    assert load_config("digits_ekd").teacher is None


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(120)
def test_kdo_run_digits_ekd_logs_every_subnet(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["run", "digits_ekd", "--set", "training.epochs=4"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    assert run.data.params["method.params.bn_mode"] == "recalibrate"
    assert run.data.params["method.params.detach_teacher"] == "True"
    metrics = run.data.metrics
    names = ("full", "sub_1-1", "sub_2-2")
    for name in names:
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"val_acc/{name}")] == [1, 2, 3, 4]
        assert metrics[f"test_acc/{name}"] > 0.5, name  # chance is 0.1
    assert metrics["test_acc"] == metrics["test_acc/full"]  # the headline is the full net, BN recalibrated
    for part in ("ce/full", "kl/sub_1-1", "at/sub_2-2"):
        assert len(client.get_metric_history(run.info.run_id, f"loss/{part}")) == 4

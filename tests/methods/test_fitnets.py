"""FitNets (Romero et al. 2015): the regressor, the hint stage, the lam schedule, and a real `kdo run`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from methods.feature_utils import forward_to, resolve_stage
from methods.fitnets import ConvReg, FitNets, FitNetsParams, hint_loss, kd_weight_at, paper_regressor
from methods.networks import build_network
from methods.registry import LoopContext, batch_order_seed
from orchestrator.cli import app
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.device_data import DeviceData
from orchestrator.experiment.factories import make_optimizer
from orchestrator.experiment.loop import accuracy
from tests.conftest import digits_config


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two busy cores: one intra-op thread avoids OpenMP oversubscription (small convs run 30-70x slower without).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loop_context(epochs: int = 3, cache_dir: Path | None = None, logged: list | None = None,
                 **training: Any) -> LoopContext:
    """A LoopContext over real digits data, wired the way `orchestrator.experiment.loop` wires it (no tracker)."""
    cfg = load_config(digits_config(training={"epochs": epochs, "lr": 0.05, "seed": 0, **training}))
    data = DeviceData(load_splits(cfg.data), torch.device("cpu"))
    tc = cfg.training
    sink = logged if logged is not None else []
    return LoopContext(
        device=data.device, num_classes=10, image_shape=(1, 8, 8), batch_size=64, epochs=epochs,
        precision="fp32", log=lambda metrics, step: sink.append((step, dict(metrics))),
        make_optimizer=lambda params: make_optimizer(params, tc),
        train_batches=lambda epoch, phase="student": data.train_batches(64, seed=batch_order_seed(0, epoch, phase)),
        clean_batches=lambda batch_size: data.eval_batches("train", batch_size),
        accuracy=lambda net, split: accuracy(net, data, split), fingerprint=lambda: "digits-test-teacher",
        log_images=lambda images, name: None, set_tags=lambda tags: sink.append(("tags", dict(tags))),
        cache_dir=cache_dir,
        indexed_train_batches=lambda epoch: data.train_batches(64, seed=batch_order_seed(0, epoch), with_index=True),
        train_images=data.train_images)


def cnn(width: int) -> Any:
    return build_network("cnn", num_classes=10, in_channels=1, image_size=8, width=width)


@pytest.mark.parametrize(("guided", "hint"), [((4, 8, 8), (16, 4, 4)), ((8, 4, 4), (32, 4, 4)),
                                              ((3, 7, 5), (6, 2, 3)), ((64,), (128,))])
def test_paper_regressor_output_matches_hint_shape(guided: tuple, hint: tuple) -> None:
    regressor = paper_regressor(guided, hint)
    out = regressor(torch.randn(5, *guided))
    assert tuple(out.shape) == (5, *hint)
    assert (out >= 0).all(), "the regressor ends in the hint layer's ReLU"


@pytest.mark.parametrize(("guided", "hint"), [((4, 8, 8), (16, 4, 4)), ((8, 2, 2), (32, 4, 4)),
                                              ((8, 4, 4), (16, 4, 4))])
def test_one_stage_convreg_output_matches_hint_shape(guided: tuple, hint: tuple) -> None:
    assert tuple(ConvReg(guided, hint, 3)(torch.randn(3, *guided)).shape) == (3, *hint)


@pytest.mark.parametrize(("guided", "hint", "conv", "kernel", "stride"), [
    ((4, 8, 8), (16, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # sizes match: 1x1, as mdistiller
    ((4, 8, 8), (16, 4, 4), nn.Conv2d, (3, 3), (2, 2)),
    ((4, 4, 4), (16, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),
    ((4, 7, 5), (16, 4, 3), nn.Conv2d, (4, 3), (1, 1)),  # a valid conv of kernel 1 + s - t
    ((4, 3, 3), (16, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # no mdistiller rule: 1x1, then resized
])
def test_one_stage_regressor_defaults_to_mdistillers_convreg(guided: tuple, hint: tuple, conv: type, kernel: tuple,
                                                              stride: tuple) -> None:
    assert FitNetsParams().regressor_kernel == "auto"
    regressor = ConvReg(guided, hint, FitNetsParams().regressor_kernel)
    [layer] = [m for m in regressor.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert type(layer) is conv and layer.kernel_size == kernel and layer.stride == stride
    assert tuple(regressor(torch.randn(3, *guided)).shape) == (3, *hint)
    for size in (1, 3):  # the explicit kernels stay same-padded convs
        [layer] = [m for m in ConvReg(guided, hint, size).modules() if isinstance(m, nn.Conv2d)]
        assert layer.kernel_size == (size, size) and layer.padding == (size // 2, size // 2)


def test_regressor_rejects_a_guided_map_smaller_than_the_hint() -> None:
    with pytest.raises(ValueError, match="guided_layer"):
        paper_regressor((8, 2, 2), (16, 4, 4))


def test_layers_by_name_or_relative_depth() -> None:
    wrn = build_network("wrn_16_1", num_classes=10, in_channels=1, image_size=8)
    assert [resolve_stage(wrn, d) for d in (1 / 3, 1 / 2, 2 / 3, 1.0)] == ["stage1", "stage2", "stage2", "stage3"]
    assert resolve_stage(cnn(4), "stage2") == "stage2"
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_stage(cnn(4), "stage9")
    with pytest.raises(ValueError, match="method.params.hint_layer"):
        FitNets.check_setup(FitNetsParams(hint_layer="conv7"), student=cnn(4), teacher=cnn(8), num_workers=1)


def test_hint_loss_is_half_squared_l2_summed_over_units_mean_over_batch() -> None:
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    expected = sum(0.5 * float(((a[i] - b[i]) ** 2).sum()) for i in range(4)) / 4
    assert hint_loss(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_stage1_trains_only_lower_layers_and_regressor_and_lowers_the_hint_loss() -> None:
    torch.manual_seed(0)
    student, teacher = cnn(4), cnn(16)
    distiller = FitNets(student, teacher, FitNetsParams(guided_layer="stage1", hint_layer="stage1",
                                                        stage1_epochs=3))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    logged: list = []
    distiller.setup(loop_context(logged=logged))
    after = student.state_dict()
    upper = [k for k in before if k.startswith(("stages.1.", "classifier."))]
    lower = [k for k in before if k.startswith("stages.0.") and "num_batches" not in k]
    assert upper and lower
    for key in upper:  # parameters AND BatchNorm statistics above the guided layer: those layers never ran
        assert torch.equal(before[key], after[key]), key
    assert all(not torch.equal(before[k], after[k]) for k in lower)
    assert distiller.regressor is None and not any("regressor" in k for k in distiller.state_dict())
    losses = [m["stage1/hint_loss"] for step, m in logged if step != "tags" and "stage1/hint_loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_lambda_follows_the_annealing_schedule() -> None:
    p = FitNetsParams(kd_weight=4.0, kd_weight_final=1.0, anneal_start_epoch=5, anneal_end_fraction=0.5)
    epochs = 40  # saturate = 20; step = 3 / 16
    values = [kd_weight_at(e, p, epochs) for e in range(1, epochs + 1)]
    assert values[:4] == [4.0] * 4
    assert values[4] == pytest.approx(4.0 - 3 / 16) and values[18] == pytest.approx(4.0 - 15 * 3 / 16)
    assert values[19:] == [1.0] * 21
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(120)
def test_kdo_run_fitnets_logs_lambda_per_epoch_and_beats_chance(workdir: Path, teacher_checkpoint: Path) -> None:
    params = {"stages": 2, "stage1_epochs": 1, "anneal_start_epoch": 2, "anneal_end_fraction": 1.0}
    cfg = workdir / "fitnets.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method={"name": "fitnets", "params": params},
                                                teacher={"checkpoint": str(teacher_checkpoint)})))
    result = CliRunner().invoke(app, ["run", str(cfg), "--set", "training.epochs=4"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    lam = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "fitnets/kd_weight")}
    expected = {e: kd_weight_at(e, FitNetsParams(**params), 4) for e in range(1, 5)}
    assert lam == pytest.approx(expected) and lam[1] > lam[3]
    assert len(client.get_metric_history(run.info.run_id, "stage1/hint_loss")) == 1
    assert run.data.metrics["stage1/epochs"] == 1 and run.data.tags["kdo.fitnets.stages"] == "2"
    assert run.data.metrics["test_acc"] > 0.3  # chance is 0.1


def test_one_stage_variant_trains_regressor_with_student() -> None:
    torch.manual_seed(0)
    distiller = FitNets(cnn(4), cnn(16), FitNetsParams(stages=1, guided_layer="stage2", hint_layer="stage1"))
    ctx = loop_context()
    distiller.setup(ctx)
    assert distiller.regressor is not None
    x, y = next(iter(ctx.train_batches(1)))
    loss, parts = distiller(x, y)
    assert set(parts) == {"ce", "hint"}
    assert loss.item() == pytest.approx(parts["ce"].item() + 100 * parts["hint"].item(), rel=1e-5)
    loss.backward()
    trained = distiller.optimized_parameters()
    assert all(p.grad is not None for p in trained), "no trainable parameter is left out of the forward (DDP)"


@pytest.mark.parametrize("stages", [1, 2])
def test_fitnets_runs_on_ddnn_resnets(stages: int) -> None:
    # As `kdo run digits_fitnets --set student.architecture=ddnn_resnet --set "student.args={blocks: [2,2,2],
    # subnets: [[1,1,1]]}" --set method.params.stages=S` builds it (here the teacher is a DDNN too): the stage
    # modules of a DDNN used not to run (its forward called their blocks one by one), so the hook that
    # `forward_to` puts on the guided/hint stage never fired: "RuntimeError: layer 'stage2' was not reached".
    ddnn = ["student.architecture=ddnn_resnet", "student.args={blocks: [2,2,2], subnets: [[1,1,1]], widths: [4,8,8]}"]
    overrides = [*ddnn, *(s.replace("student.", "teacher.") for s in ddnn)]
    cfg = load_config("digits_fitnets", [*overrides, f"method.params.stages={stages}", "method.params.stage1_epochs=1"])
    torch.manual_seed(0)
    student, teacher = (build_network(net.architecture, num_classes=10, in_channels=1, image_size=8, **net.args)
                        for net in (cfg.student, cfg.teacher))
    distiller = FitNets(student, teacher, FitNetsParams(**cfg.method.params))
    logged: list = []
    ctx = loop_context(logged=logged)
    full_epoch = ctx.train_batches
    ctx = dataclasses.replace(ctx, train_batches=lambda epoch, phase="student": islice(full_epoch(epoch, phase), 2))
    distiller.setup(ctx)
    x, y = next(iter(ctx.train_batches(1)))
    loss, parts = distiller(x, y)
    assert torch.isfinite(loss) and set(parts) == ({"ce", "hint"} if stages == 1 else {"ce", "soft_ce"})
    loss.backward()
    if stages == 1:
        assert tuple(forward_to(student, "stage2", x).shape[1:]) == (8, 4, 4)
    else:
        assert [m["stage1/hint_loss"] for step, m in logged if step != "tags" and "stage1/hint_loss" in m]

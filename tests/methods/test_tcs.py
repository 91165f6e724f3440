"""TCS (Zhou, Zhu, Wu, arXiv 2412.09388): one teacher pass, the PCA cache, mask selection, the fold, `kdo run`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from methods.networks import FeatureNet
from methods.tcs import TailoredCoordinateSystem, TCSParams, pca_coordinates
from orchestrator.cli import app
from orchestrator.experiment.checkpoints import load_checkpoint
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.loop import train_loop
from tests.conftest import digits_config
from tests.methods.test_fitnets import cnn, loop_context


@contextmanager
def images_through(feature_dim: int) -> Iterator[list[int]]:
    """Counts images passed through any top-level zoo network whose penultimate width is `feature_dim`."""
    seen = [0]

    def hook(module: torch.nn.Module, inputs: tuple, _output: object) -> None:
        if isinstance(module, FeatureNet) and module.feature_dim == feature_dim:
            seen[0] += inputs[0].shape[0]

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_teacher_runs_once_per_training_set_and_a_second_run_hits_the_cache(workdir: Path,
                                                                            teacher_checkpoint: Path) -> None:
    cfg = load_config(digits_config(method={"name": "tcs", "params": {"select_interval": 1, "select_rounds": 1}},
                                    teacher={"checkpoint": str(teacher_checkpoint)},
                                    training={"epochs": 2, "lr": 0.05, "seed": 0}))
    splits = load_splits(cfg.data)
    ckpt = load_checkpoint(teacher_checkpoint)
    n_train, n_eval = len(splits.train_y), len(splits.val_y) + len(splits.test_y)
    with images_through(32) as teacher_images:  # the width-16 teacher's feature is 32 wide; the student's 8
        first = train_loop(cfg, splits, ckpt, log=None)
    # The loop itself scores the teacher once on val and test; the method adds exactly one training-set pass.
    assert teacher_images[0] == n_train + n_eval
    assert len(list((workdir / ".kdo" / "teachers" / "tcs").glob("*.pt"))) == 1
    with images_through(32) as teacher_images:
        second = train_loop(cfg, splits, ckpt, log=None)
    assert teacher_images[0] == n_eval, "the cached coordinates were reused: no teacher pass"
    assert first.final["test_acc"] == second.final["test_acc"]
    assert first.final["tcs/coordinates_kept"] == 16


def test_pca_basis_is_orthonormal_and_sorted() -> None:
    torch.manual_seed(0)
    feats = torch.randn(500, 12) @ torch.randn(12, 12) + 3.0
    pca = pca_coordinates(feats, None, whiten=False)
    basis, values = pca["basis"], pca["eigenvalues"]
    assert basis.dtype == torch.float64
    assert torch.allclose(basis.t() @ basis, torch.eye(12, dtype=torch.float64), atol=1e-10)
    assert (values[:-1] >= values[1:]).all()
    cov = torch.cov(pca["coords"].double().t())
    assert torch.allclose(cov, torch.diag(values), atol=1e-3 * float(values[0]))
    top = pca_coordinates(feats, 4, whiten=True)
    assert top["coords"].shape == (500, 4)
    assert torch.allclose(top["coords"].double().std(0), torch.ones(4, dtype=torch.float64), atol=1e-3)


def test_selection_zeroes_lowest_scores_until_k_remain() -> None:
    torch.manual_seed(0)
    distiller = TailoredCoordinateSystem(cnn(4), cnn(16), TCSParams(keep_fraction=0.25, select_rounds=3,
                                                                    select_interval=2))
    ctx = loop_context()
    distiller.setup(ctx)
    batches = iter(distiller.batches(1, ctx))
    dim, keep = distiller.dim, distiller.keep
    assert (dim, keep) == (32, 8)
    removed_per_round = []
    for epoch in range(1, 10):
        alive_before = distiller.alive.clone()
        scores = distiller.score.clone()
        distiller.start_epoch(epoch, ctx)
        dropped = (alive_before - distiller.alive).nonzero().flatten()
        if len(dropped):
            survivors = distiller.alive.nonzero().flatten()
            assert scores[dropped].max() <= scores[survivors].min(), "the lowest accumulated |dL/dm| go first"
            removed_per_round.append(len(dropped))
        x, y = next(batches)
        loss, _ = distiller(x, y)
        distiller.zero_grad()
        loss.backward()
        assert (distiller.mask.grad[distiller.alive == 0] == 0).all(), "a removed coordinate stays removed"
    assert removed_per_round == [8, 8, 8] and int(distiller.alive.sum()) == keep


@pytest.mark.parametrize("pairing", ["augmented", "clean_forward"])
def test_folded_student_equals_the_unfolded_one(pairing: str) -> None:
    torch.manual_seed(0)
    distiller = TailoredCoordinateSystem(cnn(4), cnn(16), TCSParams(target_pairing=pairing, elsh=True))
    ctx = loop_context()
    distiller.setup(ctx)
    x, y = next(iter(distiller.batches(1, ctx)))
    assert x.shape[1] == (2 if pairing == "clean_forward" else 1) and y.shape[1] == 2
    loss, parts = distiller(x, y)
    assert {"ce", "mse", "elsh"} <= set(parts) and torch.isfinite(loss)
    with torch.no_grad():
        distiller.mask.uniform_(0.2, 1.5)
        distiller.alive[::3] = 0.0
        distiller.eval()
        images = x[:, :1]
        unfolded = distiller.head(distiller.effective_mask() * distiller.project(
            distiller.student(images, features=True)[1]["penultimate"]))
        plain = cnn(4)
        plain.load_state_dict(distiller.inference_student().state_dict())
        plain.eval()
        assert torch.allclose(plain(images), unfolded, atol=1e-5)


@pytest.mark.usefixtures("ray_runtime")
@pytest.mark.timeout(120)
def test_kdo_run_tcs_trains_above_chance(workdir: Path, teacher_checkpoint: Path) -> None:
    cfg = workdir / "tcs.yaml"
    cfg.write_text(yaml.safe_dump(digits_config(method={"name": "tcs", "params": {"select_interval": 1}},
                                                teacher={"checkpoint": str(teacher_checkpoint)})))
    result = CliRunner().invoke(app, ["run", str(cfg), "--set", "training.epochs=4"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("kdo").experiment_id])
    kept = [m.value for m in client.get_metric_history(run.info.run_id, "tcs/coordinates_kept")]
    assert kept == [32, 28, 24, 20]  # one round per epoch from epoch 2, 4 of the 16 to remove each
    assert run.data.tags["kdo.tcs.cache"] == "computed" and "not an SSL" in run.data.tags["kdo.tcs.teacher"]
    assert run.data.metrics["test_acc"] > 0.25  # chance is 0.1 (a 360-image test set: sd ~0.016 at chance)

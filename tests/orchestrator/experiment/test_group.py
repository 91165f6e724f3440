"""Students of one seed trained as a group equal their solo runs: shared batches, one teacher pass per batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods import get_method, list_methods
from methods.registry import Distiller, TeacherPass
from orchestrator.experiment.checkpoints import load_checkpoint
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits
from orchestrator.experiment.factories import build_student
from orchestrator.experiment.group import STATE_COPIES, Member, group_key, iterate_group, member_bytes
from orchestrator.experiment.loop import iterate_epochs
from orchestrator.search.grouped import plan_groups
from orchestrator.search.points import Point
from tests.conftest import digits_config

pytestmark = pytest.mark.timeout(300)
CPU = torch.device("cpu")


def _kd(teacher: Path, method: str = "kd", **params: float) -> dict:
    return digits_config(method={"name": method, "params": params},
                         teacher={"checkpoint": str(teacher)},
                         training={"epochs": 3, "lr": 0.05, "seed": 1})


def _solo(cfg, splits, ckpt) -> list[dict]:
    return list(iterate_epochs(cfg, splits, ckpt, log=None))


def test_a_group_of_three_kd_settings_equals_the_three_solo_runs(teacher_checkpoint: Path, monkeypatch) -> None:
    configs = [load_config(_kd(teacher_checkpoint, temperature=t, kd_weight=w))
               for t, w in ((2.0, 0.5), (4.0, 0.9), (8.0, 0.3))]
    configs.append(load_config(_kd(teacher_checkpoint, "lsh", lsh_bits_per_dim=2.0)))  # features shared too
    splits, ckpt = load_splits(configs[0].data), load_checkpoint(teacher_checkpoint)
    assert len({group_key(c) for c in configs}) == 1
    calls = []
    real = TeacherPass.__call__
    monkeypatch.setattr(TeacherPass, "__call__", lambda self, x: (calls.append(self._key is None or
                                                                             self._key[0] is not x), real(self, x))[1])
    grouped = list(iterate_group([Member(c) for c in configs], splits, ckpt, device=CPU))
    batches = len(calls) // len(configs)  # each member asks once per step
    assert sum(calls) == batches  # one teacher forward per batch, for the whole group
    monkeypatch.undo()
    for i, cfg in enumerate(configs):
        solo = _solo(cfg, splits, ckpt)
        assert [row[i]["val_acc"] for row in grouped] == pytest.approx([r["val_acc"] for r in solo], abs=1e-9)
        assert [row[i]["train_loss"] for row in grouped] == pytest.approx([r["train_loss"] for r in solo], rel=1e-6)
        assert grouped[-1][i]["test_acc"] == pytest.approx(solo[-1]["test_acc"], abs=1e-9)


def test_a_diverging_member_leaves_the_group_and_the_others_equal_their_solo_runs(teacher_checkpoint: Path) -> None:
    good = load_config(_kd(teacher_checkpoint, temperature=4.0, kd_weight=0.9))
    bad = load_config({**_kd(teacher_checkpoint, temperature=4.0, kd_weight=0.9),
                       "student": {"architecture": "mlp", "args": {}},
                       "training": {"epochs": 3, "lr": 10.0, "momentum": 0.99, "seed": 1}})
    assert group_key(bad) == group_key(good)  # the student and its optimizer are the member's own
    splits, ckpt = load_splits(good.data), load_checkpoint(teacher_checkpoint)
    rows = list(iterate_group([Member(bad), Member(good)], splits, ckpt, device=CPU))
    ended = [r[0] for r in rows if r[0] is not None]
    assert ended[-1]["status"] == "diverged" and len(ended) < 3 and rows[-1][0] is None
    assert [r[1]["val_acc"] for r in rows] == pytest.approx([r["val_acc"] for r in _solo(good, splits, ckpt)],
                                                            abs=1e-9)


def test_a_group_continues_from_its_members_loop_states(teacher_checkpoint: Path) -> None:
    configs = [load_config(_kd(teacher_checkpoint, temperature=t)) for t in (2.0, 6.0)]
    splits, ckpt = load_splits(configs[0].data), load_checkpoint(teacher_checkpoint)
    straight = list(iterate_group([Member(c) for c in configs], splits, ckpt, device=CPU, snapshot_every=1))
    states = [straight[0][i].pop("loop_state") for i in range(2)]
    resumed = list(iterate_group([Member(c, resume=s) for c, s in zip(configs, states, strict=True)], splits, ckpt,
                                 device=CPU))
    assert len(resumed) == 2
    for i in range(2):
        assert [r[i]["val_acc"] for r in resumed] == pytest.approx([r[i]["val_acc"] for r in straight[1:]],
                                                                   abs=1e-9)


def test_seeds_in_lockstep_and_a_method_with_its_own_batches_equal_their_solo_runs(teacher_checkpoint: Path) -> None:
    # One loop for every trial: members of other seeds, or of a method that makes its own batches (tcs), draw their
    # own batches in the same group, each on its own RNG, and still equal their solo runs.
    configs = [load_config({**_kd(teacher_checkpoint), "training": {"epochs": 2, "seed": seed}}) for seed in (0, 1)]
    configs.append(load_config({**_kd(teacher_checkpoint, "tcs"), "training": {"epochs": 2, "seed": 0}}))
    assert len({group_key(c) for c in configs}) == 3
    splits, ckpt = load_splits(configs[0].data), load_checkpoint(teacher_checkpoint)
    members = [Member(c) for c in configs]
    grouped = list(iterate_group(members, splits, ckpt, device=CPU))
    assert [m.status for m in members] == ["finished"] * 3
    for i, cfg in enumerate(configs):
        solo = _solo(cfg, splits, ckpt)
        assert [row[i]["train_loss"] for row in grouped] == pytest.approx([r["train_loss"] for r in solo], rel=1e-6)
        assert grouped[-1][i]["test_acc"] == pytest.approx(solo[-1]["test_acc"], abs=1e-9)


def test_methods_that_make_their_own_batches_train_alone(teacher_checkpoint: Path) -> None:
    for name in list_methods():
        method = get_method(name)
        assert method.groupable == (method.batches is Distiller.batches), name
    assert group_key(load_config(_kd(teacher_checkpoint, "tcs"))) is None
    assert group_key(load_config({**_kd(teacher_checkpoint), "training": {"seed": 2}})) != group_key(
        load_config(_kd(teacher_checkpoint)))


def test_groups_are_planned_by_seed_with_a_memory_estimate_that_draws_nothing(teacher_checkpoint: Path) -> None:
    points = [Point({"t": t}, seed, f"s{t}", load_config({**_kd(teacher_checkpoint, temperature=t),
                                                       "training": {"seed": seed}}))
              for t in (2.0, 4.0, 8.0) for seed in (0, 1)]
    cfg = load_config(points[0].config)
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    size = member_bytes(cfg, splits)
    assert torch.equal(torch.rand(3), expected), "the estimate left the caller's RNG stream as it was"
    assert size == STATE_COPIES * sum(4 * p.numel() for p in build_student(cfg, splits).parameters())
    assert plan_groups(points, splits, 0, 2) == [[0, 2, 4], [1, 3, 5]]  # one group per seed fills the 2 slots
    assert plan_groups(points, splits, 2, 2) == [[0, 4], [1, 5], [2], [3]]  # at most 2 a group, sizes near-equal
    assert plan_groups(points, splits, 1, 2) == [[i] for i in range(6)]

"""Datasets: deterministic stratified splits, on-device augmentation, rank sharding."""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.experiment.config import DataConfig
from orchestrator.experiment.data import DeviceData, augment_batch, load_splits


def test_digits_split_is_deterministic_stratified_and_disjoint() -> None:
    a = load_splits(DataConfig(name="digits", val_fraction=0.2))
    b = load_splits(DataConfig(name="digits", val_fraction=0.2))
    for name in ("train_x", "val_x", "test_x", "train_y"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 1797
    assert len(a.test_y) == 360  # the fixed 20% test hold-out
    counts = np.bincount(a.val_y, minlength=10)
    assert counts.min() >= 27 and counts.max() <= 30  # stratified: ~288 / 10 per class
    other = load_splits(DataConfig(name="digits", val_fraction=0.2, split_seed=1))
    assert np.array_equal(other.test_x, a.test_x), "the test split never depends on the split seed"
    assert not np.array_equal(other.val_x, a.val_x)


def test_resize_and_train_fraction() -> None:
    s = load_splits(DataConfig(name="digits", image_size=32, train_fraction=0.5))
    assert s.train_x.shape[1:] == (1, 32, 32) and s.info.image_size == 32
    full = load_splits(DataConfig(name="digits"))
    assert abs(len(s.train_y) - len(full.train_y) / 2) <= 1


def test_synthetic_dataset_shape_and_classes() -> None:
    cfg = DataConfig(name="synthetic", synthetic={"num_train": 200, "num_test": 50, "channels": 3,
                                                  "image_size": 16, "num_classes": 7})
    s = load_splits(cfg)
    assert s.train_x.dtype == np.uint8 and s.train_x.shape[1:] == (3, 16, 16)
    assert len(s.test_y) == 50 and s.info.num_classes == 7 and set(np.unique(s.train_y)) <= set(range(7))


def test_augment_crop_is_a_shift_and_flip_mirrors() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = augment_batch(x, pad=0, flip=False, generator=gen)
    assert torch.equal(out, x), "no padding, no flip: identity"
    flipped = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    shifted = augment_batch(x, pad=2, flip=False, generator=gen)
    assert shifted.shape == x.shape
    # Every crop is a window of the zero-padded image: its nonzero pixels keep their row order.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = padded[i, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert any(torch.equal(w, shifted[i, 0]) for w in windows)


def test_rank_shards_are_disjoint_and_equal() -> None:
    data = DeviceData(load_splits(DataConfig(name="digits")), torch.device("cpu"))
    shards = [list(data.train_batches(64, seed=5, rank=r, world=2, augment=False)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    seen = [torch.cat([x.flatten(1) for x, _ in shard]) for shard in shards]
    assert seen[0].shape == seen[1].shape
    assert seen[0].shape[0] + seen[1].shape[0] == data.size("train") // 2 * 2

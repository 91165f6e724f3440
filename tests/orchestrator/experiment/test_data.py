"""Datasets: deterministic stratified splits, IDX files, on-device augmentation, rank sharding."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from methods import list_methods
from orchestrator.errors import ConfigError
from orchestrator.experiment.config import DataConfig, load_config, teacher_key
from orchestrator.experiment.config_files import shipped_configs
from orchestrator.experiment.data import DatasetInfo, load_splits
from orchestrator.experiment.device_data import DeviceData, augment_batch
from orchestrator.experiment.idx import fashion_mnist_files, read_idx
from tests.conftest import needs_fashion_mnist


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


def _idx(type_code: int, dims: tuple[int, ...], values: bytes) -> bytes:
    """An IDX file written out by hand: two zero bytes, the type, the number of dimensions, big-endian sizes."""
    return bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + values


def test_read_idx_parses_hand_built_files(tmp_path: Path) -> None:
    images = tmp_path / "images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(_idx(0x08, (2, 2, 3), bytes(range(12)))))
    labels = tmp_path / "labels-idx1-ubyte"  # uncompressed works too
    labels.write_bytes(_idx(0x08, (3,), bytes([7, 0, 255])))
    x = read_idx(images)
    assert x.dtype == np.uint8 and x.shape == (2, 2, 3)
    assert x.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    assert read_idx(labels).tolist() == [7, 0, 255]
    wide = tmp_path / "wide.gz"
    wide.write_bytes(gzip.compress(_idx(0x0B, (2,), b"\x01\x02\xff\xfe")))  # big-endian int16
    assert read_idx(wide).tolist() == [258, -2]


@pytest.mark.parametrize(("content", "needle"), [
    (_idx(0x08, (2, 3), bytes(5)), "truncated or has trailing bytes (IDX shape (2, 3))"),
    (_idx(0x08, (2,), bytes(3)), "truncated or has trailing bytes (IDX shape (2,))"),
    (b"\x1f\x00\x08\x01" + bytes(8), "is not an IDX file (bad magic number)"),
    (bytes([0, 0, 0x08, 2, 0, 0]), "truncated or has trailing bytes (IDX shape None)"),
])
def test_read_idx_refuses_broken_files(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_idx(path)
    assert str(err.value).startswith("data.data_dir: ") and needle in str(err.value)


def _write_tiny_fashion(folder: Path) -> np.ndarray:
    """Four IDX files of 20 train / 4 test 28x28 images (classes 0 and 1); returns the train images."""
    folder.mkdir(parents=True, exist_ok=True)
    train = (np.arange(20 * 28 * 28) % 251).astype(np.uint8).reshape(20, 28, 28)
    test = np.full((4, 28, 28), 9, dtype=np.uint8)
    for name, dims, values in (("train-images-idx3-ubyte", (20, 28, 28), train.tobytes()),
                               ("train-labels-idx1-ubyte", (20,), bytes([0, 1] * 10)),
                               ("t10k-images-idx3-ubyte", (4, 28, 28), test.tobytes()),
                               ("t10k-labels-idx1-ubyte", (4,), bytes([1, 0, 1, 0]))):
        (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(0x08, dims, values)))
    return train


@pytest.mark.parametrize("sub", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_reads_the_idx_files_in_data_dir_first(tmp_path: Path, sub: str) -> None:
    train = _write_tiny_fashion(tmp_path / sub)
    s = load_splits(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), val_fraction=0.0))
    assert s.train_x.shape == (20, 1, 28, 28) and s.test_x.shape == (4, 1, 28, 28)
    assert np.array_equal(s.train_x[:, 0], train), "data_dir's own files, not the system copy"
    assert s.train_y.tolist() == [0, 1] * 10 and s.test_y.tolist() == [1, 0, 1, 0]
    assert s.val_x.shape == (0, 1, 28, 28)


def test_missing_fashion_mnist_names_both_places_and_the_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        fashion_mnist_files(tmp_path / "data", system_dir=tmp_path / "system")
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.name: dataset 'fashion_mnist' not found")
    assert f"in data.data_dir ({tmp_path / 'data'}, or its fashion-mnist/ or FashionMNIST/raw/)" in message
    assert f"nor in {tmp_path / 'system'}" in message
    assert "install it with `make data` (apt-get install dataset-fashion-mnist)" in message


@needs_fashion_mnist
def test_real_fashion_mnist_files_load_in_full(tmp_path: Path) -> None:
    s = load_splits(DataConfig(name="fashion_mnist", data_dir=str(tmp_path), val_fraction=0.0))
    assert s.train_x.shape == (60000, 1, 28, 28) and s.test_x.shape == (10000, 1, 28, 28)
    assert s.train_x.dtype == np.uint8 and s.info.num_classes == 10
    assert np.bincount(s.train_y).tolist() == [6000] * 10 and np.bincount(s.test_y).tolist() == [1000] * 10
    assert int(s.train_x.max()) == 255 and round(s.mean[0], 4) == 0.2860


def test_mnist5k_has_a_fixed_stratified_test_split() -> None:
    a = load_splits(DataConfig(name="mnist5k", val_fraction=0.1))
    assert a.train_x.shape[1:] == (1, 28, 28) and a.info == DatasetInfo(1, 28, 10, flip=False)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (3600, 400, 1000)
    assert np.bincount(a.test_y).tolist() == [100] * 10 and np.bincount(a.val_y).tolist() == [40] * 10
    other = load_splits(DataConfig(name="mnist5k", val_fraction=0.2, split_seed=3))
    assert np.array_equal(other.test_x, a.test_x) and np.array_equal(other.test_y, a.test_y)
    assert int(a.train_x.max()) == 255 and int(a.train_x.min()) == 0


def test_val_fraction_zero_trains_on_the_whole_training_set() -> None:
    s = load_splits(DataConfig(name="digits", val_fraction=0.0, image_size=16))
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (1437, 0, 360)
    assert s.val_x.shape == (0, 1, 16, 16) and s.train_x.shape[1:] == (1, 16, 16)
    data = DeviceData(s, torch.device("cpu"))
    assert data.size("val") == 0 and list(data.eval_batches("val")) == []


@pytest.mark.parametrize(("name", "dataset"), [("fashion_mnist_kd", "fashion_mnist"), ("mnist5k_kd", "mnist5k")])
def test_shipped_real_data_configs_validate(name: str, dataset: str) -> None:
    cfg = load_config(name)
    assert cfg.data.name == dataset and cfg.data.image_size == 32 and cfg.teacher is not None
    assert (cfg.teacher.architecture, cfg.student.architecture) == ("lenet5_bn", "lenet5_half")


def test_the_fashion_mnist_configs_cover_every_method_and_share_one_teacher() -> None:
    names = [n for n in shipped_configs() if n.startswith("fashion_mnist_")]
    configs = {n.removeprefix("fashion_mnist_"): load_config(n) for n in names}
    assert set(configs) == set(list_methods())  # every shipped method (dkd had none)
    assert all(cfg.method.name == method and cfg.data.name == "fashion_mnist" for method, cfg in configs.items())
    assert len({cfg.data.model_dump_json(exclude={"batch_size"}) for cfg in configs.values()}) == 1
    taught = {method: teacher_key(cfg) for method, cfg in configs.items() if cfg.teacher is not None}
    assert set(taught) == set(configs) - {"ce", "ekd"} and len(set(taught.values())) == 1  # trained once, shared

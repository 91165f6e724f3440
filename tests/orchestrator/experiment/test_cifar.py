"""CIFAR-10/100 read from torchvision's on-disk layout, written here in that exact layout at a tiny size."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import ConfigError
from orchestrator.experiment.cifar import LAYOUTS, read_cifar
from orchestrator.experiment.config import load_config
from orchestrator.experiment.data import load_splits


def _write(root: Path, name: str, per_file: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The layout's files, each a latin-1 pickle of {'data': N x 3072 uint8, labels key: list} as the originals."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    written = {}
    for file, _ in (*layout.train, *layout.test):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(per_file) % layout.classes).tolist()  # every class, for stratifying
        (folder / file).write_bytes(pickle.dumps({"data": data, layout.labels: labels, "batch_label": file},
                                                 protocol=2))
        written[file] = data
    return written


@pytest.mark.parametrize(("name", "per_file"), [("cifar10", 40), ("cifar100", 400)])
def test_the_on_disk_layout_is_read_without_torchvision(tmp_path: Path, name: str, per_file: int) -> None:
    written = _write(tmp_path, name, per_file, np.random.default_rng(0))
    train_x, train_y, test_x, test_y = read_cifar(name, tmp_path)
    layout = LAYOUTS[name]
    assert train_x.shape == (per_file * len(layout.train), 3, 32, 32) and test_x.shape == (per_file, 3, 32, 32)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64 and train_y.max() < layout.classes
    first = layout.train[0][0]  # the row-major 3072 bytes are channel planes: red, green, blue, 32 x 32 each
    assert np.array_equal(train_x[0, 1].ravel(), written[first][0, 1024:2048])
    splits = load_splits(load_config({"data": {"name": name, "data_dir": str(tmp_path), "val_fraction": 0.25},
                                      "student": {"architecture": "resnet8"}, "method": {"name": "ce"}}).data)
    assert splits.info.num_classes == layout.classes and len(splits.test_y) == per_file
    assert len(splits.train_y) + len(splits.val_y) == per_file * len(layout.train)


def test_a_missing_corrupt_or_hostile_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset 'cifar100' not found in data.data_dir"):
        read_cifar("cifar100", tmp_path)
    _write(tmp_path, "cifar100", 8, np.random.default_rng(1))
    bad = tmp_path / "cifar-100-python" / "test"
    bad.write_bytes(pickle.dumps({"data": np.zeros((8, 100), np.uint8), "fine_labels": [0] * 8}))
    with pytest.raises(ConfigError, match="expected N x 3072 uint8 images"):
        read_cifar("cifar100", tmp_path)

    class Hostile:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    bad.write_bytes(pickle.dumps({"data": Hostile(), "fine_labels": []}))
    with pytest.raises(ConfigError, match="refusing builtins.print"):
        read_cifar("cifar100", tmp_path)
    bad.write_bytes(pickle.dumps({"data": np.zeros((8, 3072), np.uint8), "fine_labels": [100] * 8}))
    with pytest.raises(ConfigError, match="labels outside 0..99"):
        read_cifar("cifar100", tmp_path)

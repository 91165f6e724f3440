"""CIFAR-10 and CIFAR-100 in torchvision's on-disk layout (`cifar-10-batches-py/`, `cifar-100-python/`: the
original python pickles), read with pickle and numpy alone. torchvision checks every file's md5, so no folder but
the full download passes it; here the shapes and labels are checked, and the md5 only when a file is full size,
so a test can write a tiny folder in exactly this layout. Unpickling is restricted to numpy's arrays: a data file
never runs code."""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class _Layout:
    folder: str  # torchvision's base folder under data_dir
    train: tuple[tuple[str, str], ...]  # (file, md5 of the full-size file)
    test: tuple[tuple[str, str], ...]
    labels: str  # the labels' key in each file
    classes: int
    full: tuple[int, int]  # images in the full-size train and test sets


# torchvision's file names and md5 sums (torchvision/datasets/cifar.py)
LAYOUTS = {
    "cifar10": _Layout("cifar-10-batches-py",
                       (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
                       (("test_batch", "40351d587109b95175f43aff81a1287e"),), "labels", 10, (50_000, 10_000)),
    "cifar100": _Layout("cifar-100-python", (("train", "16019d7e3df5f24257cddd939b257f8d"),),
                        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),), "fine_labels", 100, (50_000, 10_000)),
}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
          ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol 2 spells bytes with it


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, dicts, lists and strings and refuses every other class."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR file holds only arrays and lists")


def cifar_folder(name: str, data_dir: str | Path) -> Path:
    """The dataset's folder: `data_dir/<torchvision's folder>` or `data_dir` itself, whichever holds its files."""
    layout, root = LAYOUTS[name], Path(data_dir)
    for folder in (root / layout.folder, root):
        if all((folder / f).is_file() for f, _ in (*layout.train, *layout.test)):
            return folder
    raise ConfigError(f"data.name: dataset '{name}' not found in data.data_dir ({root}/{layout.folder}/ or "
                      f"{root}/); put torchvision's files there, or set data.download=true (needs internet)")


def read_cifar(name: str, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """train images, train labels, test images, test labels: uint8 NCHW (3 x 32 x 32) and int64. ConfigError (one
    line, naming the file) for a missing, unreadable, mis-shaped or (at full size) corrupt file."""
    layout = LAYOUTS[name]
    folder = cifar_folder(name, data_dir)
    out: list[np.ndarray] = []
    for files, full in ((layout.train, layout.full[0]), (layout.test, layout.full[1])):
        parts = [_read_file(folder / file, layout) for file, _ in files]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if len(x) == full:  # the full download: its bytes must be torchvision's
            for file, md5 in files:
                if hashlib.md5((folder / file).read_bytes()).hexdigest() != md5:
                    raise ConfigError(f"data.data_dir: {folder / file} is full size but corrupt (md5 differs from "
                                      "torchvision's); download it again")
        out += [np.ascontiguousarray(x.reshape(-1, 3, 32, 32)), y]
    return out[0], out[1], out[2], out[3]


def _read_file(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"data.data_dir: cannot read {path} as a CIFAR file: {err}") from None
    if not isinstance(entry, dict) or "data" not in entry or layout.labels not in entry:
        raise ConfigError(f"data.data_dir: {path} has no 'data' and '{layout.labels}' (not a {layout.folder} file)")
    x, y = np.asarray(entry["data"]), np.asarray(entry[layout.labels])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise ConfigError(f"data.data_dir: {path} holds images {x.shape} {x.dtype} and labels {y.shape}; expected "
                          "N x 3072 uint8 images and N labels")
    if len(y) and (y.min() < 0 or y.max() >= layout.classes):
        raise ConfigError(f"data.data_dir: {path} has labels outside 0..{layout.classes - 1}")
    return x, y.astype(np.int64)

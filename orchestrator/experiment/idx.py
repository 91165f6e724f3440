"""Raw IDX files (LeCun's MNIST format) and where Fashion-MNIST's four lie: read with gzip and numpy alone."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from orchestrator.errors import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (`make data`)
_FASHION_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                  "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (LeCun's format; gzip-compressed if its name ends in .gz): two zero bytes, a type byte, the
    number of dimensions, each dimension as a big-endian uint32, then the values in row-major order."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ConfigError(f"data.data_dir: cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ConfigError(f"data.data_dir: {path} is not an IDX file (bad magic number)")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:offset], dtype=">u4")) if len(raw) >= offset else None
    if dims is None or len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise ConfigError(f"data.data_dir: {path} is truncated or has trailing bytes (IDX shape {dims})")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims).copy()  # writable, owns its memory


def fashion_mnist_files(data_dir: str | Path, system_dir: str | Path = FASHION_MNIST_DIR) -> dict[str, Path]:
    """The four IDX files, from `data_dir` itself, its `fashion-mnist/` or torchvision's `FashionMNIST/raw/`,
    else from `system_dir`: the first folder that holds all four (each as .gz or uncompressed)."""
    root, system = Path(data_dir), Path(system_dir)
    for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw", system):
        found = {key: next((folder / n for n in (f"{stem}.gz", stem) if (folder / n).is_file()), None)
                 for key, stem in _FASHION_FILES.items()}
        if all(found.values()):
            return {key: path for key, path in found.items() if path is not None}
    raise ConfigError(f"data.name: dataset 'fashion_mnist' not found in data.data_dir ({root}, or its fashion-mnist/ "
                      f"or FashionMNIST/raw/) nor in {system}; install it with `make data` "
                      "(apt-get install dataset-fashion-mnist)")

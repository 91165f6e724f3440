"""The splits as uint8 tensors on the training device, batched by index permutations, with batched on-device
augmentation (random crop with padding, flip) and normalization on the fly."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from orchestrator.experiment.data import Splits


def augment_batch(x: Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (and horizontal flip) for a whole uint8 batch on its device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    if flip:
        mirrored = torch.rand(n, device=x.device, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


class DeviceData:
    """The splits as tensors on one device; batches are index permutations, normalized on the fly."""

    def __init__(self, splits: Splits, device: torch.device, *, channels_last: bool = False) -> None:
        self.info = splits.info
        self.device = device
        self.channels_last = channels_last
        self.tensors = {
            name: (torch.as_tensor(np.array(getattr(splits, f"{name}_x")), device=device),
                   torch.as_tensor(np.array(getattr(splits, f"{name}_y")), device=device))
            for name in ("train", "val", "test")
        }
        self.mean = torch.tensor(splits.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(splits.std, device=device).view(1, -1, 1, 1)
        self.pad = max(1, self.info.image_size // 8)

    def size(self, split: str) -> int:
        return len(self.tensors[split][1])

    def normalize(self, x: Tensor) -> Tensor:
        out = (x.float() / 255.0 - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def train_batches(self, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                      augment: bool = True, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """This rank's share of one epoch: a seeded permutation, equal batch counts on every rank.
        `with_index` also yields each image's training-set index (x, y, index)."""
        x, y = self.tensors["train"]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        order = torch.randperm(len(y), device=self.device, generator=gen)
        order = order[: len(order) // world * world][rank::world]
        local = max(1, batch_size // world)
        for start in range(0, len(order), local):
            idx = order[start:start + local]
            xb = x[idx]
            if augment:
                xb = augment_batch(xb, pad=self.pad, flip=self.info.flip, generator=gen)
            yield (self.normalize(xb), y[idx], idx) if with_index else (self.normalize(xb), y[idx])

    def train_images(self, index: Tensor) -> Tensor:
        """Training images `index`, un-augmented and normalized."""
        return self.normalize(self.tensors["train"][0][index])

    def eval_batches(self, split: str, batch_size: int = 1024) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.tensors[split]
        for start in range(0, len(y), batch_size):
            yield self.normalize(x[start:start + batch_size]), y[start:start + batch_size]

"""The DAFL generator (Chen et al. 2019, arXiv 1904.01186), shared by DAFL and RDSKD (arXiv 2011.03749).

Laid out as `generator.py` of huawei-noah/DAFL and PengchaoHan/RDSKD (docs/METHODS.md section 5), including the
`BatchNorm2d(c, 0.8)` quirk: the second argument of BatchNorm2d is `eps`, so those two layers use eps=0.8.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DAFLGenerator(nn.Module):
    """z (latent_dim) -> Linear -> (C0, s/4, s/4) -> BN -> x2 -> conv C0->C0, BN(eps .8), LReLU(.2) -> x2 ->
    conv C0->C0/2, BN(eps .8), LReLU(.2) -> conv C0/2->channels -> tanh -> BN(channels, affine=False).

    C0 = `base_channels` (128 in the papers, whose second conv goes to 64 = 128/2). The last, non-affine BN
    standardizes each channel over the batch, so images land in the normalized space teacher and student read.
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], base_channels: int = 128) -> None:
        super().__init__()
        channels, height, width = image_shape
        if height != width or height % 4:
            raise ValueError(f"the DAFL generator needs square images whose side is a multiple of 4 "
                             f"(8, 28, 32, ...); got {height}x{width}")
        self.latent_dim = latent_dim
        self.base_channels = base_channels
        self.init_size = height // 4
        self.l1 = nn.Linear(latent_dim, base_channels * self.init_size**2)
        self.conv_blocks0 = nn.BatchNorm2d(base_channels)
        self.conv_blocks1 = nn.Sequential(
            nn.Conv2d(base_channels, base_channels, 3, stride=1, padding=1),
            nn.BatchNorm2d(base_channels, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
        )
        half = max(1, base_channels // 2)
        self.conv_blocks2 = nn.Sequential(
            nn.Conv2d(base_channels, half, 3, stride=1, padding=1),
            nn.BatchNorm2d(half, eps=0.8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(half, channels, 3, stride=1, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], self.base_channels, self.init_size, self.init_size)
        img = F.interpolate(self.conv_blocks0(out), scale_factor=2)  # nearest, as the reference code
        img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
        return self.conv_blocks2(img)

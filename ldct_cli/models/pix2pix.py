"""Pix2Pix U-Net generator (Isola et al., CVPR 2017).

As Lalithnarayan, Somayaji and Shaikh build it in "Denoising of Low Dose CT Images Using
Generative Models", §8.3.1.

Encoder: 4x4 stride-2 convolutions, LeakyReLU(0.2), BatchNorm (not on the first layer).
Decoder: 4x4 stride-2 transposed convolutions, ReLU, BatchNorm, dropout 0.5 in the first
``n_dropout`` (innermost) decoder blocks; each decoder block's output is concatenated
with the mirror encoder block's. tanh output in [-1, 1]. Lalithnarayan et al. use 7 down / 7 up.

As in the authors' reference code, the innermost (bottleneck) convolution has no
BatchNorm: with batch size 1 and a 1x1 bottleneck it would zero the activations.
Widths double from ``base_channels`` up to ``max_channels``. The defaults are the paper's
64/512 (41.8 M parameters, 167 MB in float32); the registered variant ``pix2pix_small``
is 32/256 (10,458,721 parameters, 42 MB), the width that trains on a CPU and fits in git.
"""

from __future__ import annotations

import torch
from torch import nn


class UNetGenerator(nn.Module):
    """(B, in_slices, H, W) in [-1, 1] -> (B, 1, H, W); H and W multiples of 2**depth."""

    # Training on the CPU runs this network faster in the default layout than channels-last
    # (measured 0.096 vs 0.101 s per 256x256 step on 2 cores); RED-CNN and WGAN-VGG gain 1.4-1.8x.
    cpu_channels_last = False

    def __init__(self, in_slices: int = 1, base_channels: int = 64, max_channels: int = 512,
                 depth: int = 7, n_dropout: int = 3, dropout: float = 0.5):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2")
        self.context_slices = in_slices
        self.size_multiple = 2 ** depth
        self.halo = None  # every output pixel sees the whole image: tile with wide overlap
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(depth)]

        self.down = nn.ModuleList()
        for i in range(depth):
            c_in = in_slices if i == 0 else widths[i - 1]
            first, innermost = i == 0, i == depth - 1
            block: list[nn.Module] = [] if first else [nn.LeakyReLU(0.2, inplace=True)]
            block.append(nn.Conv2d(c_in, widths[i], 4, stride=2, padding=1, bias=first or innermost))
            if not (first or innermost):
                block.append(nn.BatchNorm2d(widths[i]))
            self.down.append(nn.Sequential(*block))

        self.up = nn.ModuleList()
        for n, i in enumerate(reversed(range(depth))):
            c_in = widths[i] if i == depth - 1 else 2 * widths[i]
            outermost = i == 0
            c_out = 1 if outermost else widths[i - 1]
            block = [nn.ReLU(inplace=True),
                     nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=outermost)]
            if outermost:
                block.append(nn.Tanh())
            else:
                block.append(nn.BatchNorm2d(c_out))
                if n < n_dropout:
                    block.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.up[0](skips.pop())
        for block in self.up[1:]:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return x

"""CT autoencoder (SACNN, Li et al., TMI 2020): the ``ct_features`` network of the registry.

Trained on full-dose CT patches; its encoder gives the CT-native features of the
perceptual loss (``--perceptual ct``, ``ldct_cli.training.perceptual``).
"""

from __future__ import annotations

import torch
from torch import nn


class CtAutoencoder(nn.Module):
    """Full-dose CT autoencoder (SACNN, Li et al., TMI 2020): (B, in_slices, H, W) -> (B, 1, H, W).

    Trained to reconstruct normal-dose patches in the unit range (HU + 1024) / 4096; its
    encoder, (B, in_slices, H, W) -> (B, 4 * channels, H/4, W/4), gives CT-native
    perceptual features. Encoder: 3x3 convs with ``channels``, ``channels`` (stride 2),
    2x, 2x (stride 2), 4x filters, ReLU after each; the decoder mirrors it with 4x4
    stride-2 transposed convolutions and ends in a linear 3x3 conv to one channel.
    """

    size_multiple = 4
    cpu_channels_last = True

    def __init__(self, in_slices: int = 1, channels: int = 32):
        super().__init__()
        self.context_slices = in_slices
        self.halo = None  # two down/up-samplings: tile with a wide overlap
        c1, c2, c3 = channels, 2 * channels, 4 * channels
        self.feature_channels = c3
        self.encoder = nn.Sequential(
            nn.Conv2d(in_slices, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c1, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, c1, 4, stride=2, padding=1), nn.ReLU(),
            # Linear output: the reconstruction target is the image itself, not a class.
            nn.Conv2d(c1, 1, 3, padding=1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_slices, H, W) -> (B, 4 * channels, ceil(H/4), ceil(W/4)) features."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_slices, H, W), H and W multiples of 4 -> (B, 1, H, W) reconstruction."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            # The stride-2 layers round odd sizes; the decoder could not restore them.
            raise ValueError(f"CtAutoencoder needs H and W multiples of {self.size_multiple}, "
                             f"got {height}x{width}")
        return self.decoder(self.encoder(x))

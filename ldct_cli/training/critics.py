"""Discriminators of the adversarial recipes: the WGAN-VGG critic and the PatchGAN.

``WganCritic`` follows Yang et al., IEEE TMI 37(6), 2018 (WGAN-VGG); ``PatchGanDiscriminator``
follows the 70x70 PatchGAN of Isola et al., CVPR 2017 (Pix2Pix).
"""

from __future__ import annotations

import torch
from torch import nn

# (out_channels, stride) of the six 3x3 convolutions of Yang et al.'s critic.
_WGAN_CONVS = ((64, 1), (64, 2), (128, 1), (128, 2), (256, 1), (256, 2))


def _conv_out_size(size: int, *, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution along one axis (PyTorch's floor rule)."""
    return (size + 2 * padding - kernel) // stride + 1


class WganCritic(nn.Module):
    """WGAN-VGG critic (Yang et al., TMI 2018): (B, C, P, P) -> (B,) unbounded scores.

    Six 3x3 convolutions (64, 64, 128, 128, 256, 256 filters; strides 1, 2, 1, 2, 1, 2;
    padding 1), each followed by LeakyReLU(0.2), then Linear -> 1024, LeakyReLU(0.2),
    Linear -> 1. There is no batch norm: the gradient penalty of WGAN-GP constrains the
    gradient of each sample's score on its own input, which batch norm would couple
    across the batch. No sigmoid either: a Wasserstein critic outputs a raw score.
    """

    def __init__(self, in_channels: int = 1, patch_size: int = 64):
        super().__init__()
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        c_in, size_px = in_channels, patch_size
        for c_out, stride in _WGAN_CONVS:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
            size_px = _conv_out_size(size_px, kernel=3, stride=stride, padding=1)
        if size_px < 1:
            raise ValueError(f"patch_size {patch_size} is too small for the critic's three stride-2 layers")
        self.features = nn.Sequential(*layers)
        # patch 64 -> 8x8 maps of 256 channels after the three stride-2 layers.
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * size_px * size_px, 1024),
            nn.LeakyReLU(0.2),
            nn.Linear(1024, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, P, P) patches -> (B,) critic scores."""
        if tuple(x.shape[-2:]) != (self.patch_size, self.patch_size):
            # The fully connected layer fixes the input size; a silent mismatch would
            # only surface as an obscure matmul shape error.
            raise ValueError(f"WganCritic was built for {self.patch_size}x{self.patch_size} patches, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        return self.head(self.features(x)).squeeze(1)


class SimpleCnnCritic(nn.Module):
    """The WGAN-GP critic of Ryu, "LDCT Denoising With REDCNN & WGAN-GP": (B, C, P, P) -> (B,).

    Five convolutions, 3x3/64 s1, 5x5/128 s3, 3x3/128 s1, 5x5/128 s3, 3x3/1 (padding 1,
    1, 1, 1, 0), LeakyReLU(0.2) between them; no normalization, no sigmoid. The last map
    (5x5 for 64-pixel patches) is averaged into one score per patch, the mean that work's
    losses take. Fully convolutional: any patch of 31 pixels or more.
    """

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 5, stride=3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 128, 5, stride=3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 1, 3, stride=1, padding=0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, P, P) patches -> (B,) critic scores."""
        return self.model(x).mean(dim=(1, 2, 3))


class PatchGanDiscriminator(nn.Module):
    """70x70 PatchGAN (Isola et al., CVPR 2017): (B, in_channels, H, W) -> (B, 1, h, w) logits.

    C64-C128-C256-C512 then a 1-channel convolution, where Ck = Conv 4x4 - BatchNorm -
    LeakyReLU(0.2); no BatchNorm in the first layer; stride 2 in the first ``n_layers``
    layers and stride 1 in the last two; padding 1. Each output logit judges one
    70x70 patch of the (condition, image) pair stacked as channels (``in_channels`` = 2
    for one low-dose and one full-dose slice). The outputs are raw logits: the loss
    applies ``BCEWithLogitsLoss``, the numerically stable form of sigmoid + BCE.
    """

    def __init__(self, in_channels: int = 2, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be at least 1")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        c_in = base_channels
        for i in range(1, n_layers + 1):
            # Widths double up to 8x base (512 for the paper's 64), as in pix2pix.
            c_out = base_channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            # No conv bias before BatchNorm: its shift would be cancelled by BN's mean.
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 1, h, w) logits; 256x256 gives 30x30."""
        return self.net(x)


def receptive_field(disc: nn.Module) -> int:
    """Receptive field in pixels of one output of a convolutional stack (70 for the default PatchGAN).

    Each convolution widens the field by (kernel - 1) times the product of the strides
    before it; padding does not change the field's size.
    """
    field_px, jump_px = 1, 1
    for module in disc.modules():
        if isinstance(module, nn.Conv2d):
            kernel, stride = module.kernel_size[0], module.stride[0]
            field_px += (kernel - 1) * jump_px
            jump_px *= stride
    return field_px


def init_pix2pix_weights(module: nn.Module) -> None:
    """pix2pix initialisation, for ``model.apply``: conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)

"""The cascade of Ataei, Alirezaie and Babyn: DRL with perceptual loss, then difference networks.

S. Ataei, J. Alirezaie, P. Babyn, "Cascaded Convolutional Neural Networks with Perceptual
Loss for Low Dose CT Denoising", 2020.

Level 1 is the DRL network (dilated residual learning with an edge-detection layer,
Gholizadeh-Ansari et al., J. Digit. Imaging 2019; Ataei et al., Fig. 1), trained on the
perceptual loss. Each further level is a CNN10 (Wu et al. 2017; Ataei et al., Fig. 4)
trained with MSE to predict the difference between the previous level's output and
the full dose; inference subtracts it. The ``cascade`` training recipe trains the
levels in order, each with the ones before it frozen.

Ataei et al. give DRL only as a figure. Its text fixes the parts and the size: a
non-trainable edge layer (horizontal, vertical and two diagonal edges), dilated 3x3
convolutions of 64 filters, shortcut connections from early to late layers, and
225,601 parameters. The layout here has exactly that count: the image and its four
edge maps (5 channels) -> 7 convolutions with dilations 1, 2, 3, 4, 3, 2, 1, the
sixth reading its input concatenated with the second's output and the seventh with
the first's; the output is the input minus the predicted noise (residual learning).
Which layers the shortcuts join is our reading of the figure. CNN10's 335,873
parameters (as Keras counts them, BatchNorm statistics included) fit a first
Conv+ReLU, nine Conv+BN+ReLU blocks and a last 1-channel convolution, all 3x3 with 64
filters, which is what is built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DRL_DILATIONS = (1, 2, 3, 4, 3, 2, 1)


def sobel_kernels() -> torch.Tensor:
    """(4, 1, 3, 3): Sobel operators for horizontal, vertical and the two diagonal edges."""
    horizontal = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])
    diagonal = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    return torch.stack([horizontal, horizontal.T, diagonal, diagonal.flip(1)])[:, None]


class EdgeLayer(nn.Module):
    """The fixed (non-trainable) edge-detection layer: (B, 1, H, W) -> (B, 4, H, W)."""

    def __init__(self):
        super().__init__()
        # A buffer, not a parameter: no optimizer can move it, and checkpoints record it.
        self.register_buffer("kernels", sobel_kernels())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernels.to(x.dtype), padding=1)


class DRL(nn.Module):
    """Dilated residual network with an edge layer: (B, in_slices, H, W) in [0, 1] -> (B, 1, H, W).

    225,601 trainable parameters with 64 channels and one input slice (the paper's count).
    """

    size_multiple = 1
    cpu_channels_last = True

    def __init__(self, in_slices: int = 1, channels: int = 64):
        super().__init__()
        self.context_slices = in_slices
        self.halo = 1 + sum(DRL_DILATIONS)  # the edge layer's 3x3, then each dilated 3x3
        self.edges = EdgeLayer()
        c = channels
        inputs = [in_slices + 4, c, c, c, c, 2 * c, 2 * c]
        outputs = [c] * 6 + [1]
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, 3, padding=d, dilation=d) for i, o, d in zip(inputs, outputs, DRL_DILATIONS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2:x.shape[1] // 2 + 1]
        out1 = torch.relu(self.convs[0](torch.cat([x, self.edges(centre)], 1)))
        out2 = torch.relu(self.convs[1](out1))
        out = torch.relu(self.convs[2](out2))
        out = torch.relu(self.convs[3](out))
        out = torch.relu(self.convs[4](out))
        out = torch.relu(self.convs[5](torch.cat([out, out2], 1)))
        noise = self.convs[6](torch.cat([out, out1], 1))
        return centre - noise


class CNN10(nn.Module):
    """Wu et al.'s difference network: (B, 1, H, W) image -> (B, 1, H, W) predicted difference.

    Conv+ReLU, nine Conv+BatchNorm+ReLU blocks, a last conv to one channel; 3x3, 64 filters.
    """

    size_multiple = 1
    cpu_channels_last = True

    def __init__(self, channels: int = 64, blocks: int = 9):
        super().__init__()
        self.halo = blocks + 2
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        last = nn.Conv2d(channels, 1, 3, padding=1)
        # Starts by predicting no difference, so adding a level starts from the previous
        # level's output. With torch's default initialisation the untrained network's
        # output is far from zero, and its training began by unlearning that: in a CPU run
        # on the abdomen (README), validation PSNR fell from DRL's 21.93 dB to 20.40 dB 40
        # steps into stage 2 and was still 21.69 dB after 160. The paper does not say how
        # it initialised CNN10.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Cascade(nn.Module):
    """DRL followed by ``levels - 1`` difference networks: (B, in_slices, H, W) -> (B, 1, H, W).

    ``trained_levels`` (a buffer, so checkpoints carry it) says how many levels have been
    trained; the forward pass runs those only, so a checkpoint saved while DRL alone was
    trained denoises with DRL alone, not through an untrained CNN10.
    """

    size_multiple = 1
    cpu_channels_last = True

    def __init__(self, levels: int = 2, in_slices: int = 1, channels: int = 64):
        super().__init__()
        if levels < 1:
            raise ValueError(f"a cascade has at least one level (DRL), got {levels}")
        self.context_slices = in_slices
        self.levels = levels
        self.drl = DRL(in_slices=in_slices, channels=channels)
        self.diffs = nn.ModuleList(CNN10(channels=channels) for _ in range(levels - 1))
        self.halo = self.drl.halo + sum(net.halo for net in self.diffs)
        self.register_buffer("trained_levels", torch.tensor(levels, dtype=torch.int64))

    def level_output(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """The cascade's output after its first ``levels`` levels (1 = DRL alone)."""
        out = self.drl(x)
        for net in self.diffs[:levels - 1]:
            out = out - net(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.level_output(x, int(self.trained_levels))

"""CPCA / CPCE (Shan et al.): contracting path convolutional autoencoder for low-dose CT.

Four 3x3 convolutions (stride 1, no padding, ReLU) shrink the image by 1 px per side
each; four 3x3 transposed convolutions grow it back. After each of the first three
transposed convolutions the feature maps are concatenated with the encoder's maps of the
same size (conv3, conv2, conv1: the "contracting path") and a 1x1 convolution takes the 64
maps back to 32 (Shan et al., "Transfer Learning for Low-Dose CT Denoising", "Network
Parameters"). 32 maps everywhere but the output; ReLU after every layer, the last one
included, so the output is a non-negative image in [0, 1] model units. With one input slice the network has 62,337 parameters.

2.5D/3D (CPCA-k, k = 3, 5, 7 adjacent slices): the k slices are a depth axis and the first
(k - 1) / 2 convolutions become 3x3x3 convolutions without depth padding, each using up two
planes, so that the depth is 1 when the 2D layers take over. A trained 2D model initialises
the 3D one with ``inflate_from`` (Shan et al., "Transfer Learning for Low-Dose CT Denoising",
"2D filter to 3D filter"): each 3D kernel gets the 2D kernel on its centre plane and zeros
elsewhere, which makes the 3D network compute exactly what the 2D one does on the centre
slice before fine-tuning starts.
"""

from __future__ import annotations

import torch
from torch import nn

SLICE_COUNTS = (1, 3, 5, 7)


class CPCA(nn.Module):
    """CPCA generator: (B, in_slices, H, W) in [0, 1] -> (B, 1, H, W); any H, W >= 9.

    Built from keyword arguments alone (``in_slices``, ``channels``), so a checkpoint's
    stored kwargs rebuild it.
    """

    size_multiple = 1
    # Training on the CPU runs faster channels-last. 10 forward+backward+Adam steps on a
    # 16x1x64x64 batch, from minimum step times on a busy 2-core host: 2 threads 10.3 s
    # against 15.4 s in the default layout; 1 thread 2.4 s against 2.9 s. On 1 thread
    # in_slices=3, 5 and 7 gain 13-16% too, with the Conv3d kernels in the 3D channels-last
    # layout (``ldct_cli.models.layout.to_channels_last``).
    cpu_channels_last = True

    def __init__(self, in_slices: int = 1, channels: int = 32):
        super().__init__()
        if in_slices not in SLICE_COUNTS:
            raise ValueError(f"CPCA takes in_slices in {SLICE_COUNTS}, got {in_slices}")
        if channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.context_slices = in_slices
        self.channels = channels
        # Each 3x3 layer (4 conv + 4 deconv) sees one more pixel on every side; the 1x1
        # layers add nothing, and the 3x3x3 layers see as far in-plane as the 2D ones.
        self.halo = 8
        # Leading encoder layers that are 3D: each takes the depth from d to d - 2.
        self.depth_layers = (in_slices - 1) // 2
        c = channels
        self.encoder = nn.ModuleList(
            [nn.Conv3d(1 if i == 0 else c, c, 3) if i < self.depth_layers
             else nn.Conv2d(in_slices if i == 0 else c, c, 3)
             for i in range(4)]
        )
        self.decoder = nn.ModuleList([nn.ConvTranspose2d(c, 1 if i == 3 else c, 3) for i in range(4)])
        # 1x1 convolutions after each contracting-path concatenation: 2c maps -> c.
        self.reduce = nn.ModuleList([nn.Conv2d(2 * c, c, 1) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.context_slices:
            raise ValueError(f"CPCA expects (B, {self.context_slices}, H, W), got {tuple(x.shape)}")
        # The slices become a depth axis of one channel. unsqueeze is a view for any strides,
        # a channels-last batch included.
        out = x.unsqueeze(1) if self.depth_layers else x
        copies = []
        for conv in self.encoder:
            out = torch.relu(conv(out))
            if out.ndim == 5 and out.shape[2] == 1:
                out = out[:, :, 0]  # the depth is used up: 2D from here on
            # A 3D layer's copy for the contracting path is its centre plane: the maps
            # centred on the slice being denoised, the only ones the 2D decoder can align.
            copies.append(out[:, :, out.shape[2] // 2] if out.ndim == 5 else out)
        # deconv5..7 meet conv3, conv2, conv1 (the last conv's output is not copied).
        for deconv, reduce, skip in zip(self.decoder, self.reduce, reversed(copies[:3])):
            out = torch.relu(deconv(out))
            out = torch.relu(reduce(torch.cat([out, skip], dim=1)))
        return torch.relu(self.decoder[3](out))

    def inflate_from(self, source: CPCA) -> None:
        """Initialise this model from a trained 2D CPCA (the 2D-to-3D transfer of
        Shan et al., "Transfer Learning for Low-Dose CT Denoising").

        Every 3x3x3 kernel B gets B[:, :, 1] = H (the 2D kernel) and zeros on the other two
        depth planes; biases and 2D layers are copied. The copy then computes, on a k-slice
        stack, the 2D network's output on the centre slice: a zero plane adds nothing, and
        the centre plane of every 3D layer is the 2D layer applied to the centre planes.
        """
        if not isinstance(source, CPCA):
            raise TypeError(f"inflate_from needs a CPCA, got {type(source).__name__}")
        if source.context_slices != 1:
            raise ValueError(f"inflate_from needs a 2D CPCA (in_slices=1) as source, "
                             f"got in_slices={source.context_slices}")
        if source.channels != self.channels:
            raise ValueError(f"inflate_from needs a source with the same channels ({self.channels}), "
                             f"got channels={source.channels}")
        # Same layer names in both models by construction; only the kernels' ranks differ.
        wanted = dict(source.named_parameters())
        with torch.no_grad():
            for name, target in self.named_parameters():
                weight = wanted[name]
                if target.shape == weight.shape:
                    target.copy_(weight)
                elif target.ndim == 5 and target.shape[:2] + target.shape[3:] == weight.shape:
                    target.zero_()
                    target[:, :, target.shape[2] // 2].copy_(weight)
                else:  # unreachable for two CPCAs of equal width; a guard, not a feature
                    raise ValueError(f"{name}: cannot inflate {tuple(weight.shape)} to {tuple(target.shape)}")

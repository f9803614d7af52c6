"""Run a generator on whole CT slices of any size: HU in, HU out, batched, optionally tiled.

The model's declared contract does the rest: ``hu_norm`` maps HU to its input range,
``size_multiple`` says what the matrix is padded to (reflect, then cropped back),
``context_slices`` how many neighbouring slices it reads (2.5D), and ``halo`` how far
one output pixel sees (``None``: the whole image), which sets the tile overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldct_cli.errors import UsageError
from ldct_cli.models.layout import to_channels_last
from ldct_cli.models.normalization import HUNormalization
from ldct_cli.precision import PRECISIONS

_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Overlap for models that see the whole image (U-Net): the feathered seam is this wide.
GLOBAL_MODEL_OVERLAP = 64


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def effective_precision(precision: str, device: torch.device) -> str:
    """Reduced precision only on CUDA: on a CPU without native bf16 it ran ~250x slower here."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision if device.type == "cuda" else "fp32"


def _axis_windows(length: int, core: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis: (window start, window end, core start, core end).

    Cores of ``core`` pixels cover the axis; each window adds ``margin`` pixels of
    context on both sides (clipped to the axis).
    """
    out = []
    for start in range(0, length, core):
        end = min(start + core, length)
        out.append((max(0, start - margin), min(length, end + margin), start, end))
    return out


def _axis_weights(window: tuple[int, int, int, int], length: int, feather: int) -> np.ndarray:
    """Blending weight of each window pixel along one axis.

    ``feather == 0`` (finite receptive field): 1 on the core, 0 on the margins, so the
    tiled result equals the untiled one. ``feather > 0``: linear ramps across the
    overlap, so neighbouring windows fade into each other with no visible seam.
    """
    w_start, w_end, c_start, c_end = window
    x = np.arange(w_start, w_end, dtype=np.float64) + 0.5
    if feather == 0:
        return ((x >= c_start) & (x < c_end)).astype(np.float32)
    weight = np.ones_like(x)
    if w_start > 0:
        weight = np.minimum(weight, (x - w_start) / (2 * feather))
    if w_end < length:
        weight = np.minimum(weight, (w_end - x) / (2 * feather))
    return np.clip(weight, 1e-3, 1.0).astype(np.float32)


@dataclass
class Denoiser:
    """A loaded generator on a device, applied to stacks of HU slices.

    ``model`` is a module built by ``create_model`` / ``load_checkpoint`` (in eval mode);
    ``hu_norm`` is the normalization it was trained with (the checkpoint's).
    """

    model: torch.nn.Module
    hu_norm: HUNormalization
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 4
    tile: int | None = None  # core size in pixels; None: whole slices

    def __post_init__(self):
        self.precision = effective_precision(self.precision, self.device)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.tile is not None and self.tile < 16:
            raise UsageError("--tile must be at least 16 pixels")
        model = self.model
        if hasattr(model, "inference_variant"):
            model = model.inference_variant()
        model = model.eval().to(self.device)
        if self.device.type == "cuda":
            # Slices of one series share a shape: let cuDNN pick its fastest kernels once.
            torch.backends.cudnn.benchmark = True
        # channels_last: faster convolutions with CUDA tensor cores, and on a CPU (oneDNN) for
        # the networks that say so (CtNetwork.cpu_channels_last).
        channels_last = self.device.type == "cuda" or self.model.cpu_channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = to_channels_last(model) if channels_last else model
        self.context_slices = self.model.context_slices
        self.size_multiple = self.model.size_multiple
        halo = self.model.halo
        self.margin = int(halo) if halo is not None else GLOBAL_MODEL_OVERLAP
        self.feather = 0 if halo is not None else GLOBAL_MODEL_OVERLAP

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model units in, model units out; (N, k, h, w) padded to ``size_multiple`` and back."""
        h, w = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        outputs = []
        for chunk in x.split(self.batch_size):
            chunk = chunk.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            if self.precision == "fp32":
                y = self.net(chunk)
            else:
                with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPE[self.precision]):
                    y = self.net(chunk)
            outputs.append(y.float().cpu())
        return torch.cat(outputs)[..., :h, :w]

    def __call__(self, stack_hu: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray:
        """Denoise (B, k, H, W) HU stacks (k = ``context_slices``) into (B, H, W) HU.

        ``pixel_mm`` is accepted for the pipeline's sake and unused: the networks work in
        pixels, as they were trained.
        """
        if stack_hu.ndim != 4 or stack_hu.shape[1] != self.context_slices:
            raise ValueError(f"expected (B, {self.context_slices}, H, W), got {stack_hu.shape}")
        x = torch.from_numpy(np.ascontiguousarray(self.hu_norm.to_model(stack_hu), dtype=np.float32))
        height, width = x.shape[-2:]
        if self.tile is None or (height <= self.tile and width <= self.tile):
            y = self._forward(x)
        else:
            y = self._tiled(x)
        return self.hu_norm.to_hu(y[:, 0].numpy())

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Tile-by-tile forward pass with overlapping windows, blended by ``_axis_weights``."""
        n, _, height, width = x.shape
        total = torch.zeros((n, 1, height, width))
        weight_sum = torch.zeros((1, 1, height, width))
        rows = _axis_windows(height, self.tile, self.margin)
        cols = _axis_windows(width, self.tile, self.margin)
        for r in rows:
            wy = torch.from_numpy(_axis_weights(r, height, self.feather))
            for c in cols:
                wx = torch.from_numpy(_axis_weights(c, width, self.feather))
                weight = (wy[:, None] * wx[None, :])[None, None]
                y = self._forward(x[..., r[0]:r[1], c[0]:c[1]])
                total[..., r[0]:r[1], c[0]:c[1]] += y * weight
                weight_sum[..., r[0]:r[1], c[0]:c[1]] += weight
        return total / weight_sum


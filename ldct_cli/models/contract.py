"""The contracts ldct-cli's code relies on: a network's capabilities, and a slice denoiser.

Every registered network class states each attribute of ``CtNetwork`` itself (no
``getattr`` defaults anywhere); ``create_model`` and ``load_checkpoint`` attach the
three provenance attributes. ``tests/unit/test_models.py`` checks every registered model
against it. ``SliceDenoiser`` is what ``ldct denoise`` and ``ldct evaluate`` call: the
network wrapper (``inference.Denoiser``) and the classical filters alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ldct_cli.models.normalization import HUNormalization


@runtime_checkable
class CtNetwork(Protocol):
    """A registered network (a ``torch.nn.Module``): (B, k, H, W) model units in, (B, 1, H, W) out."""

    context_slices: int  # k adjacent input slices; the output is the centre slice's
    size_multiple: int  # H and W must be multiples of it (inference pads to it)
    halo: int | None  # receptive radius in pixels (the tiling overlap); None: the whole image
    cpu_channels_last: bool  # faster in the channels-last layout on a CPU (on CUDA it always is)
    # Attached by create_model and load_checkpoint (what save_checkpoint records):
    ldct_name: str
    ldct_kwargs: dict[str, Any]
    hu_norm: HUNormalization

    def __call__(self, x: Any) -> Any: ...


@runtime_checkable
class SliceDenoiser(Protocol):
    """(B, k, H, W) HU stacks in, (B, H, W) HU out; ``pixel_mm`` for filters that work in mm."""

    context_slices: int
    batch_size: int

    def __call__(self, stack_hu: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray: ...

"""Classical, weight-free denoisers (seed 000 §2.2.1): non-local means, total variation, BM3D.

They take the trained models' place in ``ldct denoise --model NAME`` and
``ldct evaluate --model NAME``: called on ``(B, 1, H, W)`` HU stacks, they return
``(B, H, W)`` HU. Their one parameter, the strength, is in HU, so it means the same on
every scanner's stored values: NLM's filtering parameter h, the TV weight, BM3D's noise
standard deviation. scikit-image provides NLM and TV; BM3D needs the optional ``bm3d``
package (non-commercial licence, closed binary), installed only on request.

Default strengths: NLM's h = 120 HU and the TV weight = 100 HU are the PSNR-best values
on 4 validation slices of the real abdomen at simulated quarter dose ([-160, 240] HU;
tools/bundle_weights.py tunes them). Other doses and kernels need their own
(`--strength`). BM3D's 60 HU is not tuned here (the package is not installed); it is of
the order of that quarter dose's noise SD.
"""

from __future__ import annotations

import numpy as np

from ldct_cli.errors import UsageError


class ClassicalDenoiser:
    """A per-slice filter with the Denoiser interface (``context_slices``, ``batch_size``, call)."""

    context_slices = 1
    batch_size = 1
    precision = "fp32"
    strength_name = "strength"

    def __init__(self, strength_hu: float):
        if not strength_hu > 0:
            raise UsageError(f"{type(self).__name__}: the strength must be > 0 HU, got {strength_hu}")
        self.strength_hu = float(strength_hu)

    def filter(self, image_hu: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, stack_hu: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray:
        if stack_hu.ndim != 4 or stack_hu.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W), got {stack_hu.shape}")
        return np.stack([self.filter(np.asarray(s[0], np.float64)) for s in stack_hu]).astype(np.float32)

    def describe(self) -> str:
        raise NotImplementedError


class NonLocalMeans(ClassicalDenoiser):
    """scikit-image's fast non-local means: 5x5 patches searched within 6 pixels (a 13x13 area)."""

    strength_name = "h"

    def __init__(self, strength_hu: float = 120.0, patch_size: int = 5, patch_distance: int = 6):
        super().__init__(strength_hu)
        self.patch_size, self.patch_distance = int(patch_size), int(patch_distance)

    def filter(self, image_hu: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        return denoise_nl_means(image_hu, h=self.strength_hu, patch_size=self.patch_size,
                                patch_distance=self.patch_distance, fast_mode=True)

    def describe(self) -> str:
        return (f"non-local means (scikit-image, fast), h {self.strength_hu:g} HU, patch {self.patch_size}, "
                f"distance {self.patch_distance}")


class TotalVariation(ClassicalDenoiser):
    """scikit-image's Chambolle total-variation denoising; the weight is in HU."""

    strength_name = "weight"

    def __init__(self, strength_hu: float = 100.0):
        super().__init__(strength_hu)

    def filter(self, image_hu: np.ndarray) -> np.ndarray:
        from skimage.restoration import denoise_tv_chambolle

        # Chambolle's algorithm takes the weight in the image's units: scale to ~unit range
        # and back, so its stopping tolerance means the same for HU images.
        scale = 1000.0
        return denoise_tv_chambolle(image_hu / scale, weight=self.strength_hu / scale) * scale

    def describe(self) -> str:
        return f"total variation (scikit-image, Chambolle), weight {self.strength_hu:g} HU"


class Bm3d(ClassicalDenoiser):
    """BM3D (the ``bm3d`` package, an opt-in extra); the strength is the noise SD in HU."""

    strength_name = "sigma"

    def __init__(self, strength_hu: float = 60.0):
        super().__init__(strength_hu)
        try:
            import bm3d  # noqa: F401
        except ImportError:
            raise UsageError("bm3d needs the optional 'bm3d' package (non-commercial licence, closed "
                             "binary): pip install 'ldct-cli[bm3d]'") from None

    def filter(self, image_hu: np.ndarray) -> np.ndarray:
        import bm3d

        return np.asarray(bm3d.bm3d(image_hu, sigma_psd=self.strength_hu), np.float64)

    def describe(self) -> str:
        return f"BM3D (bm3d package), noise sigma {self.strength_hu:g} HU"

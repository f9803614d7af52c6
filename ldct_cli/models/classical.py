"""Classical, weight-free denoisers: non-local means, total variation, BM3D.

The baselines of Lalithnarayan, Somayaji and Shaikh, "Denoising of Low Dose CT Images Using
Generative Models", §2.2.1.

They take the trained models' place in ``ldct denoise --model NAME`` and
``ldct evaluate --model NAME``: called on ``(B, 1, H, W)`` HU stacks, they return
``(B, H, W)`` HU. Their one parameter, the strength, is in HU, so it means the same on
every scanner's stored values: NLM's filtering parameter h, the TV weight, BM3D's noise
standard deviation. scikit-image provides NLM and TV; BM3D needs the optional ``bm3d``
package (non-commercial licence, closed binary), installed only on request.

Default strength "auto": a fixed factor times the noise SD the input itself shows
(``physics.noise``, measured per series by the pipeline, per slice otherwise), so a
low-noise scan is filtered lightly and a noisy one hard. The factors (h = 0.9 SD for NLM,
weight = 0.6 SD for TV) are the PSNR-best ones ([-160, 240] HU) on scan-matched simulated
doses of real series in ../shared/data/ct, and hold within 0.5 dB of the best swept
strength on the real AAPM/Mayo quarter doses (docs/simulation.md). BM3D takes the SD as
its sigma (factor 1; not tuned, the package is not installed here). A number given as
the strength fixes it for every series.
"""

from __future__ import annotations

import math

import numpy as np

from ldct_cli.errors import UsageError

# When an image shows no measurable noise (too little soft tissue), the automatic strength
# falls back to this SD: a routine abdomen's full-dose noise.
FALLBACK_NOISE_SD_HU = 20.0


def _measured_sd(images_hu: list[np.ndarray]) -> float:
    """The noise SD [HU] the images show (physics.noise); FALLBACK_NOISE_SD_HU when none is measurable."""
    from ldct_cli.physics.noise import series_noise_sd

    found = series_noise_sd(images_hu)
    return FALLBACK_NOISE_SD_HU if found is None else found[0]


class ClassicalDenoiser:
    """A per-slice filter with the Denoiser interface (``context_slices``, ``batch_size``, call)."""

    context_slices = 1
    batch_size = 1
    precision = "fp32"
    strength_name = "strength"
    auto_factor = 1.0  # strength = auto_factor x the input's measured noise SD, when automatic

    def __init__(self, strength_hu: float | None = None):
        if strength_hu is not None and not (strength_hu > 0 and math.isfinite(strength_hu)):
            raise UsageError(f"{type(self).__name__}: the strength must be > 0 HU, got {strength_hu}")
        self.strength_hu = None if strength_hu is None else float(strength_hu)
        self.noise_sd_hu: float | None = None  # what an automatic strength was set from

    @property
    def automatic(self) -> bool:
        return self.strength_hu is None or self.noise_sd_hu is not None

    def filter(self, image_hu: np.ndarray, strength_hu: float) -> np.ndarray:
        raise NotImplementedError

    def strength_for(self, noise_sd_hu: float) -> float:
        return round(self.auto_factor * noise_sd_hu, 1)

    def __call__(self, stack_hu: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray:
        if stack_hu.ndim != 4 or stack_hu.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W), got {stack_hu.shape}")
        out = []
        for s in stack_hu:
            image = np.asarray(s[0], np.float64)
            strength = self.strength_hu
            if strength is None:  # not adapted to a series: this slice's own noise
                strength = self.strength_for(_measured_sd([image]))
            out.append(self.filter(image, strength))
        return np.stack(out).astype(np.float32)

    def adapt_to_series(self, series, derivation):
        """A copy whose automatic strength follows ``series``' measured noise (up to 12 slices),
        and the derivation with the chosen value; ``self`` when the strength is fixed."""
        import copy
        import dataclasses

        if not self.automatic:
            return self, derivation
        from ldct_cli.dicom.read import read_hu
        from ldct_cli.physics.noise import sample_indices

        sample = read_hu(series, sample_indices(series.n_slices))
        twin = copy.copy(self)
        twin.noise_sd_hu = _measured_sd(sample)
        twin.strength_hu = self.strength_for(twin.noise_sd_hu)
        text = (f"{derivation.description}; {self.strength_name} {twin.strength_hu:g} HU = "
                f"{self.auto_factor:g} x the series' measured noise SD {twin.noise_sd_hu:.1f} HU")
        return twin, dataclasses.replace(derivation, description=text)

    def series_details(self) -> dict | None:
        if self.noise_sd_hu is None:
            return None
        return {"strength_hu": self.strength_hu, "noise_sd_hu": round(self.noise_sd_hu, 2),
                "auto_factor": self.auto_factor}

    def _strength_text(self) -> str:
        if self.strength_hu is None:
            return f"{self.strength_name} auto ({self.auto_factor:g} x the measured noise SD)"
        return f"{self.strength_name} {self.strength_hu:g} HU"

    def describe(self) -> str:
        raise NotImplementedError


class NonLocalMeans(ClassicalDenoiser):
    """scikit-image's fast non-local means: 5x5 patches searched within 6 pixels (a 13x13 area)."""

    strength_name = "h"
    auto_factor = 0.9

    def __init__(self, strength_hu: float | None = None, patch_size: int = 5, patch_distance: int = 6):
        super().__init__(strength_hu)
        self.patch_size, self.patch_distance = int(patch_size), int(patch_distance)

    def filter(self, image_hu: np.ndarray, strength_hu: float) -> np.ndarray:
        from skimage.restoration import denoise_nl_means

        return denoise_nl_means(image_hu, h=strength_hu, patch_size=self.patch_size,
                                patch_distance=self.patch_distance, fast_mode=True)

    def describe(self) -> str:
        return (f"non-local means (scikit-image, fast), {self._strength_text()}, patch {self.patch_size}, "
                f"distance {self.patch_distance}")


class TotalVariation(ClassicalDenoiser):
    """scikit-image's Chambolle total-variation denoising; the weight is in HU."""

    strength_name = "weight"
    auto_factor = 0.6

    def filter(self, image_hu: np.ndarray, strength_hu: float) -> np.ndarray:
        from skimage.restoration import denoise_tv_chambolle

        # Chambolle's algorithm takes the weight in the image's units: scale to ~unit range
        # and back, so its stopping tolerance means the same for HU images.
        scale = 1000.0
        return denoise_tv_chambolle(image_hu / scale, weight=strength_hu / scale) * scale

    def describe(self) -> str:
        return f"total variation (scikit-image, Chambolle), {self._strength_text()}"


class Bm3d(ClassicalDenoiser):
    """BM3D (the ``bm3d`` package, an opt-in extra); the strength is the noise SD in HU."""

    strength_name = "sigma"

    def __init__(self, strength_hu: float | None = None):
        super().__init__(strength_hu)
        try:
            import bm3d  # noqa: F401
        except ImportError:
            raise UsageError("bm3d needs the optional 'bm3d' package (non-commercial licence, closed "
                             "binary): pip install 'ldct-cli[bm3d]'") from None

    def filter(self, image_hu: np.ndarray, strength_hu: float) -> np.ndarray:
        import bm3d

        return np.asarray(bm3d.bm3d(image_hu, sigma_psd=strength_hu), np.float64)

    def describe(self) -> str:
        return f"BM3D (bm3d package), noise {self._strength_text()}"

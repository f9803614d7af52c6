"""A scan's own quantum noise, measured from its images: level, texture, and the filter that makes it.

Anatomy is the enemy of every image-based noise estimate: an ROI big enough for a
spectrum holds organ texture and edges, which on a smooth kernel outweigh the noise
(on the AAPM/Mayo B30f pairs, the best 32-pixel soft-tissue ROIs read twice the true SD).
So the estimate here uses small windows and robust statistics, and never takes them as
the SD itself: the same statistics are computed on noise-only images made by the
simulator, and the two are matched.

- **Local SD**: the SD left in every 5 x 5 window after a least-squares quadratic is
  removed (slow anatomy, gradients and curvature go with the fit), over soft tissue
  inside the body (smoothed HU in [-50, 150], 10 px from the skin).
- **Mode**: of those local SDs. Windows on edges or vessels sit in the histogram's right
  tail; the mode is where the uniform tissue is (after Christianson et al., "Automated
  technique to measure noise in clinical CT examinations", AJR 204:W716, 2015, who take
  the mode of a local-SD map).
- **Level**: the mode of the local SDs of the image's first differences (x and y
  averaged), not of the image: differencing is a high-pass filter that leaves the noise
  and takes most anatomy away (on the AAPM/Mayo B30f pairs the image's own local-SD mode
  reads 8% above the noise-only value, its first differences' within 1%).
- **Sharpness**: the level of the second differences over that of the first. It grows
  with the share of high frequencies in the noise: about 1.39 for a Siemens B30f, 1.68
  for a D45f, 1.73 for white noise.
- **Texture fit**: the reconstruction window ``gauss:TAU`` (ramp x exp(-TAU (f/0.5)^2),
  ``projector.ramp_filter_response``) whose noise has the measured sharpness; TAU > 0
  softens, 0 is the plain ramp, TAU < 0 sharpens (edge-enhancing kernels, whose NPS
  reaches higher than the ramp's). One parameter, fitted from a statistic that anatomy
  hardly moves, rather than a free-form filter from a spectrum that anatomy dominates at
  low frequencies.
- **SD**: level x (SD / level) of the fitted texture's noise (TEXTURE_TABLE): the SD of
  a stationary noise field with the fitted texture and the measured level. What this
  cannot see: low-frequency noise power the texture family does not predict.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WINDOW_PX = 5
TISSUE_HU = (-50.0, 150.0)
SKIN_MARGIN_PX = 10
MIN_PIXELS = 2000  # fewer soft-tissue pixels than this: the slice gives no estimate
# Textures of the fitted family, soft to sharp (TAU of the gauss window).
TAU_GRID = (20.0, 16.0, 13.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0,
            -0.5, -1.0, -1.5, -2.0)


def local_sd(image: np.ndarray, window_px: int | None = None) -> np.ndarray:
    """(H, W) SD in every ``window_px`` square window after a least-squares quadratic is removed.

    The six terms (1, x, y, x^2 - c, y^2 - c, xy) are orthogonal on a symmetric square, so
    the residual sum of squares is the window's sum of squares minus each term's squared
    projection over its norm; each projection is one correlation. Degrees of freedom
    k^2 - 6. Borders are reflected.
    """
    k = int(WINDOW_PX if window_px is None else window_px)
    if k < 5 or k % 2 == 0:
        raise ValueError(f"window_px must be an odd number >= 5, got {window_px!r}")
    image = np.asarray(image, dtype=np.float64)
    offset = float(np.median(image))
    image = image - offset  # sums of squares of raw HU would lose precision
    c = np.arange(k) - (k - 1) / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    m = float(np.mean(c**2))
    basis = [np.ones((k, k)), x, y, x * x - m, y * y - m, x * y]
    residual = ndimage.uniform_filter(image * image, k, mode="reflect") * (k * k)
    for term in basis:
        projection = ndimage.correlate(image, term, mode="reflect")
        residual -= projection**2 / float((term * term).sum())
    return np.sqrt(np.maximum(residual, 0.0) / (k * k - len(basis)))


def tissue_mask(image_hu: np.ndarray) -> np.ndarray:
    """(H, W) bool: soft tissue (smoothed HU in TISSUE_HU) at least SKIN_MARGIN_PX inside the body."""
    from ldct_cli.metrics import body_mask

    image = np.asarray(image_hu, dtype=np.float64)
    body = ndimage.binary_erosion(body_mask(image), iterations=SKIN_MARGIN_PX)
    smooth = ndimage.gaussian_filter(image, 2.0)
    return body & (smooth > TISSUE_HU[0]) & (smooth < TISSUE_HU[1])


def histogram_mode(values: np.ndarray, bins: int = 200) -> float:
    """The mode of positive ``values``: the peak of a smoothed histogram up to their 90th
    percentile, refined between bins by a parabola through the peak and its neighbours."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    high = float(np.percentile(values, 90))
    if not high > 0:
        return 0.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, high))
    counts = ndimage.gaussian_filter1d(counts.astype(np.float64), 4.0)
    peak = int(np.argmax(counts))
    shift = 0.0
    if 0 < peak < bins - 1:
        left, mid, right = counts[peak - 1:peak + 2]
        curvature = left - 2 * mid + right
        shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    width = edges[1] - edges[0]
    return float(edges[0] + (peak + 0.5 + shift) * width)


def differences(image: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``order``-th finite differences along x and along y, zero-padded to the image's shape."""
    image = np.asarray(image, dtype=np.float64)
    out = []
    for axis in (1, 0):
        d = np.diff(image, n=order, axis=axis)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, order)
        out.append(np.pad(d, pad))
    return out[0], out[1]


def level(image: np.ndarray, mask: np.ndarray) -> float:
    """Mode of the local SD over ``mask``."""
    return histogram_mode(local_sd(image)[mask])


def difference_level(image: np.ndarray, mask: np.ndarray, order: int = 1) -> float:
    """Mean over x and y of the ``level`` of the ``order``-th differences."""
    dx, dy = differences(image, order)
    return 0.5 * (level(dx, mask) + level(dy, mask))


def noise_level(image: np.ndarray, mask: np.ndarray) -> float:
    """The noise level [HU]: ``difference_level`` of the first differences."""
    return difference_level(image, mask, 1)


def sharpness(image: np.ndarray, mask: np.ndarray, image_level: float | None = None) -> float:
    """Level of the second differences over that of the first (``image_level``, when known)."""
    base = noise_level(image, mask) if image_level is None else image_level
    return difference_level(image, mask, 2) / base if base > 0 else float("nan")


@dataclass(frozen=True)
class SliceNoise:
    """What one slice says of its noise; ``level_hu`` and ``sharpness`` are NaN when it says nothing."""

    level_hu: float
    sharpness: float
    pixels: int  # soft-tissue pixels measured

    @property
    def valid(self) -> bool:
        return self.pixels >= MIN_PIXELS and math.isfinite(self.level_hu) and self.level_hu > 0


def measure_slice(image_hu: np.ndarray) -> tuple[SliceNoise, np.ndarray]:
    """The slice's noise statistics, and the mask they were read in."""
    image = np.asarray(image_hu, dtype=np.float64)
    mask = tissue_mask(image)
    pixels = int(mask.sum())
    if pixels < MIN_PIXELS:
        return SliceNoise(float("nan"), float("nan"), pixels), mask
    lv = noise_level(image, mask)
    return SliceNoise(lv, sharpness(image, mask, lv), pixels), mask


# --------------------------------------------------------------------------- the texture family

# (TAU, sharpness, SD / level, NPS f_avg cycles/pixel) of compute_texture_table(720): see there;
# a slow test recomputes it.
TEXTURE_TABLE = (
    (20.0, 0.9594, 11.5443, 0.0686),
    (16.0, 1.016, 8.4319, 0.0763),
    (13.0, 1.0264, 6.0951, 0.0842),
    (10.0, 1.132, 4.3836, 0.0952),
    (8.0, 1.1902, 3.3329, 0.1055),
    (6.0, 1.255, 2.4552, 0.1201),
    (5.0, 1.3205, 2.0601, 0.1301),
    (4.0, 1.3786, 1.7033, 0.1431),
    (3.0, 1.4537, 1.3806, 0.1608),
    (2.5, 1.4977, 1.2403, 0.1724),
    (2.0, 1.5261, 1.1055, 0.1865),
    (1.5, 1.5767, 0.9918, 0.2039),
    (1.0, 1.6083, 0.8866, 0.2253),
    (0.5, 1.6533, 0.8102, 0.2512),
    (0.0, 1.6805, 0.7473, 0.2813),
    (-0.5, 1.7004, 0.7002, 0.3141),
    (-1.0, 1.7307, 0.6722, 0.347),
    (-1.5, 1.7496, 0.6506, 0.3768),
    (-2.0, 1.762, 0.6366, 0.4016),
)

@dataclass(frozen=True)
class Texture:
    """Noise of one reconstruction window, measured on stationary noise-only images."""

    tau: float
    sharpness: float
    sd_over_level: float  # pixel SD / local-SD mode
    f_avg_cycles: float  # NPS f_avg in cycles per pixel (radial, to Nyquist)


def gauss_filter(tau: float) -> str:
    """The recon_filter name of the fitted family at ``tau``."""
    return f"gauss:{tau:.3g}"


def compute_texture_table(n_views: int = 720, *, size: int = 512, crop: int = 384,
                          seeds: tuple[int, ...] = (0, 1, 2, 3)) -> tuple[Texture, ...]:
    """The family's textures at TAU_GRID, soft to sharp: stationary white sinogram noise
    reconstructed on ``size``^2 pixels by each window (the texture in cycles per pixel
    does not depend on the matrix size), read in the central ``crop``^2, averaged over
    ``seeds``. Deterministic; about 80 s on 2 cores, so the result is stored as TEXTURE_TABLE
    (``python -m ldct_cli.physics.noise`` prints it; a test recomputes it)."""
    import torch

    from ldct_cli.metrics import nps_2d, nps_summary, radial_nps
    from ldct_cli.physics.projector import default_angles, default_n_det, fbp

    angles = default_angles(n_views)
    lo = (size - crop) // 2
    mask = np.ones((crop, crop), dtype=bool)
    out = []
    for tau in TAU_GRID:
        rows = []
        for seed in seeds:
            white = torch.randn(1, n_views, default_n_det(size, size), dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed))
            image = fbp(white, angles=angles, pixel_mm=1.0, size=(size, size), filter=gauss_filter(tau))
            image = image[0, lo:lo + crop, lo:lo + crop].numpy()
            lv = noise_level(image, mask)
            nps, fx, fy = nps_2d(image, 1.0)
            rows.append((sharpness(image, mask, lv), float(image.std()) / lv,
                         nps_summary(*radial_nps(nps, fx, fy))["f_avg"]))
        s, r, f = (float(np.mean(v)) for v in zip(*rows))
        out.append(Texture(tau=tau, sharpness=round(s, 4), sd_over_level=round(r, 4), f_avg_cycles=round(f, 4)))
    return tuple(out)


def texture_table(n_views: int = 720) -> tuple[Texture, ...]:
    """TEXTURE_TABLE for the default 720 views; other view counts are computed once per process."""
    if n_views == 720:
        return tuple(Texture(*row) for row in TEXTURE_TABLE)
    return _computed_table(n_views)


@functools.lru_cache(maxsize=4)
def _computed_table(n_views: int) -> tuple[Texture, ...]:
    return compute_texture_table(n_views)


@dataclass(frozen=True)
class TextureFit:
    """The fitted window for a measured sharpness (``clipped`` when outside the family's range)."""

    recon_filter: str
    tau: float
    sharpness: float
    sd_over_level: float
    f_avg_cycles: float
    clipped: bool


def fit_texture(measured_sharpness: float, n_views: int = 720) -> TextureFit:
    """Interpolate the family at ``measured_sharpness`` (sharpness rises monotonically with -TAU)."""
    if not math.isfinite(measured_sharpness):
        raise ValueError("no sharpness measured: the slices hold too little soft tissue")
    table = texture_table(n_views)
    s = np.array([t.sharpness for t in table])
    if np.any(np.diff(s) <= 0):
        raise RuntimeError("texture table is not monotonic in sharpness")
    clipped = not (s[0] <= measured_sharpness <= s[-1])
    x = float(np.clip(measured_sharpness, s[0], s[-1]))

    def at(values):
        return float(np.interp(x, s, values))

    tau = round(at([t.tau for t in table]), 2)
    return TextureFit(recon_filter=gauss_filter(tau), tau=tau, sharpness=float(measured_sharpness),
                      sd_over_level=at([t.sd_over_level for t in table]),
                      f_avg_cycles=at([t.f_avg_cycles for t in table]), clipped=clipped)


def series_sharpness(slices: list[SliceNoise]) -> float:
    """The median sharpness of the slices that gave an estimate (NaN when none did)."""
    values = [s.sharpness for s in slices if s.valid and math.isfinite(s.sharpness)]
    return float(np.median(values)) if values else float("nan")


def sample_indices(n: int, at_most: int = 12) -> list[int]:
    """Up to ``at_most`` slice indices spread evenly over a series of ``n`` (its ends excluded when it can)."""
    if n <= at_most:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, at_most + 2)[1:-1]})


def series_noise_sd(images_hu: list[np.ndarray]) -> tuple[float, TextureFit] | None:
    """The noise SD [HU] some slices of one series show, and the texture fitted to them:
    median level x the fitted texture's SD / level. None when no slice is measurable."""
    stats = [measure_slice(image)[0] for image in images_hu]
    levels = [s.level_hu for s in stats if s.valid]
    measured = series_sharpness(stats)
    if not levels or not math.isfinite(measured):
        return None
    fit = fit_texture(measured)
    return float(np.median(levels)) * fit.sd_over_level, fit

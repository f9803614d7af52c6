"""Image-quality metrics for CT slices in HU: numpy in and out, no I/O.

Two families:

- Reference metrics, per slice: PSNR and SSIM inside an HU display window (both depend on
  the window and its data range L, so every result must name them: see ``Window``,
  ``PRESETS`` and ``SSIM_VARIANT``), and RMSE in HU, unwindowed, optionally in a body mask.
- Physicist metrics after AAPM TG-233 (Samei et al., "Performance evaluation of computed
  tomography systems", AAPM Report 233, 2019): noise SD and HU bias in uniform ROIs, CNR,
  and the noise power spectrum NPS(f) in HU^2 mm^2 against spatial frequency in mm^-1.

Images are (N, H, W) stacks or single (H, W) slices; per-slice results are (N,) arrays, or
0-d arrays for a single slice. SSIM, the only heavy computation, runs in torch (batched over
slices, on ``device``); the rest is numpy and scipy.ndimage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "Window",
    "PRESETS",
    "SSIM_VARIANT",
    "window_from_text",
    "get_window",
    "psnr",
    "ssim",
    "rmse_hu",
    "body_mask",
    "find_uniform_rois",
    "roi_stats",
    "hu_bias",
    "cnr",
    "nps_2d",
    "radial_nps",
    "nps_summary",
    "noise_sd_from_nps",
]


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """An HU display window [low_hu, high_hu]; PSNR and SSIM clip both images to it."""

    low_hu: float
    high_hu: float
    name: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low_hu) and math.isfinite(self.high_hu)):
            raise ValueError(f"window bounds must be finite HU values, got [{self.low_hu}, {self.high_hu}]")
        if not self.low_hu < self.high_hu:
            raise ValueError(f"window low ({self.low_hu:g} HU) must be below high ({self.high_hu:g} HU)")

    @property
    def data_range(self) -> float:
        """L in HU (high - low): the peak of PSNR and the scale of the SSIM constants."""
        return float(self.high_hu - self.low_hu)

    @classmethod
    def from_center_width(cls, center_hu: float, width_hu: float, name: str) -> Window:
        """A window from DICOM-style center C and width W: [C - W/2, C + W/2]."""
        return cls(center_hu - width_hu / 2, center_hu + width_hu / 2, name)


PRESETS: dict[str, Window] = {
    # [-160, 240] HU is the truncation in the RED-CNN and WGAN-VGG papers' evaluation code,
    # which scores the clipped HU images (not shifted to [0, L]) with L = 400.
    "redcnn": Window(-160.0, 240.0, "redcnn"),
    # The whole 12-bit CT range: the same error reads about 20 dB better than with L = 400.
    "full": Window(-1024.0, 3071.0, "full"),
    "abdomen": Window.from_center_width(50.0, 400.0, "abdomen"),
    "chest": Window.from_center_width(-600.0, 1500.0, "chest"),
    "head": Window.from_center_width(40.0, 80.0, "head"),
}


def window_from_text(text: str) -> Window:
    """A window from ``"low,high"`` in HU (e.g. ``"-160,240"``)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a window is 'low,high' in HU (e.g. '-160,240'), got {text!r}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"window bounds must be numbers in HU (e.g. '-160,240'), got {text!r}") from None
    return Window(low, high, f"custom [{low:g}, {high:g}]")


def get_window(preset_or_text: str | Window) -> Window:
    """A preset by name (see ``PRESETS``), or a custom window from ``"low,high"`` HU text."""
    if isinstance(preset_or_text, Window):
        return preset_or_text
    key = str(preset_or_text).strip()
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    if "," in key:
        return window_from_text(key)
    raise ValueError(f"unknown window {preset_or_text!r}: use a preset ({', '.join(PRESETS)}) "
                     "or 'low,high' in HU (e.g. '-160,240')")


# --------------------------------------------------------------------------- reference metrics


def _pair(test_hu, ref_hu) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both images as float64 (N, H, W), and whether the input was a single (H, W) slice."""
    test = np.asarray(test_hu, dtype=np.float64)
    ref = np.asarray(ref_hu, dtype=np.float64)
    if test.shape != ref.shape:
        raise ValueError(f"test and reference shapes differ: {test.shape} vs {ref.shape}")
    if test.ndim not in (2, 3):
        raise ValueError(f"expected (N, H, W) or (H, W) HU images, got shape {test.shape}")
    single = test.ndim == 2
    return (test[None], ref[None], True) if single else (test, ref, False)


def _per_slice(values: np.ndarray, single: bool) -> np.ndarray:
    return values[0] if single else values


def psnr(test_hu, ref_hu, window: Window) -> np.ndarray:
    """PSNR in dB per slice, 20 log10(L / RMSE) on images clipped to ``window`` (inf if equal).

    ``test_hu``, ``ref_hu``: (N, H, W) or (H, W) HU. Returns (N,) (or 0-d) float64.
    """
    test, ref, single = _pair(test_hu, ref_hu)
    lo, hi = window.low_hu, window.high_hu
    mse = np.mean((np.clip(test, lo, hi) - np.clip(ref, lo, hi)) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        out = 20 * np.log10(window.data_range) - 10 * np.log10(mse)
    return _per_slice(out, single)


SSIM_VARIANT = "Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, population covariance, valid region"
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 sigma + 0.5): the 11 taps of scikit-image's (and the papers') window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _gaussian_taps(sigma: float, radius: int) -> list[float]:
    w = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(w)
    return [v / total for v in w]


def _valid_blur(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """Separable convolution of (..., H, W) with ``taps``, valid region only (no padding).

    Sums of shifted views rather than conv2d: exact in float64 and several times faster on
    CPU, where conv2d has no fast float64 path.
    """
    n = len(taps)
    h, w = x.shape[-2:]
    rows = torch.mul(x[..., 0:h - n + 1, :], taps[0])
    for k in range(1, n):
        rows.add_(x[..., k:k + h - n + 1, :], alpha=taps[k])
    out = torch.mul(rows[..., 0:w - n + 1], taps[0])
    for k in range(1, n):
        out.add_(rows[..., k:k + w - n + 1], alpha=taps[k])
    return out


def ssim(test_hu, ref_hu, window: Window, *, device: str | torch.device = "cpu") -> np.ndarray:
    """Mean SSIM per slice (Wang et al., IEEE TIP 13(4):600-612, 2004) inside ``window``.

    Both images are clipped to the window (kept in HU, not shifted to [0, L], as the RED-CNN
    code does); local statistics use an 11x11 Gaussian, sigma 1.5, population covariance;
    C1 = (0.01 L)^2, C2 = (0.03 L)^2; the SSIM map is averaged over the valid region (a
    5-pixel border left out). Equals scikit-image's ``structural_similarity(..., data_range=L,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` on the clipped images.
    ``test_hu``, ``ref_hu``: (N, H, W) or (H, W), H and W >= 11. Returns (N,) (or 0-d)
    float64; computed in float64 on ``device``, a few slices at a time.
    """
    test, ref, single = _pair(test_hu, ref_hu)
    n_slices, h, w = test.shape
    size = 2 * _SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"SSIM needs slices of at least {size}x{size} pixels, got {h}x{w}")
    lo, hi, data_range = window.low_hu, window.high_hu, window.data_range
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    taps = _gaussian_taps(_SSIM_SIGMA, _SSIM_RADIUS)
    device = torch.device(device)
    # On CPU one 512x512 slice at a time runs twice as fast as 16 (the five maps stay nearer
    # the cache); an accelerator wants big batches: 16 such slices, ~1 GB of float64 at peak.
    batch = max(1, (1 << (18 if device.type == "cpu" else 22)) // (h * w))
    out = np.empty(n_slices, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n_slices, batch):
            x = torch.from_numpy(np.clip(test[start:start + batch], lo, hi)).to(device)
            y = torch.from_numpy(np.clip(ref[start:start + batch], lo, hi)).to(device)
            stats = _valid_blur(torch.stack([x, y, x * x, y * y, x * y]), taps)
            mu_x, mu_y, xx, yy, xy = stats
            var_x = xx - mu_x * mu_x
            var_y = yy - mu_y * mu_y
            cov = xy - mu_x * mu_y
            s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
            out[start:start + batch] = s.mean(dim=(-2, -1)).cpu().numpy()
    return _per_slice(out, single)


def rmse_hu(test_hu, ref_hu, mask=None) -> np.ndarray:
    """RMSE in HU per slice, unwindowed; inside ``mask`` if given (NaN where a slice's mask is empty).

    ``test_hu``, ``ref_hu``: (N, H, W) or (H, W); ``mask``: bool of the same shape, or (H, W)
    applied to every slice. Returns (N,) (or 0-d) float64.
    """
    test, ref, single = _pair(test_hu, ref_hu)
    sq = (test - ref) ** 2
    if mask is None:
        return _per_slice(np.sqrt(sq.mean(axis=(1, 2))), single)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape not in (sq.shape[1:], sq.shape, np.shape(test_hu)):
        raise ValueError(f"mask shape {mask.shape} matches neither a slice {sq.shape[1:]} nor the images")
    mask = np.broadcast_to(mask.reshape((-1,) + sq.shape[1:]), sq.shape)
    count = mask.sum(axis=(1, 2))
    total = np.where(mask, sq, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sqrt(total / count)
    return _per_slice(out, single)


def body_mask(image_hu, threshold_hu: float = -500.0) -> np.ndarray:
    """Bool mask of the body per slice: the largest connected region above ``threshold_hu``, holes filled.

    ``image_hu``: (N, H, W) or (H, W); returns bool of the same shape (all False for a slice
    with nothing above the threshold). Filling holes puts lungs and bowel gas inside the body;
    keeping only the largest region drops the table and other separate objects.
    """
    image = np.asarray(image_hu)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected (N, H, W) or (H, W) HU images, got shape {image.shape}")
    stack = image[None] if image.ndim == 2 else image
    out = np.zeros(stack.shape, dtype=bool)
    for k, slice_hu in enumerate(stack):
        labels, n = ndimage.label(slice_hu > threshold_hu)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        out[k] = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    return out[0] if image.ndim == 2 else out


# --------------------------------------------------------------------------- uniform ROIs (TG-233)

# Soft tissue (fat excluded, which sits near -100 HU): where noise and HU bias are read.
SOFT_TISSUE_HU = (-100.0, 150.0)


def _box_sums(values: np.ndarray, size: int) -> np.ndarray:
    """Sums over every size x size window of (H, W) ``values``: (H - size + 1, W - size + 1)."""
    c = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    c[1:, 1:] = values.cumsum(axis=0).cumsum(axis=1)
    return c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]


def find_uniform_rois(ref_hu, *, roi_px: int, n: int = 4, body=None, margin_px: int | None = None,
                      max_sd_hu: float | None = 100.0) -> list[tuple[int, int]]:
    """Top-left (row, col) corners of up to ``n`` uniform square ROIs of ``roi_px`` pixels.

    After TG-233's noise ROIs: each ROI lies inside the body eroded by ``margin_px``
    (default roi_px // 4) and has a mean between -100 and 150 HU (soft tissue); among those,
    the ROIs of lowest SD in ``ref_hu`` are taken greedily, lowest first, with no two
    overlapping, and ties broken by position (row, then column), so the result is
    deterministic. ``max_sd_hu`` only rejects ROIs when nothing uniform is left (it is
    above quarter-dose noise); None disables it. ``ref_hu``: (H, W) HU; ``body``: (H, W)
    bool, default ``body_mask(ref_hu)``. Returns fewer than ``n`` (or none) if that is all
    that fits.
    """
    image = np.asarray(ref_hu, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected one (H, W) HU slice, got shape {image.shape}")
    if int(roi_px) != roi_px or roi_px < 2:
        raise ValueError(f"roi_px must be an integer >= 2, got {roi_px!r}")
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    roi_px, n = int(roi_px), int(n)
    margin = roi_px // 4 if margin_px is None else int(margin_px)
    if margin < 0:
        raise ValueError(f"margin_px must be >= 0, got {margin_px!r}")
    h, w = image.shape
    if roi_px > h or roi_px > w or n == 0:
        return []
    body = body_mask(image) if body is None else np.asarray(body, dtype=bool)
    if body.shape != image.shape:
        raise ValueError(f"body mask shape {body.shape} differs from the image's {image.shape}")

    # An ROI is inside the eroded body when the ROI grown by the margin is all body
    # (outside the image counts as outside the body).
    grown = roi_px + 2 * margin
    padded = np.pad(body, margin, constant_values=False).astype(np.float64)
    inside = _box_sums(padded, grown) >= grown * grown - 0.5
    npx = roi_px * roi_px
    # Subtract a central value first: sums of squares of raw HU would lose precision.
    offset = float(np.median(image[body])) if body.any() else 0.0
    centred = image - offset
    total = _box_sums(centred, roi_px)
    mean = total / npx
    var = np.maximum(_box_sums(centred * centred, roi_px) / npx - mean * mean, 0.0)
    sd = np.sqrt(var)
    mean_hu = mean + offset
    ok = inside & (mean_hu >= SOFT_TISSUE_HU[0]) & (mean_hu <= SOFT_TISSUE_HU[1])
    if max_sd_hu is not None:
        ok &= sd <= max_sd_hu
    score = np.where(ok, sd, np.inf)
    chosen: list[tuple[int, int]] = []
    while len(chosen) < n:
        flat = int(np.argmin(score))  # first (row-major) minimum: deterministic ties
        if not np.isfinite(score.flat[flat]):
            break
        r, c = divmod(flat, score.shape[1])
        chosen.append((r, c))
        # No later ROI may overlap this one: corners closer than roi_px in both axes.
        score[max(0, r - roi_px + 1):r + roi_px, max(0, c - roi_px + 1):c + roi_px] = np.inf
    return chosen


def _roi_pixels(image_hu, rois, roi_px: int) -> np.ndarray:
    """(K, roi_px, roi_px) float64 pixels of ``rois`` (top-left corners) in an (H, W) image."""
    image = np.asarray(image_hu, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected one (H, W) HU slice, got shape {image.shape}")
    roi_px = int(roi_px)
    h, w = image.shape
    out = np.empty((len(rois), roi_px, roi_px), dtype=np.float64)
    for k, (r, c) in enumerate(rois):
        if not (0 <= r <= h - roi_px and 0 <= c <= w - roi_px):
            raise ValueError(f"ROI at ({r}, {c}) of {roi_px} px does not fit in a {h}x{w} image")
        out[k] = image[r:r + roi_px, c:c + roi_px]
    return out


def roi_stats(image_hu, rois, roi_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean_hu, sd_hu), each (K,), of the K square ROIs (top-left corners) in an (H, W) image.

    SD is the sample SD (ddof 1), as scanner ROI tools report it.
    """
    pixels = _roi_pixels(image_hu, rois, roi_px).reshape(len(rois), -1)
    if len(rois) == 0:
        return np.empty(0), np.empty(0)
    return pixels.mean(axis=1), pixels.std(axis=1, ddof=1)


def hu_bias(test_hu, ref_hu, rois, roi_px: int) -> np.ndarray:
    """HU bias (K,) per ROI: mean(test ROI) - mean(reference ROI); a denoiser should keep it near 0."""
    mean_test, _ = roi_stats(test_hu, rois, roi_px)
    mean_ref, _ = roi_stats(ref_hu, rois, roi_px)
    return mean_test - mean_ref


def cnr(image_hu, roi_a: tuple[int, int], roi_b: tuple[int, int], roi_px: int) -> float:
    """CNR = |mean_a - mean_b| / sqrt((sd_a^2 + sd_b^2) / 2) of two ROIs in an (H, W) image.

    The noise is the RMS of the two ROIs' sample SDs, so neither ROI is privileged.
    """
    mean, sd = roi_stats(image_hu, [tuple(roi_a), tuple(roi_b)], roi_px)
    return float(abs(mean[0] - mean[1]) / math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2))


# --------------------------------------------------------------------------- noise power spectrum

_DETREND_TERMS = {"mean": 1, "plane": 3, "quadratic": 6}


def _detrend(rois: np.ndarray, detrend: str) -> np.ndarray:
    """(K, Ny, Nx) ROIs minus their least-squares fit by a constant, plane or quadratic."""
    if detrend not in _DETREND_TERMS:
        raise ValueError(f"detrend must be one of {', '.join(_DETREND_TERMS)}, got {detrend!r}")
    k, ny, nx = rois.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    y, x = (y - (ny - 1) / 2).ravel(), (x - (nx - 1) / 2).ravel()
    terms = [np.ones_like(x), x, y, x * x, x * y, y * y][:_DETREND_TERMS[detrend]]
    design = np.stack(terms, axis=1)  # (Ny Nx, P), the same for every ROI
    data = rois.reshape(k, -1).T  # (Ny Nx, K)
    coef, *_ = np.linalg.lstsq(design, data, rcond=None)
    return (data - design @ coef).T.reshape(k, ny, nx)


def _spacing(pixel_mm) -> tuple[float, float]:
    dy, dx = (pixel_mm, pixel_mm) if np.ndim(pixel_mm) == 0 else tuple(pixel_mm)
    dy, dx = float(dy), float(dx)
    if not (dy > 0 and dx > 0 and math.isfinite(dy) and math.isfinite(dx)):
        raise ValueError(f"pixel_mm must be positive (one value, or (row, column) spacing), got {pixel_mm!r}")
    return dy, dx


def nps_2d(rois_hu, pixel_mm, *, detrend: str = "plane") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D noise power spectrum of K noise ROIs: (nps2d (Ny, Nx) HU^2 mm^2, fx (Nx,), fy (Ny,) mm^-1).

    TG-233 / ICRU 87: each ROI is detrended (``detrend``: "mean", "plane" (default) or
    "quadratic" least-squares fit removed, taking slow HU changes out of the noise), then
    NPS = dx dy / (Nx Ny) |DFT|^2, averaged over ROIs, zero frequency centred (fftshift).
    ``rois_hu``: (K, Ny, Nx) HU; ``pixel_mm``: pixel spacing, one value or (row, column).
    The sum of NPS times df_x df_y (``noise_sd_from_nps``) is the ROIs' mean detrended variance.
    The ROIs should hold noise only: cut from a uniform region, or from the difference of
    two images of the same object; the variance of the difference of two independent noise
    realisations is twice that of one, so halve that NPS (which one to use is the caller's choice).
    """
    rois = np.asarray(rois_hu, dtype=np.float64)
    if rois.ndim == 2:
        rois = rois[None]
    if rois.ndim != 3 or len(rois) == 0 or min(rois.shape[1:]) < 4:
        raise ValueError(f"expected (K, Ny, Nx) noise ROIs with K >= 1 and at least 4x4 pixels, got {rois.shape}")
    dy, dx = _spacing(pixel_mm)
    _, ny, nx = rois.shape
    residual = _detrend(rois, detrend)
    power = np.abs(np.fft.fft2(residual)) ** 2
    nps = np.fft.fftshift(power.mean(axis=0)) * (dx * dy / (nx * ny))
    fx = np.fft.fftshift(np.fft.fftfreq(nx, d=dx))
    fy = np.fft.fftshift(np.fft.fftfreq(ny, d=dy))
    return nps, fx, fy


def _freq_steps(fx: np.ndarray, fy: np.ndarray) -> tuple[float, float]:
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    if fx.ndim != 1 or fy.ndim != 1 or len(fx) < 2 or len(fy) < 2:
        raise ValueError("fx and fy must be 1-D frequency axes (as nps_2d returns) of at least 2 samples")
    return float(fx[1] - fx[0]), float(fy[1] - fy[0])


def noise_sd_from_nps(nps2d, fx, fy) -> float:
    """Noise SD in HU from a 2D NPS: sqrt of its integral over frequency (sum of NPS df_x df_y)."""
    dfx, dfy = _freq_steps(fx, fy)
    return float(math.sqrt(np.sum(nps2d) * dfx * dfy))


def radial_nps(nps2d, fx, fy, *, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS: (f (B,) mm^-1, nps (B,) HU^2 mm^2) from 0 to the Nyquist frequency.

    Samples of ``nps2d`` (Ny, Nx) are averaged in rings of equal width centred at
    f = 0, w, 2w, ..., f_Nyquist (w = f_Nyquist / ``n_bins``; f_Nyquist the lower of the
    two axes'); corners beyond Nyquist are left out, as are empty rings. By default
    w is the coarser frequency step, giving f = 0, 1/(N dx), ..., 1/(2 dx) for an N x N ROI.
    """
    nps2d = np.asarray(nps2d, dtype=np.float64)
    fx, fy = np.asarray(fx, dtype=np.float64), np.asarray(fy, dtype=np.float64)
    dfx, dfy = _freq_steps(fx, fy)
    if nps2d.shape != (len(fy), len(fx)):
        raise ValueError(f"nps2d shape {nps2d.shape} does not match fy, fx ({len(fy)}, {len(fx)})")
    f_nyquist = min(np.abs(fx).max(), np.abs(fy).max())
    if n_bins is None:
        n_bins = max(1, int(round(f_nyquist / max(dfx, dfy))))
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    width = f_nyquist / int(n_bins)
    radius = np.hypot(fx[None, :], fy[:, None])
    ring = np.rint(radius / width).astype(np.int64).ravel()
    keep = ring <= n_bins
    sums = np.bincount(ring[keep], weights=nps2d.ravel()[keep], minlength=n_bins + 1)
    counts = np.bincount(ring[keep], minlength=n_bins + 1)
    present = counts > 0
    f = np.arange(n_bins + 1) * width
    return f[present], sums[present] / counts[present]


def nps_summary(f, nps) -> dict[str, float]:
    """TG-233 NPS summary of a radial NPS: f_peak (mm^-1, the maximum) and f_avg = sum f NPS / sum NPS."""
    f, nps = np.asarray(f, dtype=np.float64), np.asarray(nps, dtype=np.float64)
    if f.shape != nps.shape or f.ndim != 1 or len(f) == 0:
        raise ValueError(f"f and nps must be 1-D arrays of the same length, got {f.shape} and {nps.shape}")
    total = float(np.sum(nps))
    return {
        "f_peak": float(f[int(np.argmax(nps))]),
        "f_avg": float(np.sum(f * nps) / total) if total > 0 else float("nan"),
    }

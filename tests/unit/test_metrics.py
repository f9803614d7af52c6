"""Image-quality metrics: SSIM against scikit-image, PSNR/RMSE by hand, NPS integrals and
shapes on white and simulated CT noise, uniform ROIs on the phantom, windows."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
from scipy import ndimage

from ldct_cli import metrics
from ldct_cli.metrics import PRESETS, Window, get_window, window_from_text

PIXEL_MM = 0.7


# --------------------------------------------------------------------------- windows


def test_presets_are_the_documented_windows():
    expected = {"redcnn": (-160, 240, 400), "full": (-1024, 3071, 4095), "abdomen": (-150, 250, 400),
                "chest": (-1350, 150, 1500), "head": (0, 80, 80)}
    for name, (lo, hi, data_range) in expected.items():
        window = PRESETS[name]
        assert (window.low_hu, window.high_hu, window.data_range, window.name) == (lo, hi, data_range, name)


def test_get_window_takes_presets_and_text():
    assert get_window("redcnn") is PRESETS["redcnn"]
    assert get_window("Chest") is PRESETS["chest"]
    custom = get_window(" -100, 300 ")
    assert (custom.low_hu, custom.high_hu, custom.data_range) == (-100, 300, 400)
    assert window_from_text("-1000,1000").data_range == 2000


@pytest.mark.parametrize("text", ["", "abdomenn", "100", "1,2,3", "a,b", "-100,", "300,-100", "5,5", "nan,1"])
def test_get_window_rejects_bad_text(text):
    with pytest.raises(ValueError, match="window"):
        get_window(text)


def test_unknown_preset_error_lists_the_presets():
    with pytest.raises(ValueError, match="redcnn.*full"):
        get_window("soft")


# --------------------------------------------------------------------------- SSIM, PSNR, RMSE


def _smooth(rng, shape, sigma=4.0, scale=600.0):
    return np.stack([ndimage.gaussian_filter(rng.normal(0, 1, shape[1:]), sigma) for _ in range(shape[0])]) \
        * scale * sigma - 100


def _skimage_ssim(test_hu, ref_hu, window: Window) -> np.ndarray:
    from skimage.metrics import structural_similarity

    lo, hi = window.low_hu, window.high_hu
    return np.array([structural_similarity(np.clip(a, lo, hi), np.clip(b, lo, hi), data_range=window.data_range,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                     for a, b in zip(test_hu, ref_hu)])


@pytest.mark.parametrize("preset", ["redcnn", "full"])
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 100, 80), (2, 11, 30)])
@pytest.mark.parametrize("kind", ["random", "noisy_smooth"])
def test_ssim_equals_skimage_gaussian_ssim(preset, shape, kind):
    rng = np.random.default_rng(zlib.crc32(f"{preset}{shape}{kind}".encode()))  # str hash() varies per run
    if kind == "random":
        ref = rng.uniform(-1100, 1500, shape)
        test = rng.uniform(-1100, 1500, shape)
    else:
        ref = _smooth(rng, shape)
        test = ref + rng.normal(0, 30, shape)
    window = PRESETS[preset]
    ours = metrics.ssim(test, ref, window)
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, _skimage_ssim(test, ref, window), rtol=0, atol=1e-6)


def test_ssim_single_slice_identity_and_float32():
    rng = np.random.default_rng(1)
    ref = _smooth(rng, (1, 48, 40))[0].astype(np.float32)
    window = PRESETS["redcnn"]
    assert metrics.ssim(ref, ref, window).shape == ()
    assert metrics.ssim(ref, ref, window) == pytest.approx(1.0, abs=1e-12)
    test = ref + rng.normal(0, 20, ref.shape).astype(np.float32)
    expected = _skimage_ssim(test[None].astype(np.float64), ref[None].astype(np.float64), window)[0]
    assert metrics.ssim(test, ref, window) == pytest.approx(expected, abs=1e-6)


def test_ssim_rejects_small_or_mismatched_images():
    window = PRESETS["redcnn"]
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(np.zeros((10, 20)), np.zeros((10, 20)), window)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(np.zeros((20, 20)), np.zeros((20, 21)), window)


def test_psnr_and_rmse_of_a_constant_offset():
    rng = np.random.default_rng(2)
    ref = rng.uniform(-100, 100, (3, 32, 32))
    test = ref + 10.0
    np.testing.assert_allclose(metrics.rmse_hu(test, ref), 10.0)
    np.testing.assert_allclose(metrics.psnr(test, ref, PRESETS["redcnn"]), 20 * math.log10(400 / 10))
    np.testing.assert_allclose(metrics.psnr(test, ref, PRESETS["full"]), 20 * math.log10(4095 / 10))
    assert np.isinf(metrics.psnr(ref, ref, PRESETS["redcnn"])).all()
    assert metrics.psnr(ref[0], ref[0], PRESETS["redcnn"]).shape == ()


def test_psnr_clips_to_the_window_and_rmse_does_not():
    ref = np.zeros((32, 32))
    test = ref.copy()
    test[:16] = 1000.0  # half the pixels; clipped to 240 HU inside the redcnn window
    assert metrics.rmse_hu(test, ref) == pytest.approx(1000 / math.sqrt(2))
    assert metrics.psnr(test, ref, PRESETS["redcnn"]) == pytest.approx(20 * math.log10(400 / (240 / math.sqrt(2))))
    below = np.full((8, 8), -500.0)
    assert np.isinf(metrics.psnr(below, np.full((8, 8), -900.0), PRESETS["redcnn"]))  # both clip to -160


def test_masked_rmse():
    ref = np.zeros((2, 10, 10))
    test = ref.copy()
    test[:, :, :5] = 30.0  # error only in the left half
    left = np.zeros((10, 10), bool)
    left[:, :5] = True
    np.testing.assert_allclose(metrics.rmse_hu(test, ref, mask=left), 30.0)
    np.testing.assert_allclose(metrics.rmse_hu(test, ref, mask=~left), 0.0)
    per_slice = np.stack([left, np.ones((10, 10), bool)])
    np.testing.assert_allclose(metrics.rmse_hu(test, ref, mask=per_slice), [30.0, 30.0 / math.sqrt(2)])
    assert np.isnan(metrics.rmse_hu(test[0], ref[0], mask=np.zeros((10, 10), bool)))


def test_body_mask_fills_holes_and_drops_the_table():
    image = np.full((64, 64), -1000.0)
    y, x = np.mgrid[:64, :64] - 30
    image[np.hypot(y, x) < 20] = 40.0
    image[np.hypot(y, x) < 8] = -900.0  # lung-like air inside the body
    image[58:61, 5:60] = 200.0  # a table, separate from the body
    mask = metrics.body_mask(image)
    assert mask.shape == image.shape and mask.dtype == bool
    assert mask[30, 30] and not mask[59, 30] and not mask[0, 0]
    np.testing.assert_array_equal(mask, np.hypot(y, x) < 20)
    assert not metrics.body_mask(np.full((2, 8, 8), -1000.0)).any()


# --------------------------------------------------------------------------- uniform ROIs


@pytest.fixture(scope="module")
def phantom():
    from ldct_cli.phantom import PhantomSpec, phantom_slice, structure_masks

    spec = PhantomSpec(size=256)
    return phantom_slice(spec, 10).astype(np.float64), structure_masks(spec, 10)


def test_uniform_rois_lie_in_uniform_soft_tissue_inside_the_body(phantom):
    image, masks = phantom
    roi = 16
    rois = metrics.find_uniform_rois(image, roi_px=roi, n=4)
    assert len(rois) == 4
    assert rois == metrics.find_uniform_rois(image.copy(), roi_px=roi, n=4)  # deterministic
    eroded = ndimage.binary_erosion(masks["body"], iterations=roi // 4)
    tissues = [name for name in masks if name not in ("body", "air")]
    mean, sd = metrics.roi_stats(image, rois, roi)
    for (r, c), m, s in zip(rois, mean, sd):
        window = (slice(r, r + roi), slice(c, c + roi))
        assert eroded[window].all()
        assert any(masks[name][window].all() for name in tissues)  # one structure: no edges
        assert -100 <= m <= 150 and s < 10
    for i, (r1, c1) in enumerate(rois):  # no two overlap
        for r2, c2 in rois[i + 1:]:
            assert abs(r1 - r2) >= roi or abs(c1 - c2) >= roi


def test_uniform_rois_none_when_nothing_fits():
    air = np.full((64, 64), -1000.0)
    assert metrics.find_uniform_rois(air, roi_px=16) == []
    assert metrics.find_uniform_rois(np.zeros((8, 8)), roi_px=16) == []


def test_hu_bias_and_roi_noise(phantom):
    image, _ = phantom
    roi = 16
    rois = metrics.find_uniform_rois(image, roi_px=roi, n=4)
    noisy = image + np.random.default_rng(3).normal(0, 20, image.shape)
    # The ROI mean of zero-mean noise has SD 20 / 16 HU: 4 SDs of it.
    assert np.abs(metrics.hu_bias(noisy, image, rois, roi)).max() < 4 * 20 / roi
    np.testing.assert_allclose(metrics.hu_bias(image + 7.0, image, rois, roi), 7.0)
    _, sd = metrics.roi_stats(noisy - image, rois, roi)
    np.testing.assert_allclose(sd, 20, rtol=0.2)


def test_cnr_definition():
    image = np.zeros((20, 40))
    image[:, 20:] = 50.0
    image[::2, :] += 3.0  # rows alternate: SD inside each ROI is known
    image[:, 20:][1::2] += 5.0
    a, b = (2, 2), (2, 22)
    mean, sd = metrics.roi_stats(image, [a, b], 10)
    np.testing.assert_allclose(mean, [1.5, 54.0])
    np.testing.assert_allclose(sd, [1.5 * math.sqrt(100 / 99), 1.0 * math.sqrt(100 / 99)])
    expected = abs(mean[0] - mean[1]) / math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2)
    assert metrics.cnr(image, a, b, 10) == pytest.approx(expected)
    with pytest.raises(ValueError, match="does not fit"):
        metrics.roi_stats(image, [(15, 0)], 10)


# --------------------------------------------------------------------------- noise power spectrum


def _tiles(stack: np.ndarray, lo: int, hi: int, size: int) -> np.ndarray:
    """Non-overlapping size x size ROIs with corners in [lo, hi) of every slice: (K, size, size)."""
    return np.stack([s[r:r + size, c:c + size] for s in stack
                     for r in range(lo, hi - size + 1, size) for c in range(lo, hi - size + 1, size)])


@pytest.fixture(scope="module")
def ct_noise() -> np.ndarray:
    """(2, 256, 256) HU noise of a quarter-dose scan of a uniform water cylinder (Hann FBP)."""
    from ldct_cli.physics.lowdose import LowDoseSimulator

    size = 256
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    water = np.where(np.hypot(y, x) < 0.45 * size, 0.0, -1000.0).astype(np.float32)
    # The simulator seeds by pixel bytes, so each realisation needs its own seed.
    noise = [LowDoseSimulator(dose=0.25, noiseless_input=True, pixel_mm=PIXEL_MM, seed=s)(water[None, None])[0]
             for s in (1, 2)]
    return np.stack(noise).astype(np.float64) - water


def test_white_noise_nps_is_flat_with_the_right_level_and_units():
    sigma, n = 20.0, 32
    rois = np.random.default_rng(4).normal(0, sigma, (300, n, n))
    nps, fx, fy = metrics.nps_2d(rois, PIXEL_MM, detrend="mean")
    assert nps.shape == (n, n) and fx.shape == fy.shape == (n,)
    assert np.abs(fx).max() == pytest.approx(1 / (2 * PIXEL_MM))  # Nyquist in mm^-1
    assert fx[1] - fx[0] == pytest.approx(1 / (n * PIXEL_MM))
    assert fx[n // 2] == 0 and fy[n // 2] == 0  # fftshifted
    variance = metrics.noise_sd_from_nps(nps, fx, fy) ** 2
    assert variance == pytest.approx(sigma**2, rel=0.05)
    f, radial = metrics.radial_nps(nps, fx, fy)
    assert len(f) == n // 2 + 1 and f[-1] == pytest.approx(1 / (2 * PIXEL_MM))
    level = sigma**2 * PIXEL_MM**2  # HU^2 mm^2
    np.testing.assert_allclose(radial[1:], level, rtol=0.1)
    summary = metrics.nps_summary(f, radial)
    # Flat beyond DC (zero after detrending): f_avg is the mean of the other ring frequencies.
    assert summary["f_avg"] == pytest.approx(f[1:].mean(), rel=0.05)


@pytest.mark.parametrize("detrend", ["mean", "plane", "quadratic"])
def test_nps_integral_is_the_detrended_variance(detrend):
    rng = np.random.default_rng(5)
    rois = rng.normal(0, 20, (100, 32, 32)) + np.linspace(-30, 30, 32)  # noise on a slope
    nps, fx, fy = metrics.nps_2d(rois, PIXEL_MM, detrend=detrend)
    residual = metrics._detrend(rois, detrend)
    assert metrics.noise_sd_from_nps(nps, fx, fy) ** 2 == pytest.approx(np.mean(residual**2), rel=1e-9)
    if detrend != "mean":  # the slope is gone, leaving the noise
        assert metrics.noise_sd_from_nps(nps, fx, fy) == pytest.approx(20, rel=0.05)


def test_nps_detrending_removes_planes_and_quadratics():
    y, x = np.mgrid[:16, :16].astype(float)
    plane = 3 * x - 2 * y + 40
    quadratic = plane + 0.5 * x * x - 0.3 * x * y + 0.2 * y * y
    assert metrics.nps_2d(plane[None], 1.0)[0].max() < 1e-18
    assert metrics.nps_2d(quadratic[None], 1.0, detrend="quadratic")[0].max() < 1e-18
    assert metrics.nps_2d(plane[None], 1.0, detrend="mean")[0].max() > 1
    with pytest.raises(ValueError, match="detrend"):
        metrics.nps_2d(plane[None], 1.0, detrend="linear")


def test_ct_noise_nps_integrates_to_the_roi_variance(ct_noise):
    rois = _tiles(ct_noise, 48, 208, 32)
    assert len(rois) == 50
    nps, fx, fy = metrics.nps_2d(rois, PIXEL_MM)
    variance = metrics.noise_sd_from_nps(nps, fx, fy) ** 2
    assert variance == pytest.approx(np.mean(metrics._detrend(rois, "plane") ** 2), rel=0.05)
    # Plane detrending barely touches CT noise, whose power is low near zero frequency.
    assert variance == pytest.approx(rois.var(axis=(1, 2)).mean(), rel=0.05)


def test_nps_f_avg_falls_from_white_to_ct_to_smoothed_noise(ct_noise):
    def f_avg(rois):
        nps, fx, fy = metrics.nps_2d(rois, PIXEL_MM)
        summary = metrics.nps_summary(*metrics.radial_nps(nps, fx, fy))
        return summary["f_avg"], summary["f_peak"]

    white_avg, _ = f_avg(np.random.default_rng(6).normal(0, 20, (50, 32, 32)))
    ct_avg, ct_peak = f_avg(_tiles(ct_noise, 48, 208, 32))
    smoothed = np.stack([ndimage.gaussian_filter(s, 1.0) for s in ct_noise])  # "plastic" texture
    smooth_avg, _ = f_avg(_tiles(smoothed, 48, 208, 32))
    assert smooth_avg < 0.85 * ct_avg < 0.85 * white_avg
    assert 0 < ct_peak < 1 / (2 * PIXEL_MM) / 2  # Hann FBP: a peak at low-mid frequency, not DC


def test_nps_input_validation():
    with pytest.raises(ValueError, match="pixel_mm"):
        metrics.nps_2d(np.zeros((2, 8, 8)), 0.0)
    with pytest.raises(ValueError, match="ROIs"):
        metrics.nps_2d(np.zeros((0, 8, 8)), 1.0)
    nps, fx, fy = metrics.nps_2d(np.random.default_rng(0).normal(size=(2, 8, 12)), (0.5, 1.0))
    assert nps.shape == (8, 12) and np.abs(fy).max() == 1.0 and np.abs(fx).max() == 0.5

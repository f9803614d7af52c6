"""Projection-domain noise insertion on synthetic water phantoms: bias, dose scaling, NPS shape,
determinism, scanner padding. Run with ``-s`` to see the measured numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldct_cli.physics.lowdose import (
    DEFAULT_I0,
    MU_WATER,
    LowDoseSimulator,
    added_noise_variance,
    hu_to_mu,
    inscribed_circle,
    mu_to_hu,
    quantum_noise_variance,
)

SIZE = 128
PIXEL_MM = 2.5  # 320 mm field of view: an abdomen-sized phantom on a small matrix
N_VIEWS = 360


def water_phantom(*, padding_hu: float = -1000.0, size: int = SIZE) -> np.ndarray:
    """(size, size) HU: a 240 mm water cylinder (0 HU) in air, ``padding_hu`` outside the scan circle."""
    centre = (size - 1) / 2
    y, x = np.mgrid[:size, :size] - centre
    r = np.hypot(y, x)
    image = np.where(r <= 120.0 / PIXEL_MM, 0.0, -1000.0)
    image[r > size / 2] = padding_hu
    return image.astype(np.float32)


def central_disc(radius_px: float, size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    return np.hypot(y, x) <= radius_px


def simulate(image_hu: np.ndarray, **kwargs) -> np.ndarray:
    """One (H, W) slice through a LowDoseSimulator built from ``kwargs``."""
    kwargs = {"n_views": N_VIEWS, "pixel_mm": PIXEL_MM, **kwargs}
    return LowDoseSimulator(**kwargs)(image_hu[None, None])[0]


def full_dose_realizations(n: int) -> list[np.ndarray]:
    """Quantum-limited 'full-dose' scans of the noiseless phantom, seeds 0..n-1."""
    phantom = water_phantom()
    return [simulate(phantom, dose=1.0, noiseless_input=True, seed=seed) for seed in range(n)]


def test_hu_attenuation_conversion():
    hu = torch.tensor([-3024.0, -2000.0, -1000.0, 0.0, 1000.0])
    mu = hu_to_mu(hu)
    assert torch.equal(mu[:3], torch.zeros(3))  # padding is air, never negative
    assert mu[3] == pytest.approx(MU_WATER) and mu[4] == pytest.approx(2 * MU_WATER)
    assert torch.allclose(mu_to_hu(mu[2:]), hu[2:], atol=1e-3)


def test_added_variance_is_the_difference_of_the_two_doses():
    p = torch.linspace(0.0, 8.0, 50, dtype=torch.float64)
    for sigma_e in (0.0, 10.0):
        added = added_noise_variance(p, dose=0.25, i0=1e5, electronic_noise=sigma_e)
        low = quantum_noise_variance(p, i0=0.25e5, electronic_noise=sigma_e)
        full = quantum_noise_variance(p, i0=1e5, electronic_noise=sigma_e)
        assert torch.allclose(added, low - full, rtol=1e-9)
    assert torch.equal(added_noise_variance(p, dose=1.0, i0=1e5), torch.zeros_like(p))
    assert torch.isfinite(added_noise_variance(torch.tensor([1e3]), dose=0.1, i0=1e5)).all()


def test_added_variance_matches_monte_carlo_counts():
    """Poisson counts plus Gaussian electronic noise, log-transformed, at full and quarter dose."""
    rng = np.random.default_rng(0)
    i0, p, sigma_e, dose, n = 2e4, 2.0, 20.0, 0.25, 400_000
    def log_variance(photons: float) -> float:
        counts = rng.poisson(photons * np.exp(-p), n) + rng.normal(0.0, sigma_e, n)
        return float(np.var(-np.log(counts / photons)))
    measured = log_variance(dose * i0) - log_variance(i0)
    predicted = float(added_noise_variance(torch.tensor(p), dose=dose, i0=i0, electronic_noise=sigma_e))
    without_electronic = float(added_noise_variance(torch.tensor(p), dose=dose, i0=i0))
    print(f"\nadded variance at p={p}, I0={i0:g}, sigma_e={sigma_e}: Monte Carlo {measured:.5f}, "
          f"formula {predicted:.5f} (quantum term alone {without_electronic:.5f})")
    assert measured == pytest.approx(predicted, rel=0.05)
    assert predicted > 1.1 * without_electronic  # the electronic term matters at this flux


def test_mean_hu_is_unchanged():
    phantom = water_phantom()
    roi = central_disc(40.0)
    noise = np.stack([simulate(phantom, dose=0.25, seed=seed) - phantom for seed in range(8)])
    bias = float(noise[:, roi].mean())
    print(f"\nquarter dose, water: bias {bias:+.3f} HU, added noise SD {noise[:, roi].std():.1f} HU "
          f"(I0 {DEFAULT_I0:g}, {PIXEL_MM} mm pixels, {N_VIEWS} views)")
    assert abs(bias) < 1.0


def test_noise_scales_as_one_over_root_dose():
    roi = central_disc(30.0)
    full, low = [], []
    for seed, fd in enumerate(full_dose_realizations(4)):
        full.append(fd[roi])
        low.append(simulate(fd, dose=0.25, seed=100 + seed)[roi])
    sigma_fd, sigma_ld = float(np.std(full)), float(np.std(low))
    ratio = sigma_ld / sigma_fd
    print(f"\nquantum-limited water: SD full dose {sigma_fd:.2f} HU, quarter dose {sigma_ld:.2f} HU, "
          f"ratio {ratio:.3f} (expected 1/sqrt(0.25) = 2)")
    assert ratio == pytest.approx(2.0, rel=0.15)


def radial_nps(noise_rois: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Radially averaged 2-D NPS [HU^2 mm^2] of (n, N, N) noise ROIs; index k = k / N cycles per pixel."""
    n_rois, size, _ = noise_rois.shape
    detrended = noise_rois - noise_rois.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(detrended), axes=(1, 2))) ** 2
    nps_2d = power.mean(0) * pixel_mm**2 / size**2
    y, x = np.mgrid[:size, :size] - size // 2
    k = np.rint(np.hypot(y, x)).astype(int)
    return np.array([nps_2d[k == i].mean() for i in range(size // 2 + 1)])


def test_noise_power_spectrum_has_the_ct_shape():
    phantom = water_phantom()
    half = 32  # a 64 x 64 ROI, inside the 48-pixel-radius cylinder
    centre = SIZE // 2
    rois = np.stack([
        (simulate(phantom, dose=0.25, seed=seed) - phantom)[centre - half:centre + half, centre - half:centre + half]
        for seed in range(12)
    ])
    nps = radial_nps(rois, PIXEL_MM)
    nyquist = len(nps) - 1  # bin index of Nyquist (0.5 cycles per pixel)
    at_03 = nps[round(0.3 * nyquist)]
    lowest = nps[1]
    peak = int(np.argmax(nps))
    print(f"\nNPS of the inserted noise (Hann): lowest bin {lowest:.2f}, 0.3 Nyquist {at_03:.2f} HU^2 mm^2, "
          f"ratio {at_03 / lowest:.1f}; peak at {peak / nyquist:.2f} Nyquist "
          f"({peak / nyquist * 0.5 / PIXEL_MM:.3f} /mm), 0.9 Nyquist {nps[round(0.9 * nyquist)]:.3f}")
    print("NPS / peak, 0..1 Nyquist in steps of 0.125:",
          " ".join(f"{nps[round(f * nyquist)] / nps[peak]:.2f}" for f in np.arange(0, 1.001, 0.125)))
    assert at_03 > 3 * lowest  # ramp-like rise from low frequencies
    assert nps.max() > 3 * nps[1:].min()  # not white


def test_same_seed_same_noise_whatever_the_batch():
    base = water_phantom()
    a, b, c = base, base + 40 * central_disc(10.0), base - 30 * central_disc(20.0)
    stack = np.stack([a, b, c])[:, None]
    common = {"dose": 0.25, "n_views": N_VIEWS, "pixel_mm": PIXEL_MM}
    first = LowDoseSimulator(seed=7, batch_size=3, **common)(stack)
    again = LowDoseSimulator(seed=7, batch_size=1, **common)(stack[[2, 0]])
    assert np.array_equal(first[0], again[1]) and np.array_equal(first[2], again[0])
    other = LowDoseSimulator(seed=8, batch_size=3, **common)(stack)
    difference = float(np.abs(other[0] - first[0]).max())
    print(f"\nseed 7 vs seed 8: max |difference| {difference:.1f} HU")
    assert difference > 10.0


@pytest.mark.parametrize("padding_hu", [-2000.0, -3024.0])
def test_scanner_padding_is_left_alone(padding_hu):
    phantom = water_phantom(padding_hu=padding_hu)
    low_dose = simulate(phantom, dose=0.1, seed=3)
    outside = ~inscribed_circle(SIZE, SIZE).numpy()
    change = np.abs(low_dose - phantom)
    print(f"\npadding {padding_hu:.0f} HU, dose 0.1: max |change| inside the FOV {change[~outside].max():.0f} HU, "
          f"SD {np.std((low_dose - phantom)[central_disc(40.0)]):.1f} HU")
    assert np.isfinite(low_dose).all()
    assert np.array_equal(low_dose[outside], phantom[outside])
    assert change.max() < 1000.0


def test_pixel_size_is_required_and_per_call_wins():
    phantom = water_phantom()[None, None]
    with pytest.raises(ValueError, match="pixel_mm"):
        LowDoseSimulator(dose=0.5, n_views=N_VIEWS)(phantom)
    constructed = LowDoseSimulator(dose=0.5, n_views=N_VIEWS, pixel_mm=PIXEL_MM)(phantom)
    per_call = LowDoseSimulator(dose=0.5, n_views=N_VIEWS, pixel_mm=1.0)(phantom, pixel_mm=PIXEL_MM)
    assert np.array_equal(constructed, per_call)
    with pytest.raises(ValueError, match="B, 1, H, W"):
        LowDoseSimulator(dose=0.5, pixel_mm=1.0)(phantom[0])
    with pytest.raises(ValueError, match="dose"):
        LowDoseSimulator(dose=0.0)

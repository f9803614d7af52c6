"""The image-based noise estimator (physics.noise) and scan-matched simulation, on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldct_cli.phantom import PhantomSpec, phantom_slice
from ldct_cli.physics import noise
from ldct_cli.physics.projector import check_filter, default_angles, default_n_det, fbp, ramp_filter_response


def textured_noise(tau: float, size: int, sd: float, seed: int) -> np.ndarray:
    """Stationary noise of the gauss:TAU texture with pixel SD ``sd`` (white sinogram noise through FBP)."""
    white = torch.randn(1, 720, default_n_det(size, size), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    image = fbp(white, angles=default_angles(720), pixel_mm=1.0, size=(size, size),
                filter=noise.gauss_filter(tau))[0].numpy()
    return image * (sd / image.std())


@pytest.fixture(scope="module")
def anatomy() -> np.ndarray:
    """A noiseless 512^2 abdomen slice of the project's phantom."""
    return phantom_slice(PhantomSpec(size=512, n_slices=4, seed=3), 2).astype(np.float64)


@pytest.mark.parametrize("tau, sd", [(4.0, 12.0), (0.0, 30.0), (-1.0, 60.0)])
def test_estimator_recovers_known_sd_and_texture(anatomy, tau, sd):
    """Eight slices of one series, as ldct noise / simulate read up to twelve."""
    fields = [textured_noise(tau, 512, sd, seed=10 + k) for k in range(8)]
    masks = [noise.measure_slice(anatomy + f)[1] for f in fields]
    assert all(m.sum() > 20000 for m in masks)
    estimated, fit = noise.series_noise_sd([anatomy + f for f in fields])
    true_sd = math.sqrt(np.mean([f[m].var() for f, m in zip(fields, masks)]))
    # within 6%: single slices scatter by about +-5%, and the texture fit leans a little
    # soft on sharp textures (+3% SD at TAU 0 in this phantom)
    assert estimated == pytest.approx(true_sd, rel=0.06)
    assert fit.tau == pytest.approx(tau, abs=0.6)
    table_f = {t.tau: t.f_avg_cycles for t in noise.texture_table()}
    assert fit.f_avg_cycles == pytest.approx(table_f[tau], rel=0.08)


def test_estimator_separates_textures(anatomy):
    smooth, _ = noise.measure_slice(anatomy + textured_noise(6.0, 512, 20.0, 1))
    sharp, _ = noise.measure_slice(anatomy + textured_noise(-1.0, 512, 20.0, 1))
    assert noise.fit_texture(smooth.sharpness).tau > noise.fit_texture(sharp.sharpness).tau + 4


def test_level_scales_with_noise_and_ignores_offset(anatomy):
    field = textured_noise(1.0, 512, 10.0, 5)
    _, mask = noise.measure_slice(anatomy + field)
    a = noise.noise_level(anatomy + field, mask)
    b = noise.noise_level(anatomy + 3 * field + 500.0, mask)
    assert b == pytest.approx(3 * a, rel=0.03)


def test_too_little_tissue_gives_no_estimate():
    air = np.full((128, 128), -1000.0) + np.random.default_rng(0).normal(0, 10, (128, 128))
    stats, _ = noise.measure_slice(air)
    assert not stats.valid and math.isnan(stats.level_hu)
    with pytest.raises(ValueError, match="no sharpness"):
        noise.fit_texture(noise.series_sharpness([stats]))


def test_local_sd_removes_quadratic_trends():
    y, x = np.mgrid[0:64, 0:64].astype(float)
    ramp = 3 * x - 2 * y + 0.05 * x * x + 0.1 * x * y
    assert np.abs(noise.local_sd(ramp)[4:-4, 4:-4]).max() < 1e-4
    with pytest.raises(ValueError):
        noise.local_sd(ramp, window_px=4)


def test_histogram_mode_finds_the_peak():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 1, 50000), rng.uniform(10, 80, 10000)])  # a tail of edges
    assert noise.histogram_mode(values) == pytest.approx(10, abs=0.4)


def test_fit_clips_outside_the_family():
    assert noise.fit_texture(0.1).clipped and noise.fit_texture(0.1).tau == noise.TAU_GRID[0]
    assert not noise.fit_texture(1.4).clipped


def test_texture_table_is_monotonic():
    table = noise.texture_table()
    assert [t.tau for t in table] == list(noise.TAU_GRID)
    for key in ("sharpness", "f_avg_cycles"):
        values = [getattr(t, key) for t in table]
        assert np.all(np.diff(values) > 0), key
    assert np.all(np.diff([t.sd_over_level for t in table]) < 0)


@pytest.mark.slow
def test_stored_texture_table_is_what_the_code_computes():
    computed = noise.compute_texture_table()
    stored = noise.texture_table()
    for a, b in zip(computed, stored):
        assert a.tau == b.tau
        assert a.sharpness == pytest.approx(b.sharpness, abs=2e-4)
        assert a.sd_over_level == pytest.approx(b.sd_over_level, rel=1e-3)
        assert a.f_avg_cycles == pytest.approx(b.f_avg_cycles, abs=2e-4)


def test_gauss_filter_names():
    assert check_filter("hann") == "hann"
    assert check_filter("gauss:2.5") == 2.5
    assert check_filter("gauss:-1") == -1.0
    for bad in ("gauss:", "gauss:x", "gauss:nan", "gauss:99", "cosine"):
        with pytest.raises(ValueError):
            check_filter(bad)
    ramp = ramp_filter_response(64, "ramp", dtype=torch.float64)
    sharp = ramp_filter_response(64, "gauss:-1", dtype=torch.float64)
    soft = ramp_filter_response(64, "gauss:4", dtype=torch.float64)
    assert torch.allclose(ramp_filter_response(64, "gauss:0", dtype=torch.float64), ramp)
    assert sharp[-1] == pytest.approx(ramp[-1].item() * math.e)  # exp(-TAU) at Nyquist
    assert soft[-1] == pytest.approx(ramp[-1].item() * math.exp(-4))


def test_sample_indices():
    assert noise.sample_indices(5) == [0, 1, 2, 3, 4]
    picked = noise.sample_indices(100, 12)
    assert len(picked) == 12 and 0 not in picked and 99 not in picked


# --------------------------------------------------------------------------- scan-matched simulation

def _scanned(anatomy, i0: float, seed: int) -> np.ndarray:
    """The phantom slice scanned at ``i0`` photons per ray (quantum noise, Hann window)."""
    from ldct_cli.physics.lowdose import LowDoseSimulator

    scan = LowDoseSimulator(dose=1.0, i0=i0, noiseless_input=True, seed=seed, pixel_mm=0.7)
    return scan(anatomy[None, None].astype(np.float32))[0].astype(np.float64)


def test_scan_matched_i0_follows_a_dose_modulated_input(anatomy):
    from ldct_cli.physics.lowdose import LowDoseSimulator

    high, low = _scanned(anatomy, 2e5, 1), _scanned(anatomy, 2e5 / 4, 2)  # tube current 4:1
    sim = LowDoseSimulator(dose=0.25, i0=None, recon_filter=None, seed=7, pixel_mm=0.7)
    sim = sim.for_series([high, low])
    out = sim(np.stack([high, low])[:, None].astype(np.float32))
    i0_high, i0_low = (m["i0"] for m in sim.matches)
    assert i0_high / i0_low == pytest.approx(4.0, rel=0.15)
    _, mask = noise.measure_slice(high)
    for k, image in enumerate((high, low)):
        added, own = out[k] - image, image - anatomy
        # a quarter of each slice's own dose adds sqrt(3) times that slice's own noise: exactly
        # so in the level that is matched, and in SD as far as the textures agree (this input
        # was scanned without the simulator's fluence shaping, so its SD / level is lower)
        assert noise.noise_level(added, mask) == pytest.approx(math.sqrt(3) * noise.noise_level(own, mask), rel=0.1)
        assert added[mask].std() == pytest.approx(math.sqrt(3) * own[mask].std(), rel=0.25)
    assert sim.texture is not None and sim.recon_filter.startswith("gauss:")


def test_scan_matched_texture_follows_the_input(anatomy):
    from ldct_cli.physics.lowdose import LowDoseSimulator

    results = {}
    for tau in (5.0, -1.0):
        full = anatomy + textured_noise(tau, 512, 20.0, seed=3)
        sim = LowDoseSimulator(dose=0.25, i0=None, recon_filter=None, seed=1, pixel_mm=0.7).for_series([full])
        low = sim(full[None, None].astype(np.float32))[0]
        stats, _ = noise.measure_slice(low - full + anatomy)
        results[tau] = (sim.texture.tau, stats.sharpness)
    assert results[5.0][0] == pytest.approx(5.0, abs=1.0)
    assert results[-1.0][0] == pytest.approx(-1.0, abs=1.0)
    assert results[-1.0][1] > results[5.0][1] + 0.3  # the inserted noise is sharper too


def test_fixed_i0_and_filter_are_not_matched(anatomy):
    from ldct_cli.physics.lowdose import LowDoseSimulator

    sim = LowDoseSimulator(dose=0.25, i0=1e5, recon_filter="hann", pixel_mm=0.7)
    assert not sim.scan_matched and sim.for_series([anatomy]) is sim
    with pytest.raises(ValueError, match="give i0"):
        LowDoseSimulator(dose=0.5, i0=None, noiseless_input=True)
    with pytest.raises(ValueError, match="gauss:TAU"):
        LowDoseSimulator(dose=0.5, recon_filter="sharp")


def test_difference_stats():
    from ldct_cli.scan_noise import difference_stats

    rng = np.random.default_rng(0)
    full = np.full((2, 128, 128), -1000.0)
    full[:, 16:112, 16:112] = 40.0
    low = full + rng.normal(0, 10, full.shape)
    stats = difference_stats(low, full, crop=64)
    assert stats.sd_body_hu == pytest.approx(10, rel=0.05)
    assert stats.f_avg_cycles == pytest.approx(0.25, abs=0.03)  # white noise: flat radial NPS, mean f to Nyquist
    with pytest.raises(ValueError):
        difference_stats(low[0], full)


def test_texture_offset_shifts_the_fitted_window(anatomy):
    from ldct_cli.physics.lowdose import LowDoseSimulator

    full = anatomy + textured_noise(3.0, 512, 15.0, seed=2)
    base = LowDoseSimulator(dose=0.25, i0=None, recon_filter=None).for_series([full])
    sharper = LowDoseSimulator(dose=0.25, i0=None, recon_filter=None, texture_offset=-2).for_series([full])
    assert sharper.texture == base.texture  # the same measurement ...
    assert check_filter(sharper.recon_filter) == pytest.approx(base.texture.tau - 2, abs=0.01)
    floor = LowDoseSimulator(dose=0.25, i0=None, recon_filter=None, texture_offset=-30).for_series([full])
    assert floor.recon_filter == noise.gauss_filter(-3.0)  # ... kept inside the family's range
    with pytest.raises(ValueError, match="needs recon_filter=None"):
        LowDoseSimulator(dose=0.25, recon_filter="hann", texture_offset=1)

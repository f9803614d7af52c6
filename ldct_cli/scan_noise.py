"""``ldct noise``: a CT series' own quantum noise (SD per slice, texture, NPS) from its images.

The estimator is ``physics.noise``; this module runs it over discovered series and makes
the records, tables and NPS pictures a physicist reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ldct_cli.errors import UsageError


@dataclass
class SliceNoiseRow:
    index: int  # place in the series, in spatial order
    z_mm: float | None
    noise_sd_hu: float | None  # None: too little soft tissue to measure
    level_hu: float | None
    sharpness: float | None
    tissue_pixels: int


@dataclass
class SeriesNoiseReport:
    folder: str
    series_uid: str
    slices: int
    measured: int  # slices that gave an estimate
    pixel_mm: float
    noise_sd_hu: float | None  # median over the measured slices
    noise_sd_range_hu: tuple[float, float] | None
    sharpness: float | None
    recon_filter: str | None  # the fitted window (physics.noise), as ldct simulate uses it
    texture_clipped: bool
    nps_f_avg_mm: float | None  # of the fitted texture
    nps_f_mm: list[float] = field(default_factory=list)  # the fitted texture's radial NPS
    nps_hu2mm2: list[float] = field(default_factory=list)
    rows: list[SliceNoiseRow] = field(default_factory=list)
    error: str | None = None

    def to_dict(self, *, per_slice: bool = True) -> dict:
        out = asdict(self)
        if not per_slice:
            out.pop("rows")
        return out


def texture_nps(recon_filter: str, noise_sd_hu: float, pixel_mm: float, n_views: int = 720,
                size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Radial NPS (f mm^-1, HU^2 mm^2) of stationary noise with the window's texture and SD ``noise_sd_hu``."""
    import torch

    from ldct_cli.metrics import nps_2d, radial_nps
    from ldct_cli.physics.projector import default_angles, default_n_det, fbp

    angles = default_angles(n_views)
    white = torch.randn(1, n_views, default_n_det(size, size), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    image = fbp(white, angles=angles, pixel_mm=1.0, size=(size, size), filter=recon_filter)[0].numpy()
    lo, crop = size // 4, size // 2
    image = image[lo:lo + crop, lo:lo + crop]
    image = image * (noise_sd_hu / image.std())
    return radial_nps(*nps_2d(image, pixel_mm))


def measure_series(series, *, every: int = 1, progress=None) -> SeriesNoiseReport:
    """Noise of one discovered ``Series`` (every ``every``-th slice); never raises for bad data."""
    from ldct_cli.dicom.read import load_slice, rescale_of, stored_to_hu
    from ldct_cli.errors import LdctError
    from ldct_cli.metrics import nps_summary
    from ldct_cli.physics import noise
    from ldct_cli.pipeline import pixel_spacing_mm

    report = SeriesNoiseReport(folder=str(series.folder), series_uid=series.series_uid,
                               slices=series.n_slices, measured=0, pixel_mm=float("nan"),
                               noise_sd_hu=None, noise_sd_range_hu=None, sharpness=None,
                               recon_filter=None, texture_clipped=False, nps_f_avg_mm=None)
    stats: list[tuple[int, object]] = []
    try:
        for index in range(0, series.n_slices, every):
            header, stored = load_slice(series.slices[index].path)
            if not math.isfinite(report.pixel_mm):
                report.pixel_mm = pixel_spacing_mm(header) or 1.0
            image = stored_to_hu(stored, *rescale_of(header))
            stats.append((index, noise.measure_slice(image)[0]))
            if progress:
                progress(1)
    except LdctError as exc:
        report.error = str(exc)
        return report
    measured = noise.series_sharpness([s for _, s in stats])
    fit = noise.fit_texture(measured) if math.isfinite(measured) else None
    positions = [s.position for s in series.slices]
    for index, s in stats:
        sd = s.level_hu * fit.sd_over_level if (fit and s.valid) else None
        z = float(positions[index][2]) if positions[index] else None
        report.rows.append(SliceNoiseRow(
            index=index, z_mm=z, noise_sd_hu=_round(sd), level_hu=_round(s.level_hu if s.valid else None),
            sharpness=_round(s.sharpness if s.valid else None, 4), tissue_pixels=s.pixels))
    sds = [r.noise_sd_hu for r in report.rows if r.noise_sd_hu is not None]
    report.measured = len(sds)
    if fit and sds:
        report.noise_sd_hu = _round(float(np.median(sds)))
        report.noise_sd_range_hu = (min(sds), max(sds))
        report.sharpness = _round(fit.sharpness, 4)
        report.recon_filter = fit.recon_filter
        report.texture_clipped = fit.clipped
        f, nps = texture_nps(fit.recon_filter, report.noise_sd_hu, report.pixel_mm)
        report.nps_f_mm = [round(float(v), 5) for v in f]
        report.nps_hu2mm2 = [round(float(v), 5) for v in nps]
        report.nps_f_avg_mm = _round(nps_summary(f, nps)["f_avg"], 4)
    else:
        report.error = (f"{series.folder}: no slice holds enough soft tissue to measure its noise "
                        f"(at least {noise.MIN_PIXELS} pixels between {noise.TISSUE_HU[0]:g} and "
                        f"{noise.TISSUE_HU[1]:g} HU inside the body)")
    return report


def _round(value, digits: int = 2):
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def measure(input_path: Path, *, every: int = 1, progress=None,
            on_discovered=None) -> tuple[list[SeriesNoiseReport], list]:
    """Noise reports of every CT series under ``input_path``, and the files skipped on the way.

    ``progress(n)`` is called as slices are measured; ``on_discovered(series)`` once the
    series are found."""
    from ldct_cli.dicom.read import discover

    if every < 1:
        raise UsageError(f"--every {every}: give 1 (every slice) or more")
    if not input_path.exists():
        raise UsageError(f"{input_path}: no such file or folder")
    found = discover(input_path)
    if on_discovered:
        on_discovered(found.series)
    return [measure_series(s, every=every, progress=progress) for s in found.series], found


def write_nps_plots(out: Path, reports: list[SeriesNoiseReport]) -> list[Path]:
    """One NPS picture for all series: each series' fitted texture at its measured SD."""
    from ldct_cli.report import write_nps_plot

    curves, f_avg = {}, {}
    for k, r in enumerate(reports):
        if r.nps_f_mm:
            name = f"{k + 1}: {Path(r.folder).name} ({r.recon_filter}, SD {r.noise_sd_hu:g} HU)"
            curves[name] = (np.array(r.nps_f_mm), np.array(r.nps_hu2mm2))
            f_avg[name] = r.nps_f_avg_mm
    if not curves:
        return []
    out.mkdir(parents=True, exist_ok=True)
    return [write_nps_plot(out / "nps.png", curves=curves, f_avg=f_avg,
                           title="Noise power spectrum (fitted to each series' measured noise)")]


# --------------------------------------------------------------------------- realism check

@dataclass
class DifferenceStats:
    """Noise of (low dose - full dose) over a stack: what the simulator is checked on."""

    sd_body_hu: float  # SD inside the body, all slices pooled
    f_avg_cycles: float  # NPS f_avg of the central crop, cycles per pixel (matrix-independent)


def difference_stats(low_hu: np.ndarray, full_hu: np.ndarray, *, crop: int = 256) -> DifferenceStats:
    """SD in the body and NPS f_avg (central ``crop``^2, plane-detrended) of ``low_hu - full_hu`` (n, H, W)."""
    from ldct_cli.metrics import body_mask, nps_2d, nps_summary, radial_nps

    low = np.asarray(low_hu, dtype=np.float64)
    full = np.asarray(full_hu, dtype=np.float64)
    if low.shape != full.shape or low.ndim != 3:
        raise ValueError(f"expected two (n, H, W) stacks of one shape, got {low.shape} and {full.shape}")
    diff = low - full
    body = np.stack([body_mask(image) for image in full])
    height, width = diff.shape[1:]
    crop = min(crop, height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    nps, fx, fy = nps_2d(diff[:, top:top + crop, left:left + crop], 1.0)
    return DifferenceStats(sd_body_hu=float(diff[body].std()),
                           f_avg_cycles=nps_summary(*radial_nps(nps, fx, fy))["f_avg"])


def simulation_realism(full_folder: Path, low_folder: Path, *, dose: float = 0.25, i0: float | None = None,
                       recon_filter: str | None = None, seed: int = 1) -> dict:
    """Simulate ``dose`` from the full-dose series in ``full_folder`` (scan-matched unless ``i0``
    / ``recon_filter`` fix it) and compare (simulated - FD) with (real low dose - FD), slices
    paired by position: SD in the body and NPS f_avg, and their ratios."""
    from ldct_cli.evaluate import load_input, pair_by_position
    from ldct_cli.physics.lowdose import LowDoseSimulator

    full, = load_input(Path(full_folder))
    low, = load_input(Path(low_folder))
    pairs = pair_by_position(full, low)
    if not pairs:
        raise UsageError(f"{full_folder} and {low_folder} share no slice position")
    full_hu = full.read_hu([i for i, _ in pairs])
    real_hu = low.read_hu([j for _, j in pairs])
    simulator = LowDoseSimulator(dose=dose, i0=i0, recon_filter=recon_filter, seed=seed).for_series(list(full_hu))
    sim_hu = simulator(full_hu[:, None], pixel_mm=full.pixel_mm)
    real = difference_stats(real_hu, full_hu)
    sim = difference_stats(sim_hu, full_hu)
    i0s = [m["i0"] for m in simulator.matches]
    return {
        "slices": len(pairs), "recon_filter": simulator.recon_filter,
        "i0_median": float(np.median(i0s)) if i0s else None,
        "noise_level_hu": simulator.series_level_hu,
        "sd_real_hu": round(real.sd_body_hu, 2), "sd_sim_hu": round(sim.sd_body_hu, 2),
        "sd_ratio": round(sim.sd_body_hu / real.sd_body_hu, 3),
        "f_avg_real": round(real.f_avg_cycles, 4), "f_avg_sim": round(sim.f_avg_cycles, 4),
        "f_avg_ratio": round(sim.f_avg_cycles / real.f_avg_cycles, 3),
    }

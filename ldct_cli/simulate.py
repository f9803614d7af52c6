"""Simulated low dose for full-dose series (``ldct simulate``) and synthetic phantoms (``ldct phantom``).

The physics (projection-domain noise insertion) lives in ``ldct_cli.physics``; this module
turns it into derived DICOM series through the same streaming pipeline as ``denoise``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldct_cli.dicom.write import Derivation
from ldct_cli.errors import LdctError, UsageError
from ldct_cli.pipeline import DenoiseOptions, RunSummary, now_for_dicom, run_denoise


def dose_label(dose: float) -> str:
    """'dose25' for 0.25: short, safe in folder names and Series Descriptions."""
    return f"dose{dose * 100:g}".replace(".", "p")


MATCHED = "matched"  # the i0 setting of scan-matched photon counts
FITTED = "fitted"  # the recon_filter setting of a texture fitted per series


def simulation_derivation(*, dose: float, i0: float | None, electronic_noise: float, seed: int,
                          n_views: int, options: DenoiseOptions, recon_filter: str | None = "hann",
                          texture_offset: float = 0.0) -> Derivation:
    """The derivation written into simulated series (no CID 7203 code fits noise insertion).

    ``i0`` None: scan-matched per slice; ``recon_filter`` None: fitted per series (the
    series' own values are appended by ``ScanMatched.adapt_to_series``).
    """
    from ldct_cli._version import __version__

    date, time = now_for_dicom()
    counts = ("I0 per slice matched to the slice's measured full-dose noise" if i0 is None
              else f"I0 {i0:.3g} photons/ray at full dose")
    window = "FBP window fitted to the series' noise texture" if recon_filter is None else f"{recon_filter} FBP"
    if texture_offset:
        window += f" with TAU {texture_offset:+g}"
    description = (f"Simulated {dose * 100:g}% dose by ldct-cli {__version__}: projection-domain "
                   f"noise insertion, {counts}, electronic noise sigma {electronic_noise:g} counts, "
                   f"parallel beam {n_views} views, {window}, seed {seed}")
    settings = (("kind", "simulate"), ("dose", repr(float(dose))),
                ("i0", MATCHED if i0 is None else repr(float(i0))),
                ("electronic_noise", repr(float(electronic_noise))), ("seed", str(seed)),
                ("n_views", str(n_views)), ("recon_filter", FITTED if recon_filter is None else recon_filter))
    if texture_offset:  # only when set, so the UIDs of unshifted runs stay what they were
        settings += (("texture_offset", repr(float(texture_offset))),)
    return Derivation(label=dose_label(dose), description=description, settings=settings, code=None,
                      transfer_syntax=options.transfer_syntax,
                      series_number_offset=options.series_number_offset,
                      processed_date=date, processed_time=time)


class ScanMatched:
    """A ``LowDoseSimulator`` for the pipeline that fits each series before simulating it.

    ``adapt_to_series`` reads up to 12 of the series' slices, fits the texture
    (``LowDoseSimulator.for_series``) and appends what it found to the Derivation
    Description; ``series_details`` is what the JSON summary reports per series.
    """

    context_slices = 1

    def __init__(self, simulator):
        self.simulator = simulator
        self.batch_size = simulator.batch_size

    def __call__(self, stack_hu, *, pixel_mm=None):
        return self.simulator(stack_hu, pixel_mm=pixel_mm)

    def fitted_to(self, series) -> "ScanMatched":
        """A copy fitted to ``series`` (a discovered Series), from up to 12 of its slices."""
        from ldct_cli.dicom.read import read_hu
        from ldct_cli.physics.noise import sample_indices

        sample = read_hu(series, sample_indices(series.n_slices))
        return ScanMatched(self.simulator.for_series(sample))

    def adapt_to_series(self, series, derivation: Derivation):
        fitted = self.fitted_to(series)
        return fitted, dataclasses.replace(derivation, description=f"{derivation.description}; {fitted.describe()}")

    @property
    def dose(self) -> float:
        return self.simulator.dose

    def describe(self) -> str:
        sim = self.simulator
        parts = []
        if sim.texture is not None:
            parts.append(f"fitted window {sim.texture.recon_filter} (noise sharpness {sim.texture.sharpness:.3f})")
            if sim.texture_offset:
                parts.append(f"shifted by TAU {sim.texture_offset:+g} to {sim.recon_filter}")
        if sim.i0 is None and sim.series_level_hu is not None:
            parts.append(f"measured full-dose noise level {sim.series_level_hu:.1f} HU (5x5 local-SD mode)")
        return ", ".join(parts) or "nothing measurable: Hann window, reference I0"

    def series_details(self) -> dict:
        sim = self.simulator
        i0s = [m["i0"] for m in sim.matches]
        return {
            "i0": "matched" if sim.i0 is None else sim.i0,
            "recon_filter": sim.recon_filter,
            "texture_offset": sim.texture_offset,
            "texture": None if sim.texture is None else dataclasses.asdict(sim.texture),
            "noise_level_hu": sim.series_level_hu,
            "i0_per_slice": i0s,
            "i0_median": float(np.median(i0s)) if i0s else None,
            "slices_without_own_estimate": sum(1 for m in sim.matches if m.get("own") is False),
        }


def build_simulator(*, dose: float, i0: float | None = None, electronic_noise: float = 0.0,
                    seed: int = 0, n_views: int = 720, device: str = "auto", batch_size: int = 4,
                    options: DenoiseOptions = DenoiseOptions(), recon_filter: str | None = None,
                    texture_offset: float = 0.0):
    """Return ``(simulator, Derivation)`` for the pipeline; options checked first.

    Scan-matched by default: ``i0`` None sets each slice's photon count from its own
    measured noise, ``recon_filter`` None fits the window to each series' texture
    (``physics.noise``). Give either to fix it. The simulator is a ``ScanMatched``
    wrapper whenever something is matched. ``texture_offset`` shifts the fitted TAU (a
    sharper window below 0, softer above): a spread of kernels around the scan's own.
    """
    if not 0.0 < dose < 1.0:
        raise UsageError(f"--dose {dose}: must be a fraction of the full dose, between 0 and 1 (e.g. 0.25)")
    if electronic_noise < 0:
        raise UsageError("--electronic-noise must be 0 or more")
    if n_views < 16:
        raise UsageError("--views must be at least 16")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    from ldct_cli.inference import resolve_device
    from ldct_cli.physics.lowdose import LowDoseSimulator
    from ldct_cli.physics.projector import check_filter

    if i0 is not None and not i0 > 0:
        raise UsageError("--i0 must be positive")
    if recon_filter is not None:
        try:
            check_filter(recon_filter)
        except ValueError as exc:
            raise UsageError(f"--filter: {exc}") from None
        if texture_offset:
            raise UsageError("a texture offset (--texture-offset, --texture-spread) shifts the fitted "
                             "texture: leave --filter out")
    simulator = LowDoseSimulator(dose=dose, i0=i0, electronic_noise=electronic_noise, seed=seed,
                                 n_views=n_views, device=resolve_device(device), batch_size=batch_size,
                                 recon_filter=recon_filter, texture_offset=texture_offset)
    if simulator.scan_matched:
        simulator = ScanMatched(simulator)
    return simulator, simulation_derivation(dose=dose, i0=i0, electronic_noise=electronic_noise,
                                            seed=seed, n_views=n_views, options=options,
                                            recon_filter=recon_filter, texture_offset=texture_offset)


def simulate(input_path: Path | str, output_dir: Path | str, *, dose: float,
             i0: float | None = None, electronic_noise: float = 0.0, seed: int = 0,
             n_views: int = 720, device: str = "auto", batch_size: int = 4,
             options: DenoiseOptions = DenoiseOptions(), recon_filter: str | None = None,
             texture_offset: float = 0.0) -> RunSummary:
    """Write a simulated ``dose`` series for every CT series under ``input_path`` (scan-matched
    unless ``i0`` and ``recon_filter`` are given)."""
    simulator, derivation = build_simulator(dose=dose, i0=i0, electronic_noise=electronic_noise,
                                            seed=seed, n_views=n_views, device=device,
                                            batch_size=batch_size, options=options,
                                            recon_filter=recon_filter, texture_offset=texture_offset)
    return run_denoise(Path(input_path), Path(output_dir), denoiser=simulator, derivation=derivation,
                       options=options)


@dataclass(frozen=True)
class PhantomResult:
    full_dose: Path
    low_dose: Path | None
    slices: int


def make_phantom(output_dir: Path | str, *, n_slices: int = 32, size: int = 512, seed: int = 0,
                 pixel_mm: float = 0.7, slice_mm: float = 3.0, dose: float | None = None,
                 i0: float | None = None, device: str = "auto",
                 options: DenoiseOptions = DenoiseOptions()) -> PhantomResult:
    """Write a synthetic abdominal CT series to ``output_dir/full_dose`` and, with ``dose``,
    its simulated low-dose partner under ``output_dir/<dose label>``.

    The full-dose series itself carries quantum noise (a full-dose simulation from the
    noiseless phantom), so the pair looks like a real full-/low-dose pair.
    """
    from ldct_cli.dicom.create import NewSeries, write_new_series
    from ldct_cli.fsutil import staged_folder
    from ldct_cli.phantom import PhantomSpec, phantom_volume

    if n_slices < 1 or size < 32:
        raise UsageError("--slices must be at least 1 and --size at least 32")
    output_dir = Path(output_dir)
    spec = PhantomSpec(size=size, n_slices=n_slices, pixel_mm=pixel_mm, slice_mm=slice_mm, seed=seed)
    full = output_dir / "full_dose"
    if full.exists() and not options.overwrite:
        raise UsageError(f"{full}: exists already (use --overwrite to replace it)")
    volume = phantom_volume(spec)
    if i0 is None:
        i0 = exposure_controlled_i0(volume[len(volume) // 2], pixel_mm=pixel_mm)
    volume = _full_dose_noise(volume, i0=i0, pixel_mm=pixel_mm, seed=seed, device=device)
    series = NewSeries(key=f"phantom|{spec}", pixel_mm=pixel_mm, slice_mm=slice_mm,
                       description=f"PHANTOM ABDOMEN {slice_mm:g}mm", patient_id=f"LDCT-PHANTOM-{seed}")
    with staged_folder(full, overwrite=options.overwrite) as staging:
        write_new_series(volume, staging, series)
    low = None
    if dose is not None:
        low_root = output_dir / dose_label(dose)
        # The phantom's full dose was made at i0 with the Hann window: its partner too.
        summary = simulate(full, low_root, dose=dose, i0=i0, seed=seed, device=device, options=options,
                           recon_filter="hann")
        if summary.exit_code != 0:
            # the full-dose series exists: a failure here is not a usage error (exit 1)
            raise LdctError(f"{low_root}: simulation failed: "
                            f"{summary.series[0].error if summary.series else 'no series'}")
        low = Path(summary.series[0].output)
    return PhantomResult(full_dose=full, low_dose=low, slices=n_slices)


# 90th percentile of the line integrals through the slice DEFAULT_I0 was calibrated on
# (philips_abdomen_rle_275, slice 138 of 275, 180 views): the reference patient.
REFERENCE_P90 = 4.30


def exposure_controlled_i0(image_hu, *, pixel_mm: float) -> float:
    """Photons per ray for a phantom slice, as a scanner's exposure control would choose them.

    Exposure control raises the tube current for patients who attenuate more, to keep
    image noise roughly constant; here I0 grows with exp(p90 - REFERENCE_P90), so a
    phantom larger or denser than the calibration patient gets that patient's noise
    level instead of far more (the default phantom: p90 5.6, noise 71 HU in the body at
    quarter dose with the reference I0, 37 HU with its own).
    """
    import math

    import numpy as np
    import torch

    from ldct_cli.physics.lowdose import DEFAULT_I0, hu_to_mu
    from ldct_cli.physics.projector import default_angles, forward_project

    image = torch.from_numpy(np.asarray(image_hu, dtype=np.float32))[None]
    p = forward_project(hu_to_mu(image), angles=default_angles(180), pixel_mm=pixel_mm)
    return DEFAULT_I0 * math.exp(max(0.0, float(p.quantile(0.9)) - REFERENCE_P90))


def _full_dose_noise(volume_hu, *, i0: float, pixel_mm: float, seed: int, device: str):
    """Give a noiseless phantom the quantum noise of a full-dose scan (``i0`` photons per ray)."""
    import numpy as np

    from ldct_cli.inference import resolve_device
    from ldct_cli.physics.lowdose import LowDoseSimulator

    full_dose = LowDoseSimulator(dose=1.0, i0=i0, seed=seed, noiseless_input=True,
                                 device=resolve_device(device), pixel_mm=pixel_mm)
    return full_dose(volume_hu[:, None].astype(np.float32))

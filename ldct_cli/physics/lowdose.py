"""Lower-dose CT from full-dose images by projection-domain noise insertion (Yu et al. 2012).

The full-dose image is forward projected to line integrals ``p``; Gaussian noise with
the variance that a dose fraction ``a`` would add (``added_noise_variance``) is drawn
independently per ray; its filtered back-projection, in HU, is added to the input.
FBP is linear, so reconstructing the noise alone equals reconstructing ``p + noise``
minus the (already present) full-dose image, without the projector's blur on it.

L. Yu, M. Shiung, D. Jondal, C. H. McCollough, "Development and validation of a
practical lower-dose-simulation tool for optimizing computed tomography scan protocols",
J. Comput. Assist. Tomogr. 36(4):477-487, 2012 (the method of the Mayo / AAPM Low Dose CT
Grand Challenge quarter-dose data).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ldct_cli.physics.projector import check_filter, default_angles, fbp, forward_project

# Linear attenuation of water [1/mm] at ~70 keV, the effective energy of a 120 kVp CT
# beam: NIST XCOM / Hubbell & Seltzer (NISTIR 5632) give mu/rho = 0.2059 cm^2/g at 60 keV
# and 0.1837 at 80 keV; log-log interpolation gives 0.1935 cm^2/g at 70 keV, density 1.
MU_WATER = 0.0193
AIR_HU = -1000.0

# Photons per ray at full dose, calibrated by ``python tools/calibrate_i0.py``:
# quarter dose of shared/data/ct/philips_abdomen_rle_275 (Philips Brilliance 16P, 120 kVp,
# 300 mAs, 0.78 mm pixels), 10 middle slices, seed 0, 720 views, Hann filter; mean PSNR
# of LD vs FD in the [-160, 240] HU window (L = 400), target 27.5 dB (the Mayo challenge's
# quarter dose). Measured: I0 = 1e4: 21.18 dB, 2e4: 23.91, 5e4: 27.71, 1e5: 30.67,
# 2e5: 33.66; 4.8e4: 27.54 dB. It is an effective count for this geometry (pixel-wide
# bins, 720 views), not a scanner's per-cell flux: image noise variance ~ 1 / (I0 views).
DEFAULT_I0 = 4.8e4


def hu_to_mu(image_hu: torch.Tensor) -> torch.Tensor:
    """Attenuation [1/mm] of HU images: MU_WATER (1 + HU / 1000); below -1000 HU is air (0)."""
    return MU_WATER * (1 + image_hu.clamp(min=AIR_HU) / 1000)


def mu_to_hu(mu: torch.Tensor) -> torch.Tensor:
    """HU of attenuation images [1/mm] (the inverse of ``hu_to_mu`` above air)."""
    return 1000 * (mu / MU_WATER - 1)


def _check_counts(i0: float, electronic_noise: float) -> None:
    if not (i0 > 0 and math.isfinite(i0)):
        raise ValueError(f"i0 (photons per ray at full dose) must be positive, got {i0!r}")
    if not (electronic_noise >= 0 and math.isfinite(electronic_noise)):
        raise ValueError(f"electronic_noise (sigma_e, counts) must be >= 0, got {electronic_noise!r}")


def _expected_counts(p: torch.Tensor, i0: float) -> torch.Tensor:
    # Rays through more than ln(i0) of attenuation would see less than one photon, where
    # the log-domain Gaussian model no longer holds (photon starvation): cap them there
    # so metal or a huge patient gives strong but finite noise, never inf.
    return i0 * torch.exp(-p.clamp(min=0.0, max=math.log(i0)))


def quantum_noise_variance(p: torch.Tensor, *, i0: float, electronic_noise: float = 0.0) -> torch.Tensor:
    """Variance of measured line integrals ``p`` at ``i0`` photons per unattenuated ray.

    Counts N = i0 e^-p have variance N + sigma_e^2 (Poisson plus Gaussian electronic
    noise, sigma_e = ``electronic_noise`` in counts); through p = -ln(N / i0) that is
    (N + sigma_e^2) / N^2 = e^p / i0 + sigma_e^2 e^(2p) / i0^2. Use it to make a
    quantum-limited scan from a noiseless (phantom) sinogram.
    """
    _check_counts(i0, electronic_noise)
    counts = _expected_counts(p, i0)
    return (counts + electronic_noise**2) / counts**2


def added_noise_variance(p: torch.Tensor, *, dose: float, i0: float,
                         electronic_noise: float = 0.0) -> torch.Tensor:
    """Variance to add to a full-dose sinogram ``p`` so that it becomes dose fraction ``dose``.

    With N = i0 e^-p counts at full dose and a = ``dose``: the full-dose data has variance
    (N + s^2) / N^2 and the lower-dose data (a N + s^2) / (a N)^2 (s = sigma_e, electronic
    noise in counts, the same at both doses). Their difference is the variance to add:

        (1 - a) / a * e^p / i0 * [1 + (1 + a) / a * s^2 e^p / i0]
        = (1 - a) / a * e^p / i0 + (1 - a)(1 + a) / a^2 * s^2 e^(2p) / i0^2,

    the log-domain form of Yu et al. 2012 (their count-domain insertion adds variance
    a (1 - a) N + (1 - a^2) s^2 to the scaled counts a N).
    """
    if not (0 < dose <= 1):
        raise ValueError(f"dose must be a fraction of the full dose in (0, 1], got {dose!r}")
    _check_counts(i0, electronic_noise)
    counts = _expected_counts(p, i0)
    quantum = (1 - dose) / dose / counts
    electronic = (1 - dose) * (1 + dose) / dose**2 * electronic_noise**2 / counts**2
    return quantum + electronic


# Scan-matched mode shapes the fluence across rays as a bowtie filter and angular tube-current
# modulation do: a ray's photons grow as (e^p)^FLUENCE_EXPONENT (0.5 is Gies et al.'s
# dose-optimal angular modulation, "Dose reduction in CT by anatomically adapted tube current
# modulation", Med Phys 26:2235, 1999, applied per ray). Without it, the few rays through the
# widest chord carry most of the variance and streak the noise with low frequencies that a
# smooth-kernel scan does not show (the AAPM/Mayo B30f check: SD 1.36x the real one, 1.21x
# with it; sharp kernels barely move). Exponent 1 would equalise every ray's variance.
FLUENCE_EXPONENT = 0.5


def shaped_line_integrals(p: torch.Tensor, exponent: float = FLUENCE_EXPONENT) -> torch.Tensor:
    """``p - ln w`` for fluence weights w = (e^p)^exponent normalised to mean 1 per slice.

    Counts at ``i0`` are i0 w e^-p, so the variance formulas above, given these line
    integrals, give each ray its shaped photon count at the same mean fluence ``i0``.
    """
    log_w = exponent * p
    log_w = log_w - torch.logsumexp(log_w.flatten(1), dim=1).view(-1, 1, 1) + math.log(p[0].numel())
    return p - log_w


def slice_seed(seed: int, image_hu: np.ndarray) -> int:
    """A 63-bit generator seed from ``seed`` and one slice's float32 pixel bytes.

    blake2b rather than ``hash()``: it is the same in every process and every run, so a
    slice gets the same noise whichever batch (or worker) it lands in.
    """
    digest = hashlib.blake2b(np.ascontiguousarray(image_hu, dtype=np.float32).tobytes(),
                             digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") >> 1


def inscribed_circle(height: int, width: int, *, device=None) -> torch.Tensor:
    """(H, W) bool: pixel centres within the circle inscribed in the image (the scan field of view)."""
    y = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    return y[:, None] ** 2 + x**2 <= (min(height, width) / 2) ** 2


class LowDoseSimulator:
    """Turns (B, 1, H, W) full-dose HU slices into (B, H, W) HU at ``dose`` x the dose.

    Projection-domain noise insertion (Yu et al. 2012) on a parallel-beam geometry of
    ``n_views`` views over 180 degrees, reconstructed with ``recon_filter``: Hann by
    default, whose noise power peaks near 0.25 of Nyquist like a soft-tissue kernel's
    (the ramp's stays high up to Nyquist: a grainier texture than clinical images show).
    ``electronic_noise`` is sigma_e in detector counts. With ``noiseless_input`` the input
    is taken as noise-free (a phantom) and gets the whole quantum noise of ``dose * i0``
    photons instead of the difference between two doses. Noise for a slice is drawn from
    a generator seeded with (``seed``, its pixel bytes): reproducible and independent of
    batching. Used like a denoiser by the pipeline (``context_slices``, ``batch_size``).

    Scan-matched (``physics.noise``): with ``i0=None`` each slice gets the photon count
    at which the full-dose noise this model predicts for it has the slice's own measured
    level, so ``dose`` is a fraction of that scan's actual (tube-current-modulated) dose;
    with ``recon_filter=None`` the noise is reconstructed with the ``gauss:TAU`` window
    fitted to the scan's texture: per series through ``for_series`` (what ``ldct simulate``
    and ``ldct prepare`` do), else from each slice alone. ``matches`` collects what each
    slice measured and was given.
    """

    context_slices = 1

    def __init__(self, *, dose: float, i0: float | None = DEFAULT_I0, electronic_noise: float = 0.0,
                 seed: int = 0, n_views: int = 720, device: str | torch.device = "cpu",
                 pixel_mm: float | None = None, batch_size: int = 4, recon_filter: str | None = "hann",
                 noiseless_input: bool = False, texture_offset: float = 0.0):
        if not (0 < dose <= 1):
            raise ValueError(f"dose must be a fraction of the full dose in (0, 1], got {dose!r}")
        if i0 is not None:
            _check_counts(i0, electronic_noise)
        elif noiseless_input:
            raise ValueError("a noiseless input has no noise to match: give i0")
        else:
            _check_counts(DEFAULT_I0, electronic_noise)
        if n_views < 2:
            raise ValueError(f"n_views must be at least 2, got {n_views}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if recon_filter is not None:
            check_filter(recon_filter)
        if texture_offset and recon_filter is not None:
            raise ValueError("texture_offset shifts a fitted texture: it needs recon_filter=None")
        if not math.isfinite(texture_offset):
            raise ValueError(f"texture_offset must be a finite number of TAU, got {texture_offset!r}")
        if pixel_mm is not None and not pixel_mm > 0:
            raise ValueError(f"pixel_mm must be positive, got {pixel_mm!r}")
        self.dose = float(dose)
        self.i0 = None if i0 is None else float(i0)
        self.electronic_noise = float(electronic_noise)
        self.seed = int(seed)
        self.n_views = int(n_views)
        self.device = torch.device(device)
        self.pixel_mm = pixel_mm
        self.batch_size = int(batch_size)
        self.recon_filter = recon_filter
        self.noiseless_input = bool(noiseless_input)
        self.angles = default_angles(self.n_views)
        self.texture_offset = float(texture_offset)  # added to every fitted TAU (a spread of kernels)
        self.texture = None  # the series' TextureFit, once for_series fitted one
        self.series_level_hu = None  # the series' median noise level, for slices with no own estimate
        self.matches: list[dict] = []

    @property
    def scan_matched(self) -> bool:
        return self.i0 is None or self.recon_filter is None

    def for_series(self, sample_hu: list[np.ndarray]) -> "LowDoseSimulator":
        """A copy for one series, its texture fitted on ``sample_hu`` (some of its slices, HU).

        Returns ``self`` unchanged when nothing is scan-matched. When the sample holds too
        little soft tissue to measure, the copy fits each slice on its own.
        """
        import copy

        from ldct_cli.physics import noise

        if not self.scan_matched:
            return self
        stats = [noise.measure_slice(image)[0] for image in sample_hu]
        twin = copy.copy(self)
        twin.matches = []
        levels = [s.level_hu for s in stats if s.valid]
        twin.series_level_hu = float(np.median(levels)) if levels else None
        if self.recon_filter is None:
            measured = noise.series_sharpness(stats)
            if math.isfinite(measured):
                twin.texture = noise.fit_texture(measured, self.n_views)
                twin.recon_filter = self._offset_filter(twin.texture.tau)
        return twin

    def noise_variance(self, p: torch.Tensor, i0: float | None = None) -> torch.Tensor:
        """Per-ray variance (B, V, D) inserted into line integrals ``p`` of the input."""
        i0 = self.i0 if i0 is None else i0
        if self.noiseless_input:
            return quantum_noise_variance(p, i0=self.dose * i0, electronic_noise=self.electronic_noise)
        return added_noise_variance(p, dose=self.dose, i0=i0, electronic_noise=self.electronic_noise)

    def _offset_filter(self, tau: float) -> str:
        """The gauss window at a fitted ``tau`` plus ``texture_offset``, kept in the family's range."""
        from ldct_cli.physics.noise import gauss_filter
        from ldct_cli.physics.projector import GAUSS_TAU_RANGE

        low, high = GAUSS_TAU_RANGE
        return gauss_filter(min(max(tau + self.texture_offset, low), high))

    def _noise_hu(self, white, variance, fov, *, pixel_mm, size, recon_filter) -> torch.Tensor:
        noise_mu = fbp(white * variance.sqrt(), angles=self.angles, pixel_mm=pixel_mm, size=size,
                       filter=recon_filter)
        return torch.where(fov, noise_mu * (1000 / MU_WATER), 0.0)

    def _matched_slice(self, image_hu: np.ndarray, p: torch.Tensor, white: torch.Tensor, fov,
                       *, pixel_mm: float) -> torch.Tensor:
        """(H, W) noise in HU for one slice, scan-matched in level and/or texture."""
        from ldct_cli.physics import noise

        size = image_hu.shape
        stats, mask = noise.measure_slice(image_hu)
        record: dict = {}
        recon_filter = self.recon_filter
        if recon_filter is None:  # no series fit: this slice's own texture, else the Hann default
            fitted = noise.fit_texture(stats.sharpness, self.n_views) if stats.valid else None
            recon_filter = self._offset_filter(fitted.tau) if fitted else "hann"
            record["recon_filter"] = recon_filter
        if self.i0 is not None:
            record.update(i0=self.i0, level_hu=stats.level_hu if stats.valid else None)
            self.matches.append(record)
            return self._noise_hu(white, self.noise_variance(p), fov, pixel_mm=pixel_mm, size=size,
                                  recon_filter=recon_filter)
        # The full-dose noise this slice would have at the reference count, read where the
        # slice was read; noise SD scales as 1 / sqrt(I0).
        p = shaped_line_integrals(p)
        reference = self._noise_hu(white, quantum_noise_variance(p, i0=DEFAULT_I0), fov,
                                   pixel_mm=pixel_mm, size=size, recon_filter=recon_filter)
        target, where = (stats.level_hu, mask) if stats.valid else (self.series_level_hu, None)
        if where is None:  # too little soft tissue: the series' level, read over the body
            from ldct_cli.metrics import body_mask

            where = body_mask(image_hu) & fov.cpu().numpy()
        predicted = noise.noise_level(reference[0].cpu().numpy(), where) if where.sum() >= noise.MIN_PIXELS else math.nan
        if target is None or not (predicted > 0 and target > 0):
            i0, scale = DEFAULT_I0, 1.0  # nothing to match (an empty or air slice)
        else:
            scale = target / predicted
            i0 = DEFAULT_I0 / scale**2
        record.update(i0=round(i0, 1), level_hu=round(target, 3) if target else None, own=stats.valid)
        self.matches.append(record)
        if self.electronic_noise == 0:
            # Added quantum variance is (1 - a) / a times the full dose's, at any I0.
            return reference * (scale * math.sqrt((1 - self.dose) / self.dose))
        return self._noise_hu(white, self.noise_variance(p, i0=i0), fov, pixel_mm=pixel_mm, size=size,
                              recon_filter=recon_filter)

    @torch.inference_mode()
    def __call__(self, stack_hu: np.ndarray, *, pixel_mm: float | None = None) -> np.ndarray:
        """(B, 1, H, W) HU -> (B, H, W) float32 HU with the noise of the lower dose added.

        ``pixel_mm`` (the series' Pixel Spacing) overrides the constructor's; one of the
        two is required, since noise depends on path lengths in mm.
        """
        stack_hu = np.asarray(stack_hu)
        if stack_hu.ndim != 4 or stack_hu.shape[1] != self.context_slices:
            raise ValueError(f"expected (B, {self.context_slices}, H, W) HU, got {stack_hu.shape}")
        pixel_mm = self.pixel_mm if pixel_mm is None else pixel_mm
        if pixel_mm is None:
            raise ValueError("pixel_mm is required: pass the series' Pixel Spacing here or to LowDoseSimulator")
        pixel_mm = float(pixel_mm)
        if not (pixel_mm > 0 and math.isfinite(pixel_mm)):
            raise ValueError(f"pixel_mm must be positive, got {pixel_mm!r}")
        slices = np.ascontiguousarray(stack_hu[:, 0], dtype=np.float32)
        if not np.isfinite(slices).all():
            raise ValueError("input HU contains NaN or infinite values")
        height, width = slices.shape[-2:]
        fov = inscribed_circle(height, width, device=self.device)
        out = np.empty_like(slices)
        for start in range(0, len(slices), self.batch_size):
            batch = slices[start:start + self.batch_size]
            image_hu = torch.from_numpy(batch).to(self.device)
            p = forward_project(hu_to_mu(image_hu), angles=self.angles, pixel_mm=pixel_mm)
            # One generator per slice (CPU, so CPU and CUDA runs draw the same numbers).
            white = torch.stack([
                torch.randn(p.shape[1:], generator=torch.Generator().manual_seed(slice_seed(self.seed, s)))
                for s in batch
            ]).to(self.device)
            if self.scan_matched:
                noise_hu = torch.stack([
                    self._matched_slice(batch[k], p[k:k + 1], white[k:k + 1], fov, pixel_mm=pixel_mm)[0]
                    for k in range(len(batch))])
            else:
                noise_hu = self._noise_hu(white, self.noise_variance(p), fov, pixel_mm=pixel_mm,
                                          size=(height, width), recon_filter=self.recon_filter)
            out[start:start + len(batch)] = (image_hu + noise_hu).cpu().numpy()
        return out

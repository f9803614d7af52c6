"""Parallel-beam forward projection and filtered back-projection in vectorized torch.

Geometry (the conventions of scikit-image's ``radon`` / ``iradon``, so it can be the test
oracle): an image pixel at column ``c`` and row ``r`` of an (H, W) image sits at
``x = c - (W - 1) / 2``, ``y = (H - 1) / 2 - r`` pixels (x right, y up, origin at the image
centre). A ray of view angle ``theta`` and detector coordinate ``t`` is the line
``x cos(theta) + y sin(theta) = t``; detector bin ``j`` of ``D`` sits at
``t = j - (D - 1) / 2`` pixels, so the spacing equals the pixel spacing and bin indices grow
with ``t``. At ``theta = 0`` a projection is the column sum (``t`` = column); at ``pi / 2``
it is the row sum, bins running from the bottom row to the top.

scikit-image (``circle=False``) rotates about pixel ``(H // 2, W // 2)`` and puts ``t = 0``
at bin ``D // 2`` of ``ceil(sqrt(2) max(H, W))`` bins. For odd sizes that is our geometry,
bin for bin (we may have one bin more at the end, see ``default_n_det``); for even sizes
its centre is half a pixel off ours. Its sinogram is (D, V); ours is (B, V, D).

Both operators resample with ``grid_sample`` (bilinear), a chunk of views per call:
forward projection samples the image on a rotated grid with 1-pixel steps along each ray
and sums (like ``radon``); back-projection samples each filtered view at every pixel's
``t`` by linear interpolation (like ``iradon``). The ramp filter is Kak & Slaney's
spatially sampled ramp (Principles of Computerized Tomographic Imaging, 1988, ch. 3,
eq. 61), applied by FFT with zero padding to at least twice the detector length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FILTERS = ("ramp", "shepp-logan", "hann")
# The fitted family (``physics.noise``): ramp x exp(-TAU (f / 0.5)^2), written "gauss:TAU".
GAUSS_PREFIX = "gauss:"
GAUSS_TAU_RANGE = (-3.0, 40.0)
# Samples per image channel in one chunk of views (~1 M: 2 views of a 512 x 512 slice).
# Memory per chunk grows with the batch, but the chunking does not depend on it, so a
# slice's result is bit-for-bit the same whatever batch it is in.
_CHUNK_SAMPLES = 1 << 20


def default_angles(n_views: int = 720) -> torch.Tensor:
    """``n_views`` view angles [rad] evenly spaced over [0, pi), float64 on the CPU."""
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    return torch.arange(n_views, dtype=torch.float64) * (math.pi / n_views)


def default_n_det(height: int, width: int) -> int:
    """Detector bins covering the whole (H, W) image at every angle.

    ceil(diagonal), plus one when needed to give it the parity of W, so that at
    theta = 0 the bins sit on pixel columns (an even 512 x 512 image gets 726, not 725).
    """
    n_det = math.ceil(math.hypot(height, width))
    return n_det + (n_det - width) % 2


def _n_steps(height: int, width: int) -> int:
    """Samples per ray (1 pixel apart) spanning the image's circumscribed circle, on rows at theta = 0."""
    return default_n_det(width, height)


def _check_angles(angles: torch.Tensor) -> None:
    if not isinstance(angles, torch.Tensor) or angles.ndim != 1 or angles.numel() == 0:
        raise ValueError("angles must be a non-empty 1-D tensor of view angles in radians")


def _check_pixel_mm(pixel_mm: float) -> None:
    if not (pixel_mm > 0 and math.isfinite(pixel_mm)):
        raise ValueError(f"pixel_mm must be a positive number, got {pixel_mm!r}")


def _cos_sin(angles: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Trigonometry in float64 so 720 views at 1/4 degree stay exact to float32 precision.
    a = angles.detach().to(device="cpu", dtype=torch.float64)
    return a.cos().to(like.device, like.dtype), a.sin().to(like.device, like.dtype)


def _fold_angles(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each angle as (base angle in [0, pi/4], dihedral kind 0-3), when that saves work.

    A square pixel grid is mapped onto itself exactly by flips and 90-degree turns, and
    the view at phi of an image is a view at a base angle of a flipped/turned copy:
    kind 0: phi = b; 1: phi = pi/2 - b; 2: phi = pi/2 + b; 3: phi = pi - b (see
    ``_turn``). Views evenly spread over [0, pi) then need resampling grids for only a
    quarter of the angles. Returns (base angles (U,), base index (V,), kind (V,)), or
    None when some angle is outside [0, pi) or fewer than half the grids would be saved.
    """
    phi = angles.detach().to(device="cpu", dtype=torch.float64)
    if phi.min() < 0 or phi.max() >= math.pi:
        return None
    quarter = math.pi / 4
    kind = torch.bucketize(phi, torch.tensor([quarter, 2 * quarter, 3 * quarter], dtype=torch.float64),
                           right=False)
    base = torch.stack([phi, 2 * quarter - phi, phi - 2 * quarter, math.pi - phi])
    base = base.gather(0, kind[None]).squeeze(0)
    # Angles equal to ~1e-9 rad share a grid (0.25 degree steps are ~4e-3 rad apart).
    base_unique, base_index = torch.unique(torch.round(base * 1e9), return_inverse=True)
    if 2 * len(base_unique) > len(phi):
        return None
    return base_unique / 1e9, base_index, kind


def _turn(images: torch.Tensor, kind: int, *, inverse: bool = False) -> torch.Tensor:
    """Image g with g(x, y) = f(M (x, y)) for the kind's exact symmetry M of a square grid.

    kind 1: M swaps x and y; 2: M (x, y) = (-y, x); 3: M (x, y) = (-x, y). ``inverse``
    applies M's inverse (it differs only for kind 2), which back-projection needs.
    """
    if kind == 0:
        return images
    if kind == 1:
        return images.transpose(-2, -1).flip(-2, -1)
    if kind == 2:
        return torch.rot90(images, 1 if inverse else -1, dims=(-2, -1))
    return images.flip(-1)


def _index_range(centre: float, extent: float, length: int) -> tuple[int, int]:
    """[first, last + 1) of indices i in [0, length) with |i - centre| <= extent."""
    return max(0, math.ceil(centre - extent)), min(length, math.floor(centre + extent) + 1)


def _project(images: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_det: int) -> torch.Tensor:
    """Ray sums (C, V, n_det) of (C, H, W) images in pixel units: rotated grid, 1-pixel steps."""
    channels, height, width = images.shape
    n_steps = _n_steps(height, width)
    t_all = torch.arange(n_det, dtype=images.dtype, device=images.device) - (n_det - 1) / 2
    s_all = torch.arange(n_steps, dtype=images.dtype, device=images.device) - (n_steps - 1) / 2
    scale = images.new_tensor([2 / width, -2 / height])  # pixels (x, y up) -> (x_n, y_n down)
    cos_cpu, sin_cpu = cos.abs().cpu(), sin.abs().cpu()
    chunk = max(1, _CHUNK_SAMPLES // (n_steps * n_det))
    out = images.new_zeros(channels, len(cos), n_det)
    for start in range(0, len(cos), chunk):
        stop = min(start + chunk, len(cos))
        c, sn = cos[start:stop], sin[start:stop]
        # Bilinear samples are non-zero only within half a pixel beyond the image edge:
        # skip the t and s outside that square's shadow (a third of the grid on average).
        half_w, half_h = width / 2 + 0.5, height / 2 + 0.5
        extent_t = float((cos_cpu[start:stop] * half_w + sin_cpu[start:stop] * half_h).max())
        extent_s = float((sin_cpu[start:stop] * half_w + cos_cpu[start:stop] * half_h).max())
        t0, t1 = _index_range((n_det - 1) / 2, extent_t, n_det)
        s0, s1 = _index_range((n_steps - 1) / 2, extent_s, n_steps)
        t, s = t_all[t0:t1], s_all[s0:s1]
        # Normalized grid_sample coordinates of the point t (cos, sin) + s (-sin, cos) pixels,
        # built as a sum of a t-part and an s-part (affine_grid's batched matmul was 3x slower).
        along_t = torch.stack([c, sn], -1)[:, None, None, :] * scale * t[:, None]  # (v, 1, Dt, 2)
        along_s = torch.stack([-sn, c], -1)[:, None, None, :] * scale * s[:, None, None]  # (v, S, 1, 2)
        grid = (along_t + along_s).view(1, -1, len(t), 2)
        samples = F.grid_sample(images.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        out[:, start:stop, t0:t1] = samples.view(channels, stop - start, len(s), len(t)).sum(2)
    return out


def _backproject(views: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:
    """Sum over views of (V, C, D) data smeared along their rays: (C, H, W), linear interpolation."""
    n_views, channels, n_det = views.shape
    views = views.unsqueeze(2)  # (V, C, 1, D): per view a 1-row image, slices as channels
    x = torch.arange(width, dtype=views.dtype, device=views.device) - (width - 1) / 2
    y = (height - 1) / 2 - torch.arange(height, dtype=views.dtype, device=views.device)
    image = views.new_zeros(channels, height, width)
    chunk = max(1, _CHUNK_SAMPLES // (height * width))
    for start in range(0, n_views, chunk):
        c, sn = cos[start:start + chunk], sin[start:start + chunk]
        # Normalized t of each pixel, and row 0 of the 1-row image exactly (y_n = 0).
        t_n = (c[:, None, None] * x + sn[:, None, None] * y[:, None]) * (2 / n_det)  # (v, H, W)
        grid = torch.stack([t_n, torch.zeros_like(t_n)], -1)
        image += F.grid_sample(views[start:start + chunk], grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False).sum(0)
    return image


def forward_project(mu: torch.Tensor, *, angles: torch.Tensor, pixel_mm: float,
                    n_det: int | None = None) -> torch.Tensor:
    """Line integrals (B, V, D), dimensionless, of attenuation images ``mu`` (B, H, W) [1/mm].

    ``n_det`` defaults to ``default_n_det(H, W)``. Each ray is sampled bilinearly every
    pixel over the image's circumscribed circle and summed (times ``pixel_mm``).
    """
    if mu.ndim != 3 or not mu.is_floating_point():
        raise ValueError(f"mu must be a floating (B, H, W) tensor, got {tuple(mu.shape)} {mu.dtype}")
    _check_angles(angles)
    _check_pixel_mm(pixel_mm)
    batch, height, width = mu.shape
    n_det = default_n_det(height, width) if n_det is None else int(n_det)
    folded = _fold_angles(angles) if height == width else None
    if folded is None:
        cos, sin = _cos_sin(angles, mu)
        return _project(mu, cos, sin, n_det) * pixel_mm
    base, base_index, kind = folded
    cos, sin = _cos_sin(base, mu)
    turned = torch.cat([_turn(mu, k) for k in range(4)])  # (4B, H, W)
    sums = _project(turned, cos, sin, n_det).view(4, batch, len(base), n_det)
    kind, base_index = kind.to(mu.device), base_index.to(mu.device)
    return sums[kind, :, base_index].permute(1, 0, 2) * pixel_mm


def check_filter(filter: str) -> str | float:
    """A reconstruction filter's name, or the TAU of a ``gauss:TAU`` one; ValueError otherwise."""
    if filter in FILTERS:
        return filter
    if isinstance(filter, str) and filter.startswith(GAUSS_PREFIX):
        try:
            tau = float(filter[len(GAUSS_PREFIX):])
        except ValueError:
            tau = math.nan
        low, high = GAUSS_TAU_RANGE
        if low <= tau <= high:
            return tau
        raise ValueError(f"filter {filter!r}: TAU must be a number in [{low:g}, {high:g}]")
    raise ValueError(f"filter must be one of {', '.join(FILTERS)} or gauss:TAU, got {filter!r}")


def ramp_filter_response(n_padded: int, filter: str = "ramp", *, device=None,
                         dtype=torch.float32) -> torch.Tensor:
    """Real frequency response (n_padded // 2 + 1,) of the discrete ramp times a window.

    The ramp is Kak & Slaney's spatial-domain one (h[0] = 1/4, h[n odd] = -1/(pi n)^2,
    h[n even] = 0, per pixel^2), transformed; it has no DC hole and no bias, unlike
    sampling |f| directly. Windows: Shepp-Logan sinc(f), Hann (1 + cos 2 pi f) / 2,
    ``gauss:TAU`` exp(-TAU (f / 0.5)^2) (TAU < 0 boosts high frequencies, up to e^-TAU at
    Nyquist, as edge-enhancing clinical kernels do), with f in cycles per detector bin
    (Nyquist 0.5).
    """
    kind = check_filter(filter)
    n = torch.arange(n_padded, dtype=torch.float64)
    n = torch.minimum(n, n_padded - n)  # circular distance: the kernel is symmetric
    h = torch.where(n % 2 == 1, -1.0 / (math.pi * n.clamp(min=1)) ** 2, torch.zeros_like(n))
    h[0] = 0.25
    response = torch.fft.rfft(h).real
    f = torch.fft.rfftfreq(n_padded, dtype=torch.float64)
    if filter == "shepp-logan":
        response = response * torch.sinc(f)
    elif filter == "hann":
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * f))
    elif isinstance(kind, float):
        response = response * torch.exp(-kind * (f / 0.5) ** 2)
    return response.to(device=device, dtype=dtype)


def fbp(sinogram: torch.Tensor, *, angles: torch.Tensor, pixel_mm: float, size: tuple[int, int],
        filter: str = "ramp") -> torch.Tensor:
    """Filtered back-projection of (B, V, D) line integrals into (B, H, W) images [1/mm].

    Views are assumed to cover [0, pi) evenly (weight pi / V each), as from
    ``default_angles``; ``fbp(forward_project(x)) ~= x``.
    """
    if sinogram.ndim != 3 or not sinogram.is_floating_point():
        raise ValueError(f"sinogram must be a floating (B, V, D) tensor, got {tuple(sinogram.shape)}")
    _check_angles(angles)
    _check_pixel_mm(pixel_mm)
    batch, n_views, n_det = sinogram.shape
    if len(angles) != n_views:
        raise ValueError(f"{len(angles)} angles for a sinogram of {n_views} views")
    height, width = (int(v) for v in size)
    # Zero padding to >= 2D (a power of two) keeps the circular convolution from wrapping.
    n_padded = max(64, 1 << math.ceil(math.log2(2 * n_det)))
    response = ramp_filter_response(n_padded, filter, device=sinogram.device, dtype=sinogram.dtype)
    filtered = torch.fft.irfft(torch.fft.rfft(sinogram, n=n_padded) * response, n=n_padded)[..., :n_det]
    folded = _fold_angles(angles) if height == width else None
    if folded is None:
        cos, sin = _cos_sin(angles, sinogram)
        image = _backproject(filtered.transpose(0, 1), cos, sin, height, width)
    else:
        # Each view goes to its base angle's slot for its kind; the four partial images are
        # turned back by the inverse symmetries and summed.
        base, base_index, kind = folded
        cos, sin = _cos_sin(base, sinogram)
        slots = sinogram.new_zeros(len(base), 4, batch, n_det)
        slots.index_put_((base_index.to(sinogram.device), kind.to(sinogram.device)),
                         filtered.transpose(0, 1), accumulate=True)
        partial = _backproject(slots.view(len(base), 4 * batch, n_det), cos, sin, height, width)
        partial = partial.view(4, batch, height, width)
        image = sum(_turn(partial[k], k, inverse=True) for k in range(4))
    # Kak & Slaney's filter is per pixel: / pixel_mm turns (1/mm * mm) back into 1/mm.
    return image * (math.pi / n_views / pixel_mm)

"""Synthetic anatomical abdominal CT phantom, as HU arrays (the DICOM writing lives elsewhere).

An upper-abdomen series from the lung bases down past the kidneys, built from signed
distance functions in millimetres, so ``size`` and ``pixel_mm`` only change how the same
anatomy is sampled::

    spec = PhantomSpec(size=512, n_slices=32, pixel_mm=0.7, slice_mm=3.0, seed=0)
    vol = phantom_volume(spec)             # (n_slices, size, size) float32 HU
    img = phantom_slice(spec, 10)          # == vol[10]
    masks = structure_masks(spec, 10)      # {"liver": bool (H, W), "aorta": ..., ...}

Conventions. Slice 0 is the most superior (lung bases, liver dome); slice ``i`` lies
``i * slice_mm`` below it. Images are in the radiological display orientation of an axial
CT (rows anterior -> posterior, columns patient right -> patient left), i.e. DICOM
ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``; :func:`image_position_mm` gives the
matching ImagePositionPatient. Pixel centres sit at ``(j - (size - 1) / 2) * pixel_mm``.

What is in it: body outline with skin, subcutaneous fat of varying thickness, abdominal
wall and paraspinal/psoas muscles, liver with hepatic/portal veins and gallbladder,
stomach with an air-fluid level, spleen, pancreas, kidneys (cortex, medulla, sinus fat,
pelvis, renal veins), aorta, IVC and mesenteric vessels, vertebrae (cortical rim,
cancellous core, discs, arch, transverse and spinous processes), ribs along the body wall,
lung bases with vessels and the diaphragm in the upper slices, small bowel and colon with
gas, fluid, oral contrast and stool, and low-contrast lesions in the liver and spleen.
Everything moves and changes size smoothly with z. Lesions are placed within the series'
z range, so they depend on ``n_slices``/``slice_mm`` as well as the seed; nothing depends
on ``size``/``pixel_mm``. Edges are anti-aliased with a one-pixel signed-distance ramp
(lesions a little softer); organs carry a few HU of seeded, spatially correlated texture.
Values are clipped to [-1024, 3071].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "PhantomSpec",
    "phantom_volume",
    "phantom_slice",
    "structure_masks",
    "slice_z_mm",
    "image_position_mm",
    "LABELS",
    "HU_MIN",
    "HU_MAX",
    "AIR_HU",
]

HU_MIN, HU_MAX = -1024.0, 3071.0
AIR_HU = -1000.0
_F32 = np.float32


@dataclass(frozen=True)
class PhantomSpec:
    """What to synthesise. Anatomy is defined in mm: ``size``/``pixel_mm`` only resample it."""

    size: int = 512  # matrix (size x size)
    n_slices: int = 32
    pixel_mm: float = 0.7
    slice_mm: float = 3.0
    seed: int = 0
    noise_hu: float = 0.0  # sigma of white noise added on top (0: noiseless)

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 8:
            raise ValueError(f"size must be an integer >= 8, got {self.size!r}")
        if int(self.n_slices) != self.n_slices or self.n_slices < 1:
            raise ValueError(f"n_slices must be an integer >= 1, got {self.n_slices!r}")
        if not (self.pixel_mm > 0 and math.isfinite(self.pixel_mm)):
            raise ValueError(f"pixel_mm must be > 0, got {self.pixel_mm!r}")
        if not (self.slice_mm > 0 and math.isfinite(self.slice_mm)):
            raise ValueError(f"slice_mm must be > 0, got {self.slice_mm!r}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (self.noise_hu >= 0 and math.isfinite(self.noise_hu)):
            raise ValueError(f"noise_hu must be >= 0, got {self.noise_hu!r}")


def slice_z_mm(spec: PhantomSpec, index: int) -> float:
    """Depth of slice ``index`` below the top slice, in mm (the anatomy's z coordinate)."""
    return float(_check_index(spec, index)) * float(spec.slice_mm)


def image_position_mm(spec: PhantomSpec, index: int) -> tuple[float, float, float]:
    """DICOM ImagePositionPatient (LPS, mm) of the first pixel of slice ``index``.

    Slices run head to feet, so z decreases with the index; orientation is [1,0,0,0,1,0].
    """
    c = -(spec.size - 1) / 2.0 * spec.pixel_mm
    return (c, c, -slice_z_mm(spec, index))


# --------------------------------------------------------------------------- labels, tissues

#: Structure labels, in label-map order (0 is air outside the body).
LABELS: tuple[str, ...] = (
    "air", "skin", "fat_subcutaneous", "fat_visceral", "muscle", "liver", "spleen", "pancreas",
    "kidney_cortex", "kidney_medulla", "renal_sinus", "renal_pelvis", "gallbladder", "aorta",
    "ivc", "vessel", "bowel_wall", "bowel_fluid", "bowel_contrast", "bowel_gas", "stool", "lung",
    "lung_vessel", "bone_cortical", "bone_cancellous", "disc", "spinal_canal", "lesion_liver",
    "lesion_spleen",
)
_L = {name: i for i, name in enumerate(LABELS)}
_UNIONS = {
    "kidney": ("kidney_cortex", "kidney_medulla"),
    "fat": ("fat_subcutaneous", "fat_visceral", "renal_sinus"),
    "lesion": ("lesion_liver", "lesion_spleen"),
    "bone": ("bone_cortical", "bone_cancellous"),
}

# Tissue: (label, base HU, coarse-texture amplitude, fine-texture amplitude).
_T = {
    "skin": ("skin", 40.0, 3.0, 3.0),
    "fat_sc": ("fat_subcutaneous", -104.0, 4.0, 5.0),
    "fat_v": ("fat_visceral", -97.0, 4.0, 5.0),
    "muscle": ("muscle", 52.0, 3.0, 4.0),
    "liver": ("liver", 100.0, 3.0, 2.5),
    "spleen": ("spleen", 110.0, 3.0, 2.5),
    "pancreas": ("pancreas", 92.0, 3.0, 9.0),
    "cortex": ("kidney_cortex", 175.0, 5.0, 4.0),
    "medulla": ("kidney_medulla", 112.0, 4.0, 4.0),
    "sinus": ("renal_sinus", -88.0, 4.0, 6.0),
    "pelvis": ("renal_pelvis", 14.0, 1.0, 2.0),
    "gallbladder": ("gallbladder", 12.0, 1.0, 2.0),
    "aorta": ("aorta", 255.0, 3.0, 3.0),
    "ivc": ("ivc", 200.0, 3.0, 3.0),
    "vein": ("vessel", 185.0, 3.0, 3.0),
    "artery": ("vessel", 245.0, 3.0, 3.0),
    "bowel_wall": ("bowel_wall", 72.0, 3.0, 4.0),
    "fluid": ("bowel_fluid", 18.0, 2.0, 3.0),
    "contrast": ("bowel_contrast", 235.0, 8.0, 6.0),
    "gas": ("bowel_gas", -995.0, 1.0, 2.0),
    "stool": ("stool", -140.0, 40.0, 170.0),
    "lung": ("lung", -855.0, 15.0, 22.0),
    "lung_vessel": ("lung_vessel", 25.0, 3.0, 3.0),
    "cortical": ("bone_cortical", 1150.0, 40.0, 40.0),
    "rib_cortical": ("bone_cortical", 1020.0, 40.0, 40.0),
    "cancellous": ("bone_cancellous", 260.0, 20.0, 30.0),
    "rib_cancellous": ("bone_cancellous", 230.0, 20.0, 30.0),
    "disc": ("disc", 90.0, 3.0, 5.0),
    "canal": ("spinal_canal", 22.0, 2.0, 3.0),
}


# --------------------------------------------------------------------------- geometry
#
# Shapes are signed distance functions in mm (negative inside), evaluated on a _Grid: a
# window of the image (X a row of column coordinates, Y a column of row coordinates) or
# a handful of points (used to place vessels, lesions and bowel loops inside organs).


def _ss(e0: float, e1: float, x: float) -> float:
    """Smoothstep from 0 at e0 to 1 at e1 (scalar)."""
    t = min(max((x - e0) / (e1 - e0), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _cap(z: float, zc: float, hz: float) -> float:
    """Cross-section scale of an ellipsoid of half-height hz centred at zc (0 outside)."""
    u = (z - zc) / hz
    return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


def _lerp(a, b, t):
    return a + (b - a) * t


def _deg(x: float) -> float:
    return x * math.pi / 180.0


_NT = 1024
_THETA = np.linspace(-math.pi, math.pi, _NT + 1)
_INF = 1e9


class _Grid:
    def __init__(self, X, Y, key=None, cache=None):
        self.X, self.Y, self.key, self.cache = X, Y, key, cache


class _Shape:
    def bbox(self):  # (xmin, xmax, ymin, ymax) in mm
        raise NotImplementedError

    def sdf(self, g: _Grid):
        raise NotImplementedError


class _Polar(_Shape):
    """Star-shaped region around (cx, cy) with tabulated radius R(theta).

    Signed distance ~ (rho - R) * cos(psi), psi the angle between ray and normal: exact to
    first order at the boundary, which is where the anti-aliasing ramp needs it.
    """

    def __init__(self, cx: float, cy: float, radius: np.ndarray):
        self.cx, self.cy = float(cx), float(cy)
        r = np.maximum(radius, 0.0)
        core = r[:-1]
        dr = (np.roll(core, -1) - np.roll(core, 1)) / (2 * (_THETA[1] - _THETA[0]))
        dr = np.append(dr, dr[0])
        self.R = r.astype(_F32)
        self.cf = (r / np.sqrt(r * r + dr * dr + 1e-12)).astype(_F32)
        self.rmax = float(r.max())

    def bbox(self):
        m = self.rmax
        return (self.cx - m, self.cx + m, self.cy - m, self.cy + m)

    def radius(self, theta):
        return np.interp(theta, _THETA, self.R)

    def _polar(self, g: _Grid):
        key = None if g.key is None else ("polar", self.cx, self.cy) + g.key
        if key is not None and key in g.cache:
            return g.cache[key]
        dx = g.X - _F32(self.cx)
        dy = g.Y - _F32(self.cy)
        rho = np.hypot(dx, dy)
        t = np.arctan2(dy, dx)
        t += _F32(math.pi)
        t *= _F32(_NT / (2 * math.pi))
        i = t.astype(np.int32)
        np.clip(i, 0, _NT - 1, out=i)
        t -= i
        out = (rho, i, t)
        if key is not None:
            g.cache[key] = out
        return out

    def sdf(self, g):
        rho, i, f = self._polar(g)
        r0 = np.take(self.R, i)
        r = r0 + f * (np.take(self.R, i + 1) - r0)
        return (rho - r) * np.take(self.cf, i)


class _Ellipse(_Shape):
    """Ellipse with semi-axes a (along angle rot) and b; distance ~ (r - 1) |grad r|^-1."""

    def __init__(self, cx, cy, a, b, rot=0.0):
        self.cx, self.cy, self.a, self.b, self.rot = float(cx), float(cy), float(a), float(b), float(rot)

    def bbox(self):
        c, s = math.cos(self.rot), math.sin(self.rot)
        hx = math.hypot(self.a * c, self.b * s)
        hy = math.hypot(self.a * s, self.b * c)
        return (self.cx - hx, self.cx + hx, self.cy - hy, self.cy + hy)

    def sdf(self, g):
        c, s = math.cos(self.rot), math.sin(self.rot)
        dx = g.X - _F32(self.cx)
        dy = g.Y - _F32(self.cy)
        p = (dx * _F32(c / self.a)) + (dy * _F32(s / self.a))
        q = (dy * _F32(c / self.b)) - (dx * _F32(s / self.b))
        r = np.sqrt(p * p + q * q)
        gr = np.sqrt((p * _F32(1 / self.a)) ** 2 + (q * _F32(1 / self.b)) ** 2)
        lo, hi = min(self.a, self.b), max(self.a, self.b)
        k = r / np.maximum(gr, _F32(1e-12))
        np.clip(k, lo, hi, out=k)
        return (r - 1) * k


class _Circle(_Shape):
    def __init__(self, cx, cy, r):
        self.cx, self.cy, self.r = float(cx), float(cy), float(r)

    def bbox(self):
        return (self.cx - self.r, self.cx + self.r, self.cy - self.r, self.cy + self.r)

    def sdf(self, g):
        return np.hypot(g.X - _F32(self.cx), g.Y - _F32(self.cy)) - _F32(self.r)


class _Capsule(_Shape):
    """Segment (x0, y0)-(x1, y1) thickened by a radius going from r0 to r1 (tapered)."""

    def __init__(self, x0, y0, x1, y1, r0, r1=None):
        self.p = (float(x0), float(y0), float(x1), float(y1))
        self.r0 = float(r0)
        self.r1 = float(r0 if r1 is None else r1)

    def bbox(self):
        x0, y0, x1, y1 = self.p
        r = max(self.r0, self.r1)
        return (min(x0, x1) - r, max(x0, x1) + r, min(y0, y1) - r, max(y0, y1) + r)

    def sdf(self, g):
        x0, y0, x1, y1 = self.p
        vx, vy = x1 - x0, y1 - y0
        ll = max(vx * vx + vy * vy, 1e-9)
        px = g.X - _F32(x0)
        py = g.Y - _F32(y0)
        h = px * _F32(vx / ll) + py * _F32(vy / ll)
        np.clip(h, 0, 1, out=h)
        d = np.hypot(px - h * _F32(vx), py - h * _F32(vy))
        return d - (_F32(self.r0) + h * _F32(self.r1 - self.r0))


class _HalfPlane(_Shape):
    """nx * x + ny * y <= c."""

    def __init__(self, nx, ny, c):
        n = math.hypot(nx, ny)
        self.n = (nx / n, ny / n)
        self.c = c / n

    def bbox(self):
        return (-_INF, _INF, -_INF, _INF)

    def sdf(self, g):
        return g.X * _F32(self.n[0]) + g.Y * _F32(self.n[1]) - _F32(self.c)


class _Intersect(_Shape):
    def __init__(self, *shapes):
        self.shapes = [s for s in shapes if s is not None]

    def bbox(self):
        bs = [s.bbox() for s in self.shapes]
        return (max(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), min(b[3] for b in bs))

    def sdf(self, g):
        d = self.shapes[0].sdf(g)
        for s in self.shapes[1:]:
            d = np.maximum(d, s.sdf(g))
        return d


class _Subtract(_Shape):
    def __init__(self, a, *b):
        self.a, self.b = a, [s for s in b if s is not None]

    def bbox(self):
        return self.a.bbox()

    def sdf(self, g):
        d = self.a.sdf(g)
        for s in self.b:
            d = np.maximum(d, -s.sdf(g))
        return d


class _Union(_Shape):
    """Union; k > 0 blends the shapes smoothly over about k mm."""

    def __init__(self, *shapes, k=0.0):
        self.shapes, self.k = [s for s in shapes if s is not None], float(k)

    def bbox(self):
        bs = [s.bbox() for s in self.shapes]
        return (min(b[0] for b in bs), max(b[1] for b in bs), min(b[2] for b in bs), max(b[3] for b in bs))

    def sdf(self, g):
        d = self.shapes[0].sdf(g)
        for s in self.shapes[1:]:
            e = s.sdf(g)
            if self.k > 0:
                h = np.maximum(_F32(self.k) - np.abs(d - e), 0) * _F32(1 / self.k)
                d = np.minimum(d, e) - h * h * _F32(self.k / 4)
            else:
                d = np.minimum(d, e)
        return d


class _Offset(_Shape):
    """The shape grown by t mm (shrunk when t < 0)."""

    def __init__(self, shape, t):
        self.s, self.t = shape, float(t)

    def bbox(self):
        b = self.s.bbox()
        t = max(self.t, 0.0)
        return (b[0] - t, b[1] + t, b[2] - t, b[3] + t)

    def sdf(self, g):
        return self.s.sdf(g) - _F32(self.t)


def _ellipse_r(a, b, rot=0.0):
    """Radius table of an ellipse with semi-axes a (along rot) and b."""
    t = _THETA - rot
    return a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2 + 1e-12)


def _harm(terms):
    """1 + sum amp * cos(k theta + phase) over (k, amp, phase)."""
    out = np.ones_like(_THETA)
    for k, amp, ph in terms:
        out += amp * np.cos(k * _THETA + ph)
    return out


def _blob(cx, cy, a, b, rot=0.0, terms=()):
    if not terms:
        return _Ellipse(cx, cy, a, b, rot)
    return _Polar(cx, cy, _ellipse_r(a, b, rot) * _harm(terms))


# --------------------------------------------------------------------------- the patient

@dataclass
class _Tube:
    """Something round running along z: centre (x, y) + v (z - zc), radius r cap(z; zc, hz)."""

    x: float
    y: float
    zc: float
    hz: float
    r: float
    vx: float = 0.0
    vy: float = 0.0
    kind: str = ""
    extra: float = 0.0  # lesion: HU difference; bowel: gas fraction
    organ: str = ""

    def at(self, z):
        dz = z - self.zc
        return self.x + self.vx * dz, self.y + self.vy * dz, self.r * _cap(z, self.zc, self.hz)


class _Patient:
    """Seeded anatomy: every shape is a smooth function of z (mm below the top slice)."""

    def __init__(self, seed: int, n_slices: int, slice_mm: float):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1DC7]))
        z_max = (n_slices - 1) * slice_mm
        self.z_max = z_max

        def n(s=1.0, lim=2.0):
            return s * float(np.clip(rng.normal(), -lim, lim))

        def u(a, b):
            return float(rng.uniform(a, b))

        tau = 2 * math.pi
        self.body_a = 166.0 * (1 + 0.025 * n())
        self.body_b = 121.0 * (1 + 0.025 * n())
        self.body_c = (n(2.0), -4.0 + n(2.0))
        self.body_terms = [(k, u(0.004, 0.011) / (1 + 0.15 * k), u(0, tau), u(-0.012, 0.012)) for k in range(3, 9)]
        self.fat = 1 + n(0.18)
        self.fat_terms = [(k, u(0.05, 0.12), u(0, tau), u(-0.01, 0.01)) for k in (2, 3, 5, 7)]
        self.liver_s = 1 + n(0.04)
        self.liver_d = (n(3.0), n(3.0))
        self.liver_terms = [(k, u(0.015, 0.035), u(0, tau)) for k in (2, 3, 4, 5)]
        self.spleen_s = 1 + n(0.06)
        self.spleen_d = (n(3.0), n(3.0))
        self.kid_d = [(n(2.5), n(2.5), n(4.0)) for _ in range(2)]
        self.stomach_d = (n(4.0), n(4.0), u(0.28, 0.42))
        self.vert_z0 = u(0, 32.0)
        self.rib_phase = [u(0, 34.0), u(0, 34.0)]
        self.tex_seed = int(rng.integers(0, 2**31 - 1))

        # Portal/hepatic vein branches inside the liver.
        self.liver_vessels = []
        for _ in range(300):
            if len(self.liver_vessels) >= 22:
                break
            z, r = u(-10, 165), u(1.6, 4.6)
            p = self._sample(rng, self.liver(z), r + 3)
            if p is not None:
                ang, sp = u(0, tau), u(0.1, 0.7)
                self.liver_vessels.append(_Tube(*p, z, u(12, 40), r, sp * math.cos(ang), sp * math.sin(ang)))

        # Vessels in the lung bases (dots and short segments).
        self.lung_vessels = []
        for _ in range(500):
            if len(self.lung_vessels) >= 70:
                break
            z, r = u(-15, 45), u(0.7, 3.0)
            p = self._sample(rng, self.lung(z), 0.5 * r)
            if p is not None:
                ang, sp = u(0, tau), u(0.0, 1.0)
                self.lung_vessels.append(_Tube(*p, z, u(6, 24), r, sp * math.cos(ang), sp * math.sin(ang)))

        # Small bowel loops where there is room (front and left of the lower abdomen).
        self.bowel = []
        kinds = ("fluid", "contrast", "gas_fluid", "fluid", "contrast", "contrast", "gas_fluid", "fluid", "gas")
        for _ in range(600):
            if len(self.bowel) >= 30:
                break
            # (the first few high up, in the left upper quadrant: jejunum)
            z, r = (u(50, 95) if len(self.bowel) < 6 else u(45, 260)), u(8.0, 13.5)
            region = _Intersect(self.cavity(z), _HalfPlane(0, 1, 15.0 + 0.3 * max(z - 100, 0)),
                                _HalfPlane(1, 0, 100.0), _HalfPlane(-1, 0, 75.0 + 0.5 * max(z - 100, 0)))
            p = self._sample(rng, region, r + 2, avoid=self._avoid(z, self.bowel), gap=r + 2.5)
            if p is not None:
                ang, sp = u(0, tau), u(0.2, 1.0)
                kind = kinds[len(self.bowel) % len(kinds)]
                self.bowel.append(_Tube(*p, z, u(14, 32), r, sp * math.cos(ang), sp * math.sin(ang),
                                        kind=kind, extra=u(0.2, 0.45)))

        # Small mesenteric vessels in the visceral fat.
        self.mesenteric = []
        for _ in range(300):
            if len(self.mesenteric) >= 40:
                break
            z = u(40, 260)
            region = _Intersect(self.cavity(z), _HalfPlane(0, 1, 20.0))
            p = self._sample(rng, region, 8.0)
            if p is not None:
                self.mesenteric.append(_Tube(*p, z, u(10, 30), u(0.8, 2.2), u(-0.5, 0.5), u(-0.5, 0.5)))

        # Low-contrast lesions: liver (mostly hypodense, one hyperdense) and spleen; one
        # liver lesion is centred on the middle slice.
        self.lesions = []
        z_hi = max(z_max, 1.0)
        self._add_lesion(rng, "liver", (n_slices // 2) * slice_mm, 7.5, -14.0, fixed_z=True)
        n_liver = int(np.clip(round(z_hi / 16.0), 3, 8))
        deltas = [-u(10, 20) for _ in range(n_liver)]
        deltas[1] = u(10, 15)
        for dv in deltas:
            self._add_lesion(rng, "liver", u(0, min(z_hi, 150.0)), u(2.5, 10.0), dv)
        self._add_lesion(rng, "spleen", min(u(15, 55), z_hi), u(5.0, 8.0), -u(12, 18))
        if z_hi > 40:
            self._add_lesion(rng, "spleen", u(5, min(z_hi, 80.0)), u(3.0, 6.0), -u(10, 15))

    # -- placement helpers (point evaluations of the same shapes that get drawn) --

    @staticmethod
    def _sample(rng, shape, margin, avoid=(), gap=0.0, n=48):
        """A random point at least ``margin`` inside ``shape`` and ``gap`` outside ``avoid``."""
        xs = rng.uniform(0, 1, n)
        ys = rng.uniform(0, 1, n)
        if shape is None:
            return None
        x0, x1, y0, y1 = shape.bbox()
        g = _Grid((x0 + (x1 - x0) * xs).astype(_F32), (y0 + (y1 - y0) * ys).astype(_F32))
        ok = shape.sdf(g) < -margin
        for other in avoid:
            if other is not None:
                ok &= other.sdf(g) > gap
        hits = np.flatnonzero(ok)
        return None if hits.size == 0 else (float(g.X[hits[0]]), float(g.Y[hits[0]]))

    def _avoid(self, z, tubes):
        cav = self.cavity(z)
        out = [self.liver(z, cav), self.spleen(z, cav), *self.kidneys(z, cav), self.stomach(z, cav),
               _Circle(8.0, 22.0, 30.0), _Circle(-24.0, 8.0, 14.0)]
        for t in tubes:
            x, y, r = t.at(z)
            if r > 0:
                out.append(_Circle(x, y, r))
        return out

    def _add_lesion(self, rng, organ, zc, r, delta, fixed_z=False):
        organ_fn = self.liver if organ == "liver" else self.spleen
        for _ in range(60):
            z = zc if fixed_z else zc + float(rng.uniform(-6, 6))
            cav = self.cavity(z)
            # Clear of other lesions and of what gets drawn over the organ.
            others = [_Circle(o.x, o.y, o.r) for o in self.lesions if abs(z - o.zc) < r + o.r + 3]
            others += [*self.kidneys(z, cav), self.gallbladder(z, cav), self.lung(z, cav), _Circle(-26.0, 4.0, 14.0)]
            p = self._sample(rng, organ_fn(z, cav), r + 4, avoid=others, gap=r + 6)
            if p is not None:
                self.lesions.append(_Tube(*p, z, r, r, organ=organ, extra=delta))
                return
            if not fixed_z:
                zc = float(rng.uniform(0, max(min(self.z_max, 140.0), 1.0)))

    # -- body wall --

    def body_layers(self, z):
        """Skin outline, inner skin (fat starts), fat/muscle boundary, inner muscle boundary."""
        a = self.body_a * (1 + 0.012 * math.sin(z / 55.0 + 0.7))
        b = self.body_b * (1 + 0.015 * math.sin(z / 70.0 + 1.9))
        t = _THETA
        s = np.sin(t)
        p = 2.25 + 0.45 * np.tanh(2.5 * s)  # flatter at the back (lying on the table)
        r = (np.abs(np.cos(t) / a) ** p + np.abs(s / b) ** p) ** (-1.0 / p)
        r = r * _harm([(k, amp, ph + w * z) for k, amp, ph, w in self.body_terms])
        # Subcutaneous fat: thicker in front and on the flanks, thinner at the back.
        ant = np.clip(-s, 0, None) ** 1.5
        flank = np.cos(t) ** 2
        tf = self.fat * (8.0 + 8.0 * ant + 9.0 * flank) * (1 + 0.002 * z)
        tf = tf * _harm([(k, amp, ph + w * z) for k, amp, ph, w in self.fat_terms])
        # Muscle: rectus in front (thin at the linea alba), obliques on the flanks, deep
        # paraspinal/quadratus bulk at the back.
        d_ant = np.angle(np.exp(1j * (t + math.pi / 2)))
        d_post = np.angle(np.exp(1j * (t - math.pi / 2)))
        tm = (10.0 + 3.0 * flank - 5.0 * np.exp(-(d_ant / _deg(4.0)) ** 2)
              + 36.0 * np.exp(-(d_post / _deg(22.0)) ** 2) + 7.0 * np.exp(-(d_post / _deg(45.0)) ** 2))
        cx, cy = self.body_c
        return (_Polar(cx, cy, r), _Polar(cx, cy, r - 2.0), _Polar(cx, cy, r - 2.0 - tf),
                _Polar(cx, cy, r - 2.0 - tf - tm))

    def cavity(self, z):
        return self.body_layers(z)[3]

    # -- organs (cav: the inner boundary of the body wall, to keep them inside it) --

    def liver(self, z, cav=None):
        end = 1.0 - _ss(105.0, 165.0, z)
        if end <= 0.02:
            return None
        cav = self.cavity(z) if cav is None else cav
        sc = self.liver_s * (1.0 - 0.45 * _ss(0.0, 110.0, z)) * math.sqrt(end) * (0.92 + 0.08 * _ss(-40, 10, z))
        dx, dy = self.liver_d
        cx = -64.0 - 30.0 * _ss(10.0, 120.0, z) + dx
        cy = -8.0 - 14.0 * _ss(30.0, 130.0, z) + dy
        parts = [_blob(cx, cy, 92.0 * sc, 100.0 * sc, _deg(12.0),
                       [(k, a, ph + 0.01 * z) for k, a, ph in self.liver_terms])]
        ll = _cap(z, 0.0, 55.0) if z > 0 else 1.0
        if ll > 0.05:  # left lobe, in front of the stomach
            parts.append(_Ellipse(12.0 + dx - 12 * (1 - ll), -78.0 + dy, 64.0 * ll, 21.0 * ll, _deg(-12.0)))
        cd = _cap(z, 20.0, 28.0)
        if cd > 0.05:  # caudate lobe, by the IVC
            parts.append(_Ellipse(-14.0 + dx, 0.0 + dy, 20.0 * cd, 24.0 * cd))
        return _Intersect(_Union(*parts, k=14.0), _Offset(cav, -0.6))

    def gallbladder(self, z, cav=None):
        s = _cap(z, 95.0, 32.0)
        if s <= 0.05:
            return None
        cav = self.cavity(z) if cav is None else cav
        return _Intersect(_Ellipse(-40.0 - 0.25 * (z - 95), -58.0, 19.0 * s, 14.0 * s, _deg(35.0)),
                          _Offset(cav, -1.0))

    def spleen(self, z, cav=None):
        s = _cap(z, 30.0, 62.0)
        if s <= 0.05:
            return None
        cav = self.cavity(z) if cav is None else cav
        s *= self.spleen_s
        dx, dy = self.spleen_d
        cx, cy = 104.0 + dx - 6.0 * (z - 30) / 60, 40.0 + dy - 0.25 * (z - 30)
        ang = math.atan2(cy + 4.0, cx)
        body = _blob(cx, cy, 58.0 * s, 25.0 * s, ang + math.pi / 2, [(3, 0.04, 1.0), (5, 0.025, 2.0)])
        hilum = _Circle(cx - 40.0 * s * math.cos(ang), cy - 40.0 * s * math.sin(ang), 27.0 * s)
        return _Intersect(_Subtract(body, hilum), _Offset(cav, -0.6))

    def stomach(self, z, cav=None):
        s = _cap(z, 20.0, 72.0)
        if s <= 0.05:
            return None
        cav = self.cavity(z) if cav is None else cav
        dx, dy, _ = self.stomach_d
        t = _ss(0.0, 85.0, z)
        cx, cy = _lerp(62.0, 18.0, t) + dx, _lerp(-36.0, -64.0, t) + dy
        a, b = _lerp(46.0, 30.0, t) * s, _lerp(40.0, 20.0, t) * s
        return _Intersect(_blob(cx, cy, a, b, _deg(_lerp(-30.0, -5.0, t)), [(3, 0.05, 0.5), (4, 0.03, 2.0)]),
                          _Offset(cav, -1.0))

    def kidneys(self, z, cav=None):
        """Left (image right, higher) and right kidney outlines; ``.geo`` holds their frame."""
        out = []
        for side, zc, (dx, dy, dz) in ((1, 68.0, self.kid_d[0]), (-1, 84.0, self.kid_d[1])):
            s = _cap(z, zc + dz, 58.0)
            if s <= 0.08:
                out.append(None)
                continue
            w = z - zc - dz
            cx = side * (74.0 + 0.12 * w) + dx
            cy = 48.0 - 0.12 * w + dy
            rot = _deg(-40.0) * side
            shape = _blob(cx, cy, 31.0 * s, 23.0 * s, rot, [(3, 0.03, 1.0 + side)])
            hx, hy = -side * math.cos(_deg(40.0)), -math.sin(_deg(40.0))  # hilum: front, medial
            hs = _cap(w, 0.0, 28.0)
            if hs > 0.05:
                shape = _Subtract(shape, _Circle(cx + hx * 33.0 * s, cy + hy * 33.0 * s, 12.0 * hs * s))
            shape.geo = (cx, cy, s, rot, hx, hy, hs, side, w)
            out.append(shape)
        return out

    def lung(self, z, cav=None):
        """Posterior costophrenic recesses: a crescent along the back of the cavity, thickest
        postero-laterally, thinning as z goes down (the right one ends higher)."""
        sl = _ss(-15.0, 48.0, z)  # left (image right)
        sr = _ss(-20.0, 40.0, z)  # right, above the liver dome
        if min(sl, sr) >= 0.995:
            return None
        cav = self.cavity(z) if cav is None else cav
        th = _THETA
        d_post = np.angle(np.exp(1j * (th - math.pi / 2)))  # > 0 toward image left
        gone = np.where(d_post > 0, sr, sl)
        depth = 0.36 * (np.exp(-((np.abs(d_post) - _deg(50.0)) / _deg(36.0)) ** 2) - gone)
        core = _Polar(cav.cx, cav.cy, cav.R * (1.0 - np.clip(depth, 0.0, None)) - 0.3)
        return _Subtract(_Offset(cav, -0.3), core)


# --------------------------------------------------------------------------- texture
#
# Smooth random fields, unit standard deviation: white noise on a fixed 3D lattice in mm,
# interpolated with cubic B-splines, so they are continuous in z and the same in mm for
# any matrix or pixel size.

_TEX_FIELDS = {"coarse": (1, 7.0), "fine": (2, 1.8)}
_TEX_EXTENT = 320.0  # the lattice covers +-this many mm in x and y (and wraps beyond)


@lru_cache(maxsize=48)
def _tex_plane(seed: int, field: int, k: int) -> np.ndarray:
    spacing = [s for f, s in _TEX_FIELDS.values() if f == field][0]
    n = int(2 * _TEX_EXTENT / spacing) + 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, field, k + 1_000_000]))
    plane = rng.standard_normal((n, n), dtype=_F32)
    plane.setflags(write=False)  # shared through the cache
    return plane


def _bspline_w(f):
    f2, f3 = f * f, f * f * f
    return ((1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6, (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6)


@lru_cache(maxsize=16)
def _tex_axis(size: int, pixel_mm: float, spacing: float):
    """Per pixel centre along one axis: first lattice node (index) and 4 cubic B-spline weights."""
    pos = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    t = (pos + _TEX_EXTENT) / spacing
    i0 = np.floor(t).astype(np.int64)
    return i0 - 1, np.array(_bspline_w(t - i0), _F32)


def _texture(size: int, pixel_mm: float, seed: int, field: str, z: float, rs: slice, cs: slice) -> np.ndarray:
    """The field on rows ``rs`` x columns ``cs`` of the image at depth z.

    Separable 4-tap interpolation by gathers (no BLAS: small threaded matrix products
    are slow on a busy machine).
    """
    fid, spacing = _TEX_FIELDS[field]
    i0, w = _tex_axis(size, pixel_mm, spacing)
    iy, wy = i0[rs], w[:, rs]
    ix, wx = i0[cs], w[:, cs]
    n = int(2 * _TEX_EXTENT / spacing) + 1
    y0, y1 = int(iy.min()), int(iy.max()) + 4
    x0, x1 = int(ix.min()), int(ix.max()) + 4
    ny, nx = np.arange(y0, y1) % n, np.arange(x0, x1) % n
    t = z / spacing
    k0 = math.floor(t)
    g = None
    for j, wz in enumerate(_bspline_w(t - k0)):
        plane = _tex_plane(seed, fid, k0 - 1 + j)[np.ix_(ny, nx)] * _F32(wz)
        g = plane if g is None else g + plane
    g *= _F32(1 / 0.332)  # std of cubic-B-spline-interpolated unit white noise in 3D
    # Columns first (on the small lattice), then rows (whole-row gathers are cheap).
    b = sum(g[:, ix - x0 + k] * wx[k] for k in range(4))
    return sum(b[iy - y0 + k] * wy[k][:, None] for k in range(4))


# --------------------------------------------------------------------------- rendering

class _Frozen(_Shape):
    """A shape evaluated once on its own window; sub-windows are then just slices."""

    def __init__(self, shape, canvas, grid=None):
        self.s = shape
        self.bb = shape.bbox()
        g = grid or canvas.grid(self.bb, 2 * canvas.px)
        self.home = None if g is None else g.key
        self.d = None if g is None else shape.sdf(g)

    def __getattr__(self, name):  # cx, cy, R, radius ... of the wrapped shape
        return getattr(self.__dict__["s"], name)

    def bbox(self):
        return self.bb

    def sdf(self, g):
        if g.key is not None and self.home is not None:
            r0, r1, c0, c1 = g.key
            R0, R1, C0, C1 = self.home
            if r0 >= R0 and r1 <= R1 and c0 >= C0 and c1 <= C1:
                return self.d[r0 - R0:r1 - R0, c0 - C0:c1 - C0]
        return self.s.sdf(g)


class _Canvas:
    def __init__(self, spec: PhantomSpec, z: float, labels: bool):
        self.n = spec.size
        self.px = float(spec.pixel_mm)
        self.z = z
        c = np.arange(self.n, dtype=np.float64)
        self.coord = ((c - (self.n - 1) / 2.0) * self.px).astype(_F32)
        self.hu = np.full((self.n, self.n), AIR_HU, _F32)
        self.lab = np.zeros((self.n, self.n), np.uint8) if labels else None
        self.cache: dict = {}
        self.tc = self.tf = None

    def make_texture(self, seed, bbox):
        """Texture fields over the body's window (zeros elsewhere: nothing textured there)."""
        self.tc = np.zeros((self.n, self.n), _F32)
        self.tf = np.zeros((self.n, self.n), _F32)
        g = self.grid(bbox, 2 * self.px)
        if g is not None:
            rs, cs = g.win
            self.tc[rs, cs] = _texture(self.n, self.px, seed, "coarse", self.z, rs, cs)
            self.tf[rs, cs] = _texture(self.n, self.px, seed, "fine", self.z, rs, cs)

    def _index(self, lo, hi):
        h = (self.n - 1) / 2.0
        a = max(int(math.floor(max(lo, -1e6) / self.px + h)), 0)
        b = min(int(math.ceil(min(hi, 1e6) / self.px + h)) + 1, self.n)
        return a, b

    def grid(self, bbox, margin):
        x0, x1, y0, y1 = bbox
        if not (x1 >= x0 and y1 >= y0):
            return None
        c0, c1 = self._index(x0 - margin, x1 + margin)
        r0, r1 = self._index(y0 - margin, y1 + margin)
        if c1 <= c0 or r1 <= r0:
            return None
        g = _Grid(self.coord[None, c0:c1], self.coord[r0:r1, None], (r0, r1, c0, c1), self.cache)
        g.win = (slice(r0, r1), slice(c0, c1))
        return g

    def freeze(self, shape, grid=None):
        return None if shape is None else _Frozen(shape, self, grid)

    def paint(self, shape, tissue, delta=0.0, ramp_mm=None, grid=None):
        """Blend ``tissue`` over the image with the shape's anti-aliased coverage."""
        if shape is None:
            return
        label, base, ac, af = _T[tissue] if isinstance(tissue, str) else tissue
        ramp = max(ramp_mm or self.px, self.px)
        g = grid or self.grid(shape.bbox(), ramp)
        if g is None:
            return
        d = shape.sdf(g)
        a = _F32(0.5) - d * _F32(1.0 / ramp)
        np.clip(a, 0, 1, out=a)
        if not a.any():
            return
        rs, cs = g.win
        sub = self.hu[rs, cs]
        val = _F32(base + delta)
        if ac:
            val = val + _F32(ac) * self.tc[rs, cs]
        if af:
            val = val + _F32(af) * self.tf[rs, cs]
        sub += a * (val - sub)
        if self.lab is not None:
            self.lab[rs, cs][a >= 0.5] = _L[label]


def _draw(c: _Canvas, pat: _Patient, z: float) -> None:
    P = c.paint
    skin, fat, muscle, cav = pat.body_layers(z)
    c.make_texture(pat.tex_seed, skin.bbox())
    gb = c.grid(skin.bbox(), 2 * c.px)
    P(skin, "skin", grid=gb)
    P(fat, "fat_sc", grid=gb)
    muscle = c.freeze(muscle, gb)
    cav = c.freeze(cav, gb)
    P(muscle, "muscle", grid=gb)
    P(cav, "fat_v", grid=gb)

    _ribs(c, pat, z, cav)

    # Bowel and mesenteric vessels first: the solid organs they lie against go over them.
    for t in pat.mesenteric:
        x, y, r = t.at(z)
        if r > 0.4:
            P(_Intersect(_Circle(x, y, r), _Offset(cav, -3.0)), "vein")
    for t in pat.bowel:
        x, y, r = t.at(z)
        if r > 1.5:
            _bowel_loop(c, x, y, r, t.kind, t.extra, cav)
    _colon(c, z, cav)

    st = pat.stomach(z, cav)
    if st is not None:
        st = c.freeze(st)
        P(st, "bowel_wall")
        lumen = _Offset(st, -3.5)
        P(lumen, "fluid")
        b = st.bbox()  # gas rises to the front (patient supine): air-fluid level
        P(_Intersect(lumen, _HalfPlane(0, 1, b[2] + (b[3] - b[2]) * pat.stomach_d[2])), "gas")

    liver = c.freeze(pat.liver(z, cav))
    if liver is not None:
        P(liver, "liver")
        hv = _cap(z, -10.0, 40.0)
        if hv > 0.15:  # hepatic veins converging on the IVC near the dome
            for ex, ey in ((-95.0, -45.0), (-50.0, -80.0), (0.0, -66.0)):
                vein = _Capsule(-26.0, 0.0, -26.0 + (ex + 26) * hv * 0.8, ey * hv * 0.8, 4.0 * hv, 1.0)
                P(_Intersect(vein, liver), ("vessel", 165.0, 3.0, 3.0))
        for t in pat.liver_vessels:
            x, y, r = t.at(z)
            if r > 0.6:
                P(_Intersect(_Circle(x, y, r), liver), ("vessel", 170.0, 3.0, 3.0))
        for t in pat.lesions:
            x, y, r = t.at(z)
            if t.organ == "liver" and r > 0.8:
                P(_Intersect(_Circle(x, y, r), _Offset(liver, -0.5)), ("lesion_liver", *_T["liver"][1:]),
                  delta=t.extra, ramp_mm=1.6)

    P(pat.gallbladder(z, cav), "gallbladder")

    sp = c.freeze(pat.spleen(z, cav))
    if sp is not None:
        P(sp, "spleen")
        for t in pat.lesions:
            x, y, r = t.at(z)
            if t.organ == "spleen" and r > 0.8:
                P(_Intersect(_Circle(x, y, r), _Offset(sp, -0.5)), ("lesion_spleen", *_T["spleen"][1:]),
                  delta=t.extra, ramp_mm=1.6)

    # Pancreas along tail -> body -> head: the tail shows first (high, by the splenic hilum),
    # the head last (low, by the duodenum); splenic vein along its back.
    pr = 9.5 * min(1.0, 1.6 * _cap(z, 68.0, 32.0))
    if pr > 1.0:
        path = [(74.0, 14.0 + 0.1 * (z - 45)), (8.0, -30.0), (-30.0, -14.0 + 0.1 * (z - 70))]
        lo, hi = 0.85 * _ss(60.0, 98.0, z), 0.35 + 0.65 * _ss(36.0, 64.0, z)
        pts = _polyline(path, lo, hi)
        P(_Union(*[_Capsule(*p, *q, pr) for p, q in zip(pts, pts[1:])], k=6.0), "pancreas")
        sv = 3.2 * _cap(z, 52.0, 14.0)
        if sv > 0.5:
            pts = _polyline([(x - 2.0, y + 11.0) for x, y in path[:2]], lo, hi)
            P(_Union(*[_Capsule(*p, *q, sv) for p, q in zip(pts, pts[1:])]), "vein")

    # Kidneys: perirenal fat, cortex, lobulated medulla, sinus fat, pelvis, renal veins.
    kid = pat.kidneys(z, cav)
    for k in kid:
        if k is not None:
            P(_Intersect(_Offset(k, 3.5), _Offset(cav, -0.3)), "fat_v")
    for k in kid:
        if k is None:
            continue
        cx, cy, s, rot, hx, hy, hs, side, w = k.geo
        P(k, "cortex")
        ai, bi = 31.0 * s - 6.5, 23.0 * s - 6.5
        if ai > 1.0 and bi > 1.0:
            rin = _ellipse_r(ai, bi, rot) - 3.5 * (0.5 + 0.5 * np.cos(7 * _THETA + side))
            P(_Subtract(_Polar(cx, cy, rin), _Circle(cx + hx * 30 * s, cy + hy * 30 * s, 14 * hs * s)), "medulla")
        if hs > 0.1:
            sx, sy = cx + hx * 14.0 * s, cy + hy * 14.0 * s
            P(_Ellipse(sx, sy, 13.0 * hs * s, 7.0 * hs * s, rot), "sinus")
            P(_Circle(sx + hx * 6.0, sy + hy * 6.0, 4.5 * hs), "pelvis")
        vs = _cap(w, -4.0, 10.0)
        if vs > 0.05:
            hxp, hyp = cx + hx * 28.0 * s, cy + hy * 28.0 * s
            if side > 0:  # the left renal vein crosses in front of the aorta to the IVC
                P(_Union(_Capsule(hxp, hyp, 16.0, -4.0, 4.0 * vs), _Capsule(16.0, -4.0, -22.0, 6.0, 4.0 * vs), k=3.0),
                  "vein")
            else:
                P(_Capsule(hxp, hyp, -24.0, 8.0, 4.0 * vs), "vein")

    # Psoas muscles, growing lower down.
    ps = _ss(40.0, 150.0, z)
    if ps > 0.03:
        a, b = 5.0 + 14.0 * ps, 5.0 + 11.0 * ps
        for side in (1, -1):
            P(_Intersect(_Ellipse(side * (21.0 + a), 42.0 + 2.0 * ps, a, b, _deg(side * 20.0)), cav), "muscle")

    # Lung bases behind the diaphragm, with vessels.
    lung = c.freeze(pat.lung(z, cav))
    if lung is not None:
        P(_Intersect(_Offset(lung, 3.0), _Offset(cav, -0.3)), "muscle")
        P(lung, "lung")
        for t in pat.lung_vessels:
            x, y, r = t.at(z)
            if r > 0.5:
                P(_Intersect(_Circle(x, y, r), lung), "lung_vessel")

    # Great vessels; portal vein; superior mesenteric vein and artery.
    P(_Circle(12.0 - 0.02 * z, 11.0 - 0.03 * z, 11.5 - 0.012 * z), "aorta")
    top = 1 - _ss(0.0, 40.0, z)
    P(_Ellipse(-24.0 - 4.0 * top, 7.0 - 4.0 * top, 13.0, 9.5, _deg(-20.0)), "ivc")
    pv = _cap(z, 42.0, 20.0)
    if pv > 0.1:
        P(_Capsule(-10.0, -20.0, -38.0, -12.0 - 0.3 * (z - 42), 6.5 * pv, 4.0 * pv), "vein")
    mv = _ss(55.0, 70.0, z)
    if mv > 0.05:
        P(_Circle(-10.0, -20.0 - 0.12 * (z - 55), 5.5 * mv), "vein")
        P(_Circle(5.0, -14.0 - 0.12 * (z - 55), 3.8 * mv), "artery")

    _spine(c, pat, z, muscle)


def _polyline(path, lo, hi):
    """The part of the polyline ``path`` between fractions lo and hi of its length."""
    seg = [math.dist(p, q) for p, q in zip(path, path[1:])]
    total = sum(seg)
    out, acc = [], 0.0
    for (p, q), L in zip(zip(path, path[1:]), seg):
        a, b = max(lo * total - acc, 0.0), min(hi * total - acc, L)
        if b > a:
            pa = (p[0] + (q[0] - p[0]) * a / L, p[1] + (q[1] - p[1]) * a / L)
            pb = (p[0] + (q[0] - p[0]) * b / L, p[1] + (q[1] - p[1]) * b / L)
            if out and math.dist(out[-1], pa) < 1e-6:
                out.append(pb)
            else:
                out += [pa, pb]
        acc += L
    return out if len(out) >= 2 else [path[0], path[0]]


def _ribs(c, pat, z, cav):
    """A family of oblique ribs cut by the slice, drifting forward as z goes down; fewer and
    further back lower down, gone below the twelfth ribs."""
    cage = 1.0 - _ss(95.0, 135.0, z)
    if cage < 0.02:
        return
    phi_max = 150.0 - 0.55 * z  # angle from the back midline of the most anterior rib
    for side_i, side in enumerate((1, -1)):
        base = (pat.rib_phase[side_i] + 1.3 * z) % 34.0
        for k in range(0, 6):
            phi = base + 34.0 * k
            w = _ss(34.0, 46.0, phi) * (1.0 - _ss(phi_max - 14.0, phi_max, phi)) * cage
            if w < 0.1:
                continue
            th = math.pi / 2 - side * _deg(phi)
            rr = float(cav.radius(th)) + 4.0
            cx, cy = cav.cx + rr * math.cos(th), cav.cy + rr * math.sin(th)
            rot = th + math.pi / 2
            a, b = 9.5 * w, 3.4 * w
            c.paint(_Ellipse(cx, cy, a, b, rot), "rib_cortical")
            if b > 1.8:
                c.paint(_Ellipse(cx, cy, a - 1.3, b - 1.3, rot), "rib_cancellous")


def _bowel_loop(c, x, y, r, kind, gas_frac, cav):
    c.paint(_Intersect(_Circle(x, y, r), _Offset(cav, -0.5)), "bowel_wall")
    lumen = _Intersect(_Circle(x, y, r - 2.0), _Offset(cav, -2.5))
    if kind == "contrast":
        c.paint(lumen, "contrast")
    elif kind == "gas":
        c.paint(lumen, "gas")
    else:
        c.paint(lumen, "fluid")
        if kind == "gas_fluid":
            level = y - (r - 2.0) + 2 * (r - 2.0) * gas_frac
            c.paint(_Intersect(lumen, _HalfPlane(0, 1, level)), "gas")


def _colon(c, z, cav):
    segs = []
    s = _cap(z, 70.0, 60.0)  # splenic flexure (image right, in front of spleen/kidney)
    if s > 0.1:
        segs.append((96.0 - 0.1 * (z - 70), -22.0 + 0.35 * (z - 70), 18.0 * s, 0.55))
    s = _ss(110.0, 140.0, z)  # descending colon
    if s > 0.1:
        segs.append((98.0, 18.0, 14.0 * s, 0.35))
    s = _cap(z, 125.0, 50.0)  # hepatic flexure (image left, under the liver tip)
    if s > 0.1:
        segs.append((-80.0 + 0.1 * (z - 125), -45.0 + 0.2 * (z - 125), 19.0 * s, 0.5))
    s = _cap(z, 160.0, 45.0)  # transverse colon, in front
    if s > 0.1:
        for x in (-40.0, 0.0, 40.0):
            segs.append((x + 0.2 * (z - 160), -95.0 + 0.05 * (x + 40), 16.0 * s, 0.6))
    for x, y, r, gas in segs:
        if r < 2.0:
            continue
        c.paint(_Intersect(_Circle(x, y, r), _Offset(cav, -0.5)), "bowel_wall")
        lumen = _Intersect(_Circle(x, y, r - 1.8), _Offset(cav, -2.3))
        c.paint(lumen, "stool")
        level = y - (r - 1.8) + 2 * (r - 1.8) * gas
        c.paint(_Intersect(lumen, _HalfPlane(0, 1, level)), "gas")


def _spine(c, pat, z, muscle):
    P = c.paint
    per = 32.0  # one vertebra + disc
    ph = ((z - pat.vert_z0) % per) / per  # disc around ph = 0
    disc = 1.0 - _ss(2.5, 5.0, min(ph, 1 - ph) * per)

    # Erector spinae, bounded by the subcutaneous fat.
    for side in (1, -1):
        P(_Intersect(_Ellipse(side * 29.0, 80.0, 24.0, 18.0, _deg(side * -10.0)), _Offset(muscle, -0.5)), "muscle")

    # Neural arch: pedicles, laminae, spinous process, transverse processes (mid-level).
    parts = [((side * 11.0, 52.0, side * 12.5, 66.0, 4.0, 4.0), (side * 12.5, 67.0, 0.0, 79.0, 3.4, 3.4))
             for side in (1, -1)]
    caps = [p for pair in parts for p in pair] + [(0.0, 78.0, 0.0, 100.0, 4.2, 3.2)]
    tp = math.sin(math.pi * min(max((ph - 0.12) / 0.5, 0.0), 1.0)) ** 0.6
    if tp > 0.1:
        caps += [(side * 12.0, 62.0, side * (12.0 + 26.0 * tp), 69.0, 4.2 * tp, 3.2 * tp) for side in (1, -1)]
    P(_Union(*[_Capsule(*p) for p in caps]), "cortical")
    inner = [_Capsule(*p[:4], p[4] - 1.6, p[5] - 1.6) for p in caps if min(p[4], p[5]) > 2.2]
    if inner:
        P(_Union(*inner), "cancellous")
    P(_Ellipse(0.0, 64.5, 8.8, 10.5), "canal")

    # Vertebral body (bean shaped), or the disc between two bodies.
    grow = 1.0 + 0.05 * disc + 0.0015 * z
    body = _Subtract(_Ellipse(0.0, 39.0, 21.0 * grow, 16.5 * grow), _Circle(0.0, 64.0, 10.5))
    inner_b = _Subtract(_Ellipse(0.0, 39.0, 21.0 * grow - 2.2, 16.5 * grow - 2.2), _Circle(0.0, 64.0, 12.7))
    cort = tuple(_lerp(np.array(_T["cortical"][1:]), np.array(_T["disc"][1:]), disc))
    canc = tuple(_lerp(np.array(_T["cancellous"][1:]), np.array(_T["disc"][1:]), disc))
    P(body, ("disc" if disc > 0.5 else "bone_cortical", *cort))
    P(inner_b, ("disc" if disc > 0.5 else "bone_cancellous", *canc))


def _render(spec: PhantomSpec, index: int, labels: bool):
    index = _check_index(spec, index)
    pat = _patient(spec.seed, spec.n_slices, float(spec.slice_mm))
    z = index * float(spec.slice_mm)
    c = _Canvas(spec, z, labels)
    _draw(c, pat, z)
    hu = c.hu
    if spec.noise_hu > 0:
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x701, index]))
        hu += rng.standard_normal(hu.shape, dtype=_F32) * _F32(spec.noise_hu)
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return hu, c.lab


@lru_cache(maxsize=8)
def _patient(seed: int, n_slices: int, slice_mm: float) -> _Patient:
    return _Patient(seed, n_slices, slice_mm)


def _check_index(spec: PhantomSpec, index: int) -> int:
    i = int(index)
    if i != index or not 0 <= i < spec.n_slices:
        raise IndexError(f"slice index {index!r} out of range for {spec.n_slices} slices")
    return i


# --------------------------------------------------------------------------- public API

def phantom_slice(spec: PhantomSpec, index: int) -> np.ndarray:
    """Slice ``index`` (0 = most superior) as float32 HU, shape (size, size)."""
    return _render(spec, index, labels=False)[0]


def phantom_volume(spec: PhantomSpec) -> np.ndarray:
    """The whole series as float32 HU, shape (n_slices, size, size)."""
    vol = np.empty((spec.n_slices, spec.size, spec.size), _F32)
    for i in range(spec.n_slices):
        vol[i] = _render(spec, i, labels=False)[0]
    return vol


def structure_masks(spec: PhantomSpec, index: int) -> dict[str, np.ndarray]:
    """Boolean masks (size, size) of slice ``index``, by structure name.

    A pixel belongs to the last structure drawn over at least half of it, so the names in
    :data:`LABELS` partition the image ("liver" excludes its vessels and lesions). Unions:
    "kidney" (cortex + medulla), "fat" (subcutaneous + visceral + renal sinus), "lesion"
    (liver + spleen lesions), "bone" (cortical + cancellous), "body" (everything but air).
    """
    lab = _render(spec, index, labels=True)[1]
    masks = {name: lab == i for i, name in enumerate(LABELS)}
    for name, parts in _UNIONS.items():
        m = np.zeros_like(masks["air"])
        for p in parts:
            m |= masks[p]
        masks[name] = m
    masks["body"] = ~masks["air"]
    return masks

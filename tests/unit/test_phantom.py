"""The synthetic anatomical CT phantom (ldct_cli.phantom): shapes, HU per structure,
lesions, continuity in z, the lung bases, sampling in mm, determinism and seeds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ldct_cli import phantom
from ldct_cli.phantom import (
    LABELS,
    PhantomSpec,
    image_position_mm,
    phantom_slice,
    phantom_volume,
    slice_z_mm,
    structure_masks,
)

SPEC = PhantomSpec()  # 512 x 512, 32 slices, 0.7 mm pixels, 3 mm slices, seed 0
SAMPLE = (0, 4, 8, 12, 16, 20, 24, 28, 31)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    t0 = time.perf_counter()
    vol = phantom_volume(SPEC)
    print(f"\nphantom_volume {SPEC.n_slices}x{SPEC.size}x{SPEC.size}: {time.perf_counter() - t0:.2f} s")
    return vol


@pytest.fixture(scope="module")
def masks() -> dict[int, dict[str, np.ndarray]]:
    return {i: structure_masks(SPEC, i) for i in range(SPEC.n_slices)}


def _erode(m: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 cross, r times (the border counts as outside)."""
    m = m.copy()
    for _ in range(r):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0], e[-1], e[:, 0], e[:, -1] = False, False, False, False
        m = e
    return m


def _dilate(m: np.ndarray, r: int = 1) -> np.ndarray:
    return ~_erode(~m, r)


def _components(m: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a small mask, by propagating the minimum pixel id."""
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return []
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    sub = np.pad(m[y0:y1, x0:x1], 1)
    big = np.iinfo(np.int64).max
    lab = np.where(sub, np.arange(sub.size).reshape(sub.shape), big)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new[~sub] = big
        if np.array_equal(new, lab):
            break
        lab = new
    out = []
    for v in np.unique(lab[sub]):
        full = np.zeros_like(m)
        full[y0:y1, x0:x1] = (lab == v)[1:-1, 1:-1]
        out.append(full)
    return out


def _pooled_median(volume, masks, name, erode=2, slices=SAMPLE):
    vals = [volume[i][_erode(masks[i][name], erode)] for i in slices]
    vals = np.concatenate(vals)
    assert vals.size > 50, f"{name}: too few pixels ({vals.size}) to measure"
    return float(np.median(vals))


# --------------------------------------------------------------------------- basics

def test_shape_dtype_and_hu_limits(volume):
    assert volume.shape == (32, 512, 512)
    assert volume.dtype == np.float32
    assert np.isfinite(volume).all()
    assert volume.min() >= -1024 and volume.max() <= 3071
    assert (volume[:, :4, :4] == -1000).all()  # air in the corners


def test_slice_equals_volume_slice(volume):
    for i in (0, 15, 31):
        s = phantom_slice(SPEC, i)
        assert s.shape == (512, 512) and s.dtype == np.float32
        np.testing.assert_array_equal(s, volume[i])
    # With noise too (a small, coarse series to keep it fast).
    spec = PhantomSpec(size=128, n_slices=5, pixel_mm=2.8, noise_hu=15.0, seed=4)
    vol = phantom_volume(spec)
    for i in range(5):
        np.testing.assert_array_equal(phantom_slice(spec, i), vol[i])


def test_deterministic_from_scratch(volume):
    phantom._patient.cache_clear()
    phantom._tex_plane.cache_clear()
    np.testing.assert_array_equal(phantom_slice(SPEC, 10), volume[10])
    m1 = structure_masks(SPEC, 10)
    m2 = structure_masks(SPEC, 10)
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_array_equal(m1[k], m2[k])


def test_seeds_vary_the_patient_a_bit(volume, masks):
    other = PhantomSpec(seed=1)
    img = phantom_slice(other, 16)
    diff = np.abs(img - volume[16])
    assert diff.mean() > 5.0  # a different patient...
    m = structure_masks(other, 16)
    for name in ("body", "liver", "kidney", "spleen"):
        a0, a1 = masks[16][name].sum(), m[name].sum()
        assert a0 != a1
        assert 0.7 < a1 / a0 < 1.4, (name, a0, a1)  # ...but the same anatomy


def test_spec_validation_and_index_range():
    for bad in (dict(size=4), dict(n_slices=0), dict(pixel_mm=0.0), dict(slice_mm=-3.0), dict(seed=-1),
                dict(noise_hu=-1.0)):
        with pytest.raises(ValueError):
            PhantomSpec(**bad)
    with pytest.raises(IndexError):
        phantom_slice(PhantomSpec(size=64, n_slices=3), 3)


def test_geometry_helpers():
    assert slice_z_mm(SPEC, 0) == 0.0 and slice_z_mm(SPEC, 5) == pytest.approx(15.0)
    x, y, z = image_position_mm(SPEC, 2)
    assert x == y == pytest.approx(-255.5 * 0.7)
    assert z == pytest.approx(-6.0)  # head first: z goes down slice by slice


# --------------------------------------------------------------------------- anatomy and HU

def test_structures_and_masks(volume, masks):
    m = masks[16]
    for name in LABELS:
        assert m[name].shape == (512, 512) and m[name].dtype == bool
    # The labels partition the image.
    total = sum(m[name].astype(int) for name in LABELS)
    assert (total == 1).all()
    for name in ("liver", "spleen", "kidney", "aorta", "ivc", "muscle", "fat", "bone_cortical",
                 "bone_cancellous", "body", "air", "skin", "pancreas", "spinal_canal"):
        assert m[name].sum() > 30, name
    # Air outside the body is exactly -1000 (noiseless phantom; the skin's edge pixels aside).
    assert (volume[16][_erode(m["air"], 1)] == -1000).all()
    # Body ~340 x 250 mm.
    ys, xs = np.nonzero(m["body"])
    width, height = (xs.max() - xs.min() + 1) * 0.7, (ys.max() - ys.min() + 1) * 0.7
    assert 300 < width < 360 and 220 < height < 280
    # Bowel gas, contrast-filled bowel and the gallbladder somewhere in the series.
    assert sum(masks[i]["bowel_gas"].sum() for i in masks) > 500
    assert sum(masks[i]["bowel_contrast"].sum() for i in masks) > 100
    assert sum(masks[i]["gallbladder"].sum() for i in masks) > 100


@pytest.mark.parametrize(
    "name, lo, hi",
    [
        ("liver", 40, 120),
        ("spleen", 40, 130),
        ("kidney", 100, 250),
        ("aorta", 150, 350),
        ("ivc", 150, 300),
        ("fat", -130, -70),
        ("fat_subcutaneous", -130, -70),
        ("muscle", 30, 70),
        ("bone_cancellous", 150, 400),
        ("pancreas", 40, 130),
        ("bowel_fluid", -10, 40),
        ("gallbladder", -10, 30),
    ],
)
def test_median_hu_per_structure(volume, masks, name, lo, hi):
    assert lo <= _pooled_median(volume, masks, name) <= hi


def test_extreme_structures(volume, masks):
    assert _pooled_median(volume, masks, "bone_cortical", erode=0) > 700
    assert _pooled_median(volume, masks, "lung", slices=(0, 2, 4)) < -700
    assert _pooled_median(volume, masks, "bowel_gas", erode=1, slices=range(32)) < -900
    # Kidney cortex brighter than medulla (corticomedullary contrast).
    assert _pooled_median(volume, masks, "kidney_cortex", erode=1) > _pooled_median(
        volume, masks, "kidney_medulla", erode=1) + 30


def test_lesions_present_and_low_contrast(volume, masks):
    mid = SPEC.n_slices // 2
    assert masks[mid]["lesion"].sum() * 0.49 > 30  # a lesion on the middle slice
    checked = 0
    for i in range(SPEC.n_slices):
        for kind, organ in (("lesion_liver", "liver"), ("lesion_spleen", "spleen")):
            for comp in _components(masks[i][kind]):
                core = _erode(comp, 1)
                if core.sum() < 20:
                    continue
                ring = _dilate(comp, 5) & ~_dilate(comp, 2) & masks[i][organ]
                assert ring.sum() > 20
                delta = np.median(volume[i][core]) - np.median(volume[i][ring])
                assert 5 <= abs(delta) <= 30, (i, kind, delta)
                diam = 2 * np.sqrt(comp.sum() / np.pi) * SPEC.pixel_mm
                assert diam <= 21.0, (i, kind, diam)
                checked += 1
    assert checked >= 6


# --------------------------------------------------------------------------- z continuity

def test_neighbouring_slices_similar_but_not_identical(volume, masks):
    body = masks[16]["body"]
    soft = np.clip(volume, -160, 240)
    for i in range(SPEC.n_slices - 1):
        a, b = volume[i], volume[i + 1]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9
        assert np.corrcoef(soft[i][body], soft[i + 1][body])[0, 1] > 0.85
        assert np.abs(a - b).max() > 50


def test_structures_continuous_in_z(masks):
    for name in ("liver", "body", "kidney", "spleen", "lung", "muscle"):
        area = np.array([masks[i][name].sum() for i in range(SPEC.n_slices)], float)
        jumps = np.abs(np.diff(area))
        assert jumps.max() <= 0.2 * area.max() + 200, (name, jumps.max(), area.max())
    # Centroids move smoothly (less than 8 mm per slice).
    for name in ("liver", "body", "aorta"):
        prev = None
        for i in range(SPEC.n_slices):
            ys, xs = np.nonzero(masks[i][name])
            c = np.array([ys.mean(), xs.mean()]) * SPEC.pixel_mm
            if prev is not None:
                assert np.hypot(*(c - prev)) < 8.0, (name, i)
            prev = c


def test_lungs_in_top_slices_only(masks):
    lung_mm2 = [masks[i]["lung"].sum() * SPEC.pixel_mm**2 for i in range(SPEC.n_slices)]
    assert lung_mm2[0] > 2000 and lung_mm2[1] > 1500
    assert all(a == 0 for a in lung_mm2[-12:])
    assert lung_mm2[0] >= lung_mm2[8]  # shrinking going down
    # Vessels in the lungs at the top.
    assert masks[0]["lung_vessel"].sum() > 10


# --------------------------------------------------------------------------- millimetres

def _centroid_mm(mask, pixel_mm):
    n = mask.shape[0]
    ys, xs = np.nonzero(mask)
    return (np.array([xs.mean(), ys.mean()]) - (n - 1) / 2) * pixel_mm


@pytest.mark.parametrize("size, pixel_mm", [(512, 0.9), (256, 1.4), (256, 0.7)])
def test_anatomy_is_defined_in_mm(masks, size, pixel_mm):
    ref = masks[16]
    spec = PhantomSpec(size=size, pixel_mm=pixel_mm)
    m = structure_masks(spec, 16)
    img = phantom_slice(spec, 16)
    assert img.shape == (size, size) and img.dtype == np.float32
    names = ("aorta", "spinal_canal", "ivc") if size * pixel_mm < 200 else ("aorta", "liver", "kidney", "body")
    for name in names:
        a_ref = ref[name].sum() * 0.7**2
        a = m[name].sum() * pixel_mm**2
        assert a == pytest.approx(a_ref, rel=0.08), name
        np.testing.assert_allclose(_centroid_mm(m[name], pixel_mm), _centroid_mm(ref[name], 0.7), atol=1.0)


def test_coarse_matrix_is_the_fine_one_downsampled(volume):
    coarse = phantom_slice(PhantomSpec(size=256, pixel_mm=1.4), 16)
    fine = volume[16].reshape(256, 2, 256, 2).mean(axis=(1, 3))
    soft_c, soft_f = np.clip(coarse, -160, 240), np.clip(fine, -160, 240)
    assert np.corrcoef(soft_c.ravel(), soft_f.ravel())[0, 1] > 0.95
    assert np.median(np.abs(soft_c - soft_f)) < 5.0


def test_noise_option():
    spec = PhantomSpec(size=128, n_slices=3, pixel_mm=2.8, noise_hu=20.0)
    clean = phantom_slice(PhantomSpec(size=128, n_slices=3, pixel_mm=2.8), 1)
    noisy = phantom_slice(spec, 1)
    body = structure_masks(spec, 1)["body"]
    assert np.std((noisy - clean)[body]) == pytest.approx(20.0, rel=0.1)
    np.testing.assert_array_equal(noisy, phantom_slice(spec, 1))
    assert noisy.min() >= -1024

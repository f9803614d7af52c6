"""The parallel-beam projector against scikit-image's radon / iradon, and its units.

Oracle comparisons use odd sizes (129): there scikit-image's rotation centre (pixel
N // 2) and detector centre (bin D // 2) coincide with ours ((N - 1) / 2, (D - 1) / 2);
for even sizes the two differ by half a pixel, so even sizes are checked on their own
(round trip, units, conventions).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldct_cli.physics import projector
from ldct_cli.physics.projector import default_angles, default_n_det, fbp, forward_project



@pytest.fixture(scope="module")
def skimage_transform():
    """scikit-image, the oracle (a test-only dependency): its tests skip without it."""
    return pytest.importorskip("skimage.transform")


def _relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _shepp_logan(size: int) -> np.ndarray:
    """The modified Shepp-Logan head phantom (values 0-1), drawn from its ten ellipses."""
    # (value, semi-axis a, semi-axis b, centre x, centre y, rotation [deg]) on [-1, 1]^2.
    ellipses = [(1.0, 0.69, 0.92, 0, 0, 0), (-0.8, 0.6624, 0.874, 0, -0.0184, 0),
                (-0.2, 0.11, 0.31, 0.22, 0, -18), (-0.2, 0.16, 0.41, -0.22, 0, 18),
                (0.1, 0.21, 0.25, 0, 0.35, 0), (0.1, 0.046, 0.046, 0, 0.1, 0),
                (0.1, 0.046, 0.046, 0, -0.1, 0), (0.1, 0.046, 0.023, -0.08, -0.605, 0),
                (0.1, 0.023, 0.023, 0, -0.606, 0), (0.1, 0.023, 0.046, 0.06, -0.605, 0)]
    # 4 x 4 supersampling per pixel: partial-volume edges, as a scanner would see them.
    sub = ((np.arange(size * 4) + 0.5) / (size * 4)) * 2 - 1
    x, y = np.meshgrid(sub, -sub)
    image = np.zeros_like(x)
    for value, a, b, cx, cy, degrees in ellipses:
        phi = np.deg2rad(degrees)
        u = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
        v = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
        image += value * ((u / a) ** 2 + (v / b) ** 2 <= 1)
    return image.reshape(size, 4, size, 4).mean(axis=(1, 3))


def _smooth_blobs(size: int, seed: int = 0) -> np.ndarray:
    """Random Gaussian blobs inside the inscribed circle: smooth, so FBP can recover it closely."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    image = np.zeros((size, size))
    for _ in range(8):
        cy, cx = rng.uniform(-0.3, 0.3, 2) * size
        width = rng.uniform(0.04, 0.12) * size
        image += rng.uniform(0.2, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width**2))
    return image


def _project(image: np.ndarray, angles: torch.Tensor, pixel_mm: float = 1.0) -> np.ndarray:
    return forward_project(torch.from_numpy(image).float()[None], angles=angles, pixel_mm=pixel_mm)[0].numpy()


@pytest.mark.parametrize("phantom", [_shepp_logan, _smooth_blobs])
def test_forward_projection_matches_skimage_radon(phantom, skimage_transform):
    image = phantom(129)
    angles = default_angles(180)
    oracle = skimage_transform.radon(image, theta=np.rad2deg(angles.numpy()), circle=False)  # (D, V)
    ours = _project(image, angles)  # (V, D)
    assert ours.shape == oracle.T.shape == (180, default_n_det(129, 129))
    error = _relative_l2(ours, oracle.T)
    print(f"\nforward projection vs skimage.radon ({phantom.__name__}, 129^2, 180 views): "
          f"relative L2 {error:.2e}")
    # Same discretization (bilinear rotation, 1-pixel steps, zero outside): only float32
    # rounding separates the two, ~1e-6; 1e-4 leaves room without hiding a geometry error
    # (a half-pixel shift gives ~1e-2, a flipped angle ~1).
    assert error < 1e-4


def test_fbp_matches_skimage_iradon_and_recovers_the_image(skimage_transform):
    image = _shepp_logan(129)
    angles = default_angles(180)
    degrees = np.rad2deg(angles.numpy())
    sinogram = skimage_transform.radon(image, theta=degrees, circle=False)
    oracle = skimage_transform.iradon(sinogram, theta=degrees, circle=False, filter_name="ramp")
    ours = fbp(torch.from_numpy(sinogram.T).float()[None], angles=angles, pixel_mm=1.0, size=(129, 129))[0].numpy()
    error = _relative_l2(ours, oracle)
    print(f"\nfbp vs skimage.iradon (Shepp-Logan 129^2, ramp): relative L2 {error:.2e}")
    # Same ramp (Kak & Slaney), same padding, same linear interpolation: rounding only.
    assert error < 1e-4

    smooth = _smooth_blobs(129)
    recon = fbp(forward_project(torch.from_numpy(smooth).float()[None], angles=angles, pixel_mm=1.0),
                angles=angles, pixel_mm=1.0, size=(129, 129))[0].numpy()
    y, x = np.mgrid[:129, :129] - 64
    interior = np.hypot(y, x) < 0.45 * 129
    rmse = float(np.sqrt(np.mean((recon - smooth)[interior] ** 2)))
    print(f"fbp(forward(x)) vs x (smooth blobs, 129^2, 180 views): interior RMSE {rmse:.4f} "
          f"(peak value {smooth.max():.2f})")
    assert rmse < 0.01 * smooth.max()


def test_round_trip_on_an_even_size_and_other_filters():
    image = torch.from_numpy(_smooth_blobs(128, seed=1)).float()[None] * 0.02
    angles = default_angles(180)
    sinogram = forward_project(image, angles=angles, pixel_mm=0.8)
    for name in projector.FILTERS:
        recon = fbp(sinogram, angles=angles, pixel_mm=0.8, size=(128, 128), filter=name)
        rmse = float((recon - image)[0, 20:-20, 20:-20].pow(2).mean().sqrt())
        print(f"\nround trip 128^2, {name}: interior RMSE {rmse / float(image.max()):.4f} of peak")
        # The windows blur a little (Hann most): a few percent of the peak at most.
        assert rmse < (0.01 if name == "ramp" else 0.03) * float(image.max())


def test_geometry_conventions():
    """t = x cos(theta) + y sin(theta), x right, y up, bins growing with t."""
    for size in (65, 64):
        image = torch.zeros(1, size, size)
        centre = size // 2  # x = +0.5, y = -0.5 pixel for even sizes
        image[0, centre, centre + 10] = 1.0  # x = +10, y = 0
        image[0, centre - 20, centre] = 1.0  # x = 0, y = +20 (row above the centre)
        angles = torch.tensor([0.0, math.pi / 2])
        sinogram = forward_project(image, angles=angles, pixel_mm=1.0)[0]
        n_det = default_n_det(size, size)
        assert n_det >= size * math.sqrt(2) and (n_det - size) % 2 == 0  # bins on pixel columns
        middle = n_det // 2  # t = +0.5 for even sizes, 0 for odd
        peaks = set((sinogram[0] > 0.01).nonzero().flatten().tolist())
        assert peaks == {middle, middle + 10}, size  # theta = 0: t = x
        peaks = set((sinogram[1] > 0.01).nonzero().flatten().tolist())
        assert peaks == {middle - (size + 1) % 2, middle + 20 - (size + 1) % 2}, size  # theta = pi/2: t = y


def test_units_disc_line_integral():
    """A disc of mu = 0.02 / mm, 200 mm across, has a central line integral of 4.0."""
    size, pixel_mm, radius_mm = 257, 1.0, 100.0
    # Area coverage by 8 x 8 supersampling, so the edge is not a staircase.
    sub = (np.arange(size * 8) + 0.5) / 8 - size / 2
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2) <= radius_mm**2
    disc = 0.02 * inside.reshape(size, 8, size, 8).mean(axis=(1, 3))
    angles = default_angles(16)
    sinogram = forward_project(torch.from_numpy(disc).float()[None], angles=angles, pixel_mm=pixel_mm)[0]
    central = sinogram[:, (sinogram.shape[1] - 1) // 2]
    print(f"\ndisc 0.02/mm x 200 mm: central line integral {central.mean():.4f} "
          f"(min {central.min():.4f}, max {central.max():.4f})")
    assert torch.allclose(central, torch.tensor(4.0), rtol=2e-3)
    # Twice the pixel size, same disc in pixels: twice the path length in mm.
    sinogram_2mm = forward_project(torch.from_numpy(disc).float()[None], angles=angles, pixel_mm=2.0)[0]
    assert torch.allclose(sinogram_2mm, 2 * sinogram)


def test_fbp_is_linear():
    generator = torch.Generator().manual_seed(0)
    angles = default_angles(90)
    p1, p2 = torch.randn(2, 1, 90, default_n_det(64, 64), generator=generator)
    recon = lambda p: fbp(p, angles=angles, pixel_mm=0.5, size=(64, 64))  # noqa: E731
    combined = recon(2.5 * p1 - 0.7 * p2)
    assert torch.allclose(combined, 2.5 * recon(p1) - 0.7 * recon(p2), atol=1e-4 * float(combined.abs().max()))


def test_batches_equal_single_slices():
    angles = default_angles(180)
    images = torch.from_numpy(np.stack([_smooth_blobs(96, seed=s) for s in range(3)])).float()
    batch = forward_project(images, angles=angles, pixel_mm=0.7)
    singles = torch.cat([forward_project(images[i:i + 1], angles=angles, pixel_mm=0.7) for i in range(3)])
    assert torch.equal(batch, singles)
    recon = fbp(batch, angles=angles, pixel_mm=0.7, size=(96, 96))
    singles = torch.cat([fbp(batch[i:i + 1], angles=angles, pixel_mm=0.7, size=(96, 96)) for i in range(3)])
    assert torch.equal(recon, singles)


def test_symmetry_shortcut_equals_the_direct_path(monkeypatch):
    """Views folded onto [0, pi/4] by exact flips/turns give what resampling every view gives."""
    angles = default_angles(180)
    image = torch.from_numpy(_shepp_logan(100)).float()[None]
    folded = forward_project(image, angles=angles, pixel_mm=1.0)
    folded_recon = fbp(folded, angles=angles, pixel_mm=1.0, size=(100, 100))
    monkeypatch.setattr(projector, "_fold_angles", lambda angles: None)
    direct = forward_project(image, angles=angles, pixel_mm=1.0)
    direct_recon = fbp(direct, angles=angles, pixel_mm=1.0, size=(100, 100))
    assert torch.allclose(folded, direct, atol=1e-4)
    assert torch.allclose(folded_recon, direct_recon, atol=1e-5)


def test_non_square_images_and_arbitrary_angles(skimage_transform):
    """The general path: a (49, 81) image and 50 unevenly spread angles, against skimage."""
    image = _smooth_blobs(81)[16:65]
    angles = torch.sort(torch.rand(50, generator=torch.Generator().manual_seed(1)) * math.pi).values
    oracle = skimage_transform.radon(image, theta=np.rad2deg(angles.numpy()), circle=False)
    ours = _project(image, angles)
    # skimage pads to a square of side ceil(sqrt(2) * max(H, W)); ours covers the (H, W)
    # diagonal: compare the central bins both share.
    offset = (oracle.shape[0] - ours.shape[1]) // 2
    assert _relative_l2(ours, oracle[offset:offset + ours.shape[1]].T) < 1e-4


def test_bad_arguments_are_rejected():
    angles = default_angles(10)
    with pytest.raises(ValueError, match="B, H, W"):
        forward_project(torch.zeros(8, 8), angles=angles, pixel_mm=1.0)
    with pytest.raises(ValueError, match="pixel_mm"):
        forward_project(torch.zeros(1, 8, 8), angles=angles, pixel_mm=0.0)
    with pytest.raises(ValueError, match="filter"):
        fbp(torch.zeros(1, 10, 12), angles=angles, pixel_mm=1.0, size=(8, 8), filter="cosine")
    with pytest.raises(ValueError, match="angles"):
        fbp(torch.zeros(1, 9, 12), angles=angles, pixel_mm=1.0, size=(8, 8))

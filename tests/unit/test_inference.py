"""The Denoiser: HU in, HU out, padding to a model's size multiple, tiling, batching, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldct_cli.errors import UsageError
from ldct_cli.inference import (
    Denoiser,
    _axis_weights,
    _axis_windows,
    effective_precision,
    resolve_device,
)
from ldct_cli.models.registry import create_model, list_models

MODELS = list_models()
CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
# Reduced-width Pix2Pix for tests where the default width is not the point.
SMALL_PIX2PIX = {"base_channels": 8, "max_channels": 32, "depth": 4}


def _seeded_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def _denoiser(model, **options) -> Denoiser:
    return Denoiser(model, model.hu_norm, CPU, **options)


def _random_hu(model, batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(B, k, H, W) float32 HU, mostly soft tissue with air and bone, like a CT slice."""
    rng = np.random.default_rng(seed)
    k = int(getattr(model, "context_slices", 1))
    return rng.uniform(-1100.0, 1500.0, size=(batch, k, height, width)).astype(np.float32)


def _small_size(model) -> tuple[int, int]:
    m = int(getattr(model, "size_multiple", 1))
    return (40, 44) if m == 1 else (m, m)


def _disc_phantom(size: int = 256) -> np.ndarray:
    """(1, 1, size, size): a large 40 HU disc on -1000 HU air, smooth but for its edge."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    return np.where(inside, 40.0, -1000.0).astype(np.float32)[None, None]


def _boundaries(length: int, core: int, margin: int) -> list[int]:
    """Every position p where a tile's core or window starts or ends inside the axis."""
    return sorted({p for window in _axis_windows(length, core, margin) for p in window if 0 < p < length})


def _jumps_at(image: np.ndarray, positions: list[int], axis: int) -> float:
    """Mean |image[p] - image[p-1]| along ``axis`` across the given positions."""
    jumps = np.abs(np.diff(image, axis=axis)).mean(axis=1 - axis)
    return float(jumps[[p - 1 for p in positions]].mean())


# --------------------------------------------------------------------------- HU in, HU out


@pytest.mark.parametrize("name", MODELS)
def test_denoiser_is_the_model_in_hu(name):
    model = _seeded_model(name)
    stack = _random_hu(model, 2, *_small_size(model))
    out = _denoiser(model)(stack)
    assert out.shape == (2, *stack.shape[-2:])
    assert isinstance(out, np.ndarray) and np.issubdtype(out.dtype, np.floating)
    assert np.isfinite(out).all()
    with torch.no_grad():
        expected = model.hu_norm.to_hu(model(model.hu_norm.to_model(torch.from_numpy(stack)))[:, 0]).numpy()
    # 1e-4 of the HU scale (0.2-0.4 HU, under the 1 HU step that DICOM stores): the Denoiser
    # runs channels-last and oneDNN may pick another convolution algorithm than for the plain
    # call; on the 7-level Pix2Pix U-Net that moved outputs by up to 0.08 HU now and then
    # (measured; with 1e-5 of the scale, 0.02 HU, this test failed in some runs).
    np.testing.assert_allclose(out, expected, atol=1e-4 * model.hu_norm.scale_hu, rtol=0)


def test_denoiser_uses_the_given_hu_norm():
    """The Denoiser normalizes with the hu_norm it is given (a checkpoint's), not the model's."""
    from ldct_cli.models.normalization import HUNormalization

    model = _seeded_model("wgan_vgg")
    other = HUNormalization(offset_hu=-1000.0, scale_hu=2000.0)
    stack = _random_hu(model, 1, 20, 24)
    out = Denoiser(model, other, CPU)(stack)
    with torch.no_grad():
        expected = other.to_hu(model(other.to_model(torch.from_numpy(stack)))[:, 0]).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5 * other.scale_hu, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_denoiser_rejects_wrong_stack_shape(name):
    model = _seeded_model(name)
    k = int(getattr(model, "context_slices", 1))
    denoiser = _denoiser(model)
    with pytest.raises(ValueError):
        denoiser(np.zeros((1, k + 1, 32, 32), np.float32))
    with pytest.raises(ValueError):
        denoiser(np.zeros((k, 32, 32), np.float32))


@pytest.mark.parametrize("height, width", [(100, 130), (200, 300)])
def test_pix2pix_any_size_is_padded_and_cropped(height, width):
    model = _seeded_model("pix2pix")
    assert height % model.size_multiple and width % model.size_multiple
    stack = _random_hu(model, 1, height, width)
    out = _denoiser(model)(stack)
    assert out.shape == (1, height, width)
    assert np.isfinite(out).all()
    # tanh output: within the HU range the normalization maps [-1, 1] to.
    lo, hi = model.hu_norm.to_hu(np.array([-1.0, 1.0]))
    assert out.min() >= lo - 1e-3 and out.max() <= hi + 1e-3


def test_pix2pix_tiles_that_need_padding():
    model = _seeded_model("pix2pix", **SMALL_PIX2PIX)
    stack = _random_hu(model, 1, 100, 130)
    out = _denoiser(model, tile=48)(stack)
    assert out.shape == (1, 100, 130)
    assert np.isfinite(out).all()


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("name", MODELS)
def test_tiling_equals_untiled_for_finite_halo(name):
    model = _seeded_model(name, seed=1)
    if getattr(model, "halo", None) is None:
        pytest.skip(f"{name} sees the whole image (tested for seams instead)")
    stack = _random_hu(model, 1, 150, 170, seed=2)
    untiled = _denoiser(model)(stack)
    tiled = _denoiser(model, tile=64)(stack)
    assert tiled.shape == untiled.shape == (1, 150, 170)
    np.testing.assert_allclose(tiled, untiled, atol=1e-5 * model.hu_norm.scale_hu, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_tile_larger_than_image_is_untiled(name):
    model = _seeded_model(name)
    stack = _random_hu(model, 2, *_small_size(model))
    untiled = _denoiser(model)(stack)
    big_tile = _denoiser(model, tile=max(stack.shape[-2:]))(stack)
    np.testing.assert_array_equal(big_tile, untiled)


def test_pix2pix_tiling_has_no_seams():
    model = _seeded_model("pix2pix", seed=0, **SMALL_PIX2PIX)
    assert model.halo is None
    image = _disc_phantom(256)
    tile = 96
    denoiser = _denoiser(model, tile=tile)
    tiled = denoiser(image)[0]
    untiled = _denoiser(model)(image)[0]
    assert tiled.shape == untiled.shape == (256, 256)
    assert np.isfinite(tiled).all()
    assert abs(float(tiled.mean() - untiled.mean())) < 1.0  # HU

    bounds = _boundaries(256, tile, denoiser.margin)
    assert bounds, "expected tile boundaries inside the image"
    # No step across a boundary beyond the image's own pixel-to-pixel variation...
    for axis in (0, 1):
        assert _jumps_at(tiled, bounds, axis) <= 2.0 * np.abs(np.diff(tiled, axis=axis)).mean()
    # ...and, more sharply: tiling adds (almost) nothing to the steps across boundaries.
    texture = {axis: np.abs(np.diff(untiled, axis=axis)).mean() for axis in (0, 1)}
    for axis in (0, 1):
        assert _jumps_at(tiled - untiled, bounds, axis) < 0.1 * texture[axis]

    # The check can fail: tiles stitched with no overlap do leave seams it sees.
    plain = _denoiser(model)
    stitched = np.zeros_like(untiled)
    for r0 in range(0, 256, tile):
        for c0 in range(0, 256, tile):
            stitched[r0:r0 + tile, c0:c0 + tile] = plain(image[..., r0:r0 + tile, c0:c0 + tile])[0]
    hard_bounds = _boundaries(256, tile, 0)
    assert max(_jumps_at(stitched - untiled, hard_bounds, axis) / texture[axis] for axis in (0, 1)) > 0.1


@pytest.mark.parametrize("length, core, margin", [
    (150, 64, 20), (170, 64, 8), (128, 64, 0), (50, 64, 10), (256, 96, 64), (97, 16, 200), (1, 16, 3),
])
def test_axis_windows_cover_each_pixel_once(length, core, margin):
    windows = _axis_windows(length, core, margin)
    covered = np.zeros(length, dtype=int)
    for w_start, w_end, c_start, c_end in windows:
        assert 0 <= w_start <= c_start < c_end <= w_end <= length
        assert c_end - c_start <= core
        assert w_start == max(0, c_start - margin)
        assert w_end == min(length, c_end + margin)
        covered[c_start:c_end] += 1
    np.testing.assert_array_equal(covered, 1)


@pytest.mark.parametrize("length, core, margin", [(150, 64, 20), (256, 96, 64), (50, 64, 10), (97, 16, 40)])
def test_axis_weights(length, core, margin):
    windows = _axis_windows(length, core, margin)
    hard_sum = np.zeros(length)
    soft_sum = np.zeros(length)
    for window in windows:
        w_start, w_end, c_start, c_end = window
        hard = _axis_weights(window, length, 0)
        assert hard.shape == (w_end - w_start,)
        expected = np.zeros(w_end - w_start)
        expected[c_start - w_start:c_end - w_start] = 1.0
        np.testing.assert_array_equal(hard, expected)
        hard_sum[w_start:w_end] += hard

        soft = _axis_weights(window, length, margin)
        assert soft.shape == (w_end - w_start,)
        assert (soft > 0).all() and (soft <= 1).all()
        soft_sum[w_start:w_end] += soft
    np.testing.assert_array_equal(hard_sum, 1.0)
    assert (soft_sum > 0).all()
    # No fading towards the image's own edges: there is no neighbour to blend with there.
    first = _axis_weights(windows[0], length, margin)
    last = _axis_weights(windows[-1], length, margin)
    assert first[0] == first.max() and last[-1] == last.max()


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", MODELS)
def test_batch_size_does_not_change_results(name):
    model = _seeded_model(name, seed=5)
    stack = _random_hu(model, 5, *_small_size(model), seed=6)
    one = _denoiser(model, batch_size=1)(stack)
    three = _denoiser(model, batch_size=3)(stack)
    assert one.shape == three.shape == (5, *stack.shape[-2:])
    np.testing.assert_allclose(one, three, atol=1e-5 * model.hu_norm.scale_hu, rtol=0)
    # Each slice is denoised on its own: slice 2 alone gives the same result.
    alone = _denoiser(model, batch_size=1)(stack[2:3])
    np.testing.assert_allclose(alone[0], one[2], atol=1e-5 * model.hu_norm.scale_hu, rtol=0)


# --------------------------------------------------------------------------- options


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto") == CPU


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_device_is_cuda_with_cuda():
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(UsageError):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_cuda_device_without_cuda_is_a_usage_error():
    with pytest.raises(UsageError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(UsageError):
        resolve_device("cuda:0")


def test_device_names():
    assert resolve_device("cpu") == CPU
    for bad in ("tpu", "gpu", "not a device", ""):
        with pytest.raises(UsageError):
            resolve_device(bad)


def test_effective_precision():
    for precision in ("fp32", "bf16", "fp16"):
        assert effective_precision(precision, CPU) == "fp32"
    if CUDA:
        assert effective_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(UsageError, match="precision"):
        effective_precision("x", CPU)
    model = _seeded_model("wgan_vgg")
    assert _denoiser(model, precision="bf16").precision == "fp32"
    with pytest.raises(UsageError):
        _denoiser(model, precision="int8")


def test_denoiser_rejects_bad_batch_and_tile():
    model = _seeded_model("wgan_vgg")
    with pytest.raises(UsageError, match="batch"):
        _denoiser(model, batch_size=0)
    with pytest.raises(UsageError, match="tile"):
        _denoiser(model, tile=8)
    assert _denoiser(model, tile=16).tile == 16


@pytest.mark.parametrize("name", MODELS)
def test_building_and_running_a_denoiser_draws_nothing_from_the_global_rng(name):
    """Training validates through a Denoiser: if that drew random numbers (a fresh layer's
    default init, say), the gradient penalty's and dropout's draws after it would depend on
    --val-every, and a resumed run would not repeat the uninterrupted one."""
    model = _seeded_model(name, **(SMALL_PIX2PIX if name.startswith("pix2pix") else {}))
    stack = _random_hu(model, 1, 64, 64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _denoiser(model)(stack)
    assert torch.equal(torch.get_rng_state(), before)

"""CPCA (Shan et al., TMI 2018): architecture, receptive field, 2.5D/3D layers and the 2D-to-3D transfer."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from ldct_cli.models.cpca import CPCA
from ldct_cli.models.layout import to_channels_last


def _model(in_slices: int = 1, channels: int = 32, seed: int = 0) -> CPCA:
    """A seeded model whose output is positive: with the default init the final ReLU can
    zero whole images, and a zero output stays zero under any perturbation of the input,
    which would make the "changes the output" checks below fail for the wrong reason."""
    torch.manual_seed(seed)
    model = CPCA(in_slices=in_slices, channels=channels)
    with torch.no_grad():
        model.decoder[3].bias.fill_(0.5)
    return model.eval()


def _rand(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("in_slices", "expected"), [(1, 62_337), (3, 62_913), (5, 81_345), (7, 99_777)])
def test_parameter_count(in_slices: int, expected: int) -> None:
    # 2D: 320 + 3 * 9,248 (conv) + 3 * 9,248 (deconv) + 3 * 2,080 (1x1) + 289 (deconv8) = 62,337.
    # Each 3x3x3 layer triples its kernel: conv1 320 -> 896, conv2/conv3 9,248 -> 27,680.
    assert _count(CPCA(in_slices=in_slices)) == expected


def test_layers_are_the_papers() -> None:
    model = CPCA(in_slices=5)
    kinds = [type(m).__name__ for m in model.encoder]
    assert kinds == ["Conv3d", "Conv3d", "Conv2d", "Conv2d"]
    assert all(m.kernel_size[-2:] == (3, 3) and m.padding in ((0, 0), (0, 0, 0)) for m in model.encoder)
    assert all(m.kernel_size == (3, 3) and m.padding == (0, 0) for m in model.decoder)
    assert [m.in_channels for m in model.reduce] == [64, 64, 64]
    assert [m.kernel_size for m in model.reduce] == [(1, 1)] * 3
    assert model.decoder[3].out_channels == 1
    assert (model.halo, model.size_multiple, model.context_slices) == (8, 1, 5)


def test_built_from_its_keyword_arguments() -> None:
    """What a checkpoint stores (the kwargs) is all it takes to rebuild the network."""
    assert list(inspect.signature(CPCA).parameters) == ["in_slices", "channels"]
    source = _model(in_slices=3, channels=8)
    stored_kwargs = {"in_slices": 3, "channels": 8}
    rebuilt = CPCA(**stored_kwargs)
    rebuilt.load_state_dict(source.state_dict())
    x = _rand(1, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), source(x), atol=0, rtol=0)


@pytest.mark.parametrize("in_slices", [1, 3, 7])
@pytest.mark.parametrize(("h", "w"), [(37, 53), (9, 9)])
def test_shape_preserved(in_slices: int, h: int, w: int) -> None:
    model = _model(in_slices=in_slices, channels=8)
    with torch.no_grad():
        y = model(_rand(2, in_slices, h, w))
    assert y.shape == (2, 1, h, w)
    assert y.min() >= 0  # final ReLU


def test_shape_preserved_full_width() -> None:
    with torch.no_grad():
        y = _model()(_rand(1, 1, 128, 96))
    assert y.shape == (1, 1, 128, 96)


def test_output_is_non_negative() -> None:
    """The last layer is followed by a ReLU, as RED-CNN's: a negative pre-activation gives 0."""
    model = _model(channels=8)
    with torch.no_grad():
        model.decoder[3].bias.fill_(-100.0)
        y = model(_rand(1, 1, 16, 16))
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("bad", [0, 2, 4, 9, -1])
def test_rejects_unsupported_slice_counts(bad: int) -> None:
    with pytest.raises(ValueError, match="in_slices"):
        CPCA(in_slices=bad)


def test_rejects_input_with_other_slice_count() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        CPCA(in_slices=3, channels=4)(_rand(1, 5, 16, 16))


@pytest.mark.parametrize("in_slices", [1, 3])
def test_halo_bounds_the_receptive_field(in_slices: int) -> None:
    """An output pixel ignores inputs more than ``halo`` px away and depends on those at it."""
    model = _model(in_slices=in_slices, channels=8)
    halo, (i, j) = model.halo, (20, 21)
    x = _rand(1, in_slices, 41, 43)
    rows = torch.arange(41)[:, None]
    cols = torch.arange(43)[None, :]
    distance = torch.maximum((rows - i).abs(), (cols - j).abs())  # Chebyshev, per pixel

    far = x.clone()
    far[..., distance > halo] = _rand(1, in_slices, 41, 43, seed=2)[..., distance > halo]
    with torch.no_grad():
        y, y_far = model(x), model(far)
    assert y[0, 0, i, j] > 0
    torch.testing.assert_close(y_far[0, 0, i, j], y[0, 0, i, j], atol=1e-6, rtol=0)
    assert (y_far - y).abs().max() > 1e-3  # the changed pixels are seen elsewhere: the test can tell

    # The halo is tight: the pixels at exactly ``halo`` px matter. Their effect runs through
    # all eight 3x3 layers' corner taps and is too small to see in float32 outputs, so
    # look at the float64 gradient instead.
    x64 = x.double().requires_grad_()
    model.double()(x64)[0, 0, i, j].backward()
    grad = x64.grad[0].abs().sum(0)
    assert not grad[distance > halo].any()
    assert grad[distance == halo].max() > 0


@pytest.mark.parametrize("in_slices", [3, 5, 7])
def test_inflated_3d_model_equals_2d_model_on_centre_slice(in_slices: int) -> None:
    source = _model(in_slices=1, seed=10)
    target = CPCA(in_slices=in_slices)  # its own random init, overwritten below
    target.inflate_from(source)
    target.eval()
    x = _rand(2, in_slices, 27, 31, seed=11)
    centre = in_slices // 2
    with torch.no_grad():
        y3d = target(x)
        y2d = source(x[:, centre:centre + 1])
        y_other = source(x[:, centre - 1:centre])
    assert (y2d > 0).float().mean() > 0.5  # not an all-zero comparison
    torch.testing.assert_close(y3d, y2d, atol=1e-6, rtol=0)
    assert (y3d - y_other).abs().max() > 1e-3  # another slice gives another image

    kernel = target.encoder[0].weight
    assert kernel.shape[2] == 3
    assert torch.equal(kernel[:, :, 1], source.encoder[0].weight)
    assert not kernel[:, :, 0].any() and not kernel[:, :, 2].any()


def test_inflated_model_learns_from_the_neighbours() -> None:
    """The zero planes start at zero but are trained: they get a gradient."""
    target = CPCA(in_slices=3, channels=8)
    target.inflate_from(_model(channels=8))
    target(_rand(2, 3, 20, 20)).mean().backward()
    grad = target.encoder[0].weight.grad
    assert grad[:, :, 0].abs().sum() > 0 and grad[:, :, 2].abs().sum() > 0


def test_inflate_rejects_a_3d_source() -> None:
    with pytest.raises(ValueError, match="in_slices=1"):
        CPCA(in_slices=5, channels=8).inflate_from(CPCA(in_slices=3, channels=8))


def test_inflate_rejects_other_width() -> None:
    with pytest.raises(ValueError, match="channels"):
        CPCA(in_slices=3, channels=8).inflate_from(CPCA(in_slices=1, channels=16))


def test_gradients_reach_every_parameter() -> None:
    model = _model(in_slices=3, channels=8).train()
    loss = ((model(_rand(4, 3, 24, 24)) - _rand(4, 1, 24, 24, seed=5)) ** 2).mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("in_slices", [1, 3])
def test_channels_last(in_slices: int) -> None:
    """What training and inference do: the module and a 4D batch in channels-last."""
    model = _model(in_slices=in_slices, channels=8)
    x = _rand(2, in_slices, 21, 19)
    with torch.no_grad():
        expected = model(x)
        assert to_channels_last(model) is model
        y = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    if in_slices > 1:
        assert model.encoder[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model.encoder[-1].weight.is_contiguous(memory_format=torch.channels_last)

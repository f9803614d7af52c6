"""The DRL/CNN10 cascade: DRL (edge layer + dilated convs), CNN10, and how levels chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldct_cli.inference import Denoiser
from ldct_cli.models.cascade import CNN10, DRL, Cascade, EdgeLayer
from ldct_cli.models.registry import create_model
from ldct_cli.training.steps import cascade_stage


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_are_the_papers():
    # Seed 002: DRL 225,601 and CNN10 335,873 (Keras counts BatchNorm's running mean and
    # variance too, which torch keeps as buffers).
    assert _count(DRL()) == 225_601
    cnn10 = CNN10()
    stats = sum(b.numel() for name, b in cnn10.named_buffers() if "running" in name)
    assert _count(cnn10) + stats == 335_873
    assert _count(Cascade(levels=3)) == 225_601 + 2 * _count(cnn10)


def test_edge_layer_is_fixed_and_finds_edges_in_four_directions():
    layer = EdgeLayer()
    assert list(layer.parameters()) == []  # nothing an optimizer could move
    flat = layer(torch.full((1, 1, 9, 9), 0.4))[..., 2:-2, 2:-2]
    assert flat.abs().max() < 1e-6
    step = torch.zeros(1, 1, 9, 9)
    step[..., 5:, :] = 1.0  # a horizontal edge
    response = layer(step)[0, :, 2:-2, 2:-2].abs().amax(dim=(1, 2))
    assert response[0] > 1 and response[1] < 1e-6  # the horizontal operator sees it, the vertical not
    assert response[2] > 1 and response[3] > 1  # both diagonals respond to a horizontal edge


def test_forward_runs_the_trained_levels_only():
    torch.manual_seed(0)
    net = Cascade(levels=3, channels=8).eval()
    x = torch.rand(2, 1, 33, 29)
    with torch.no_grad():
        first = net.drl(x)
        second = first - net.diffs[0](first)
        third = second - net.diffs[1](second)
        for levels, expected in ((1, first), (2, second), (3, third)):
            net.trained_levels.fill_(levels)
            torch.testing.assert_close(net(x), expected)
    assert net(x).shape == x.shape


def test_halo_covers_the_receptive_field_so_tiles_match_whole_slices():
    torch.manual_seed(1)
    net = create_model("cascade", channels=8).eval()
    image = np.random.default_rng(0).normal(0, 200, (1, 1, 100, 90)).astype(np.float32)
    whole = Denoiser(net, net.hu_norm, torch.device("cpu"))(image)
    tiled = Denoiser(net, net.hu_norm, torch.device("cpu"), tile=32)(image)
    np.testing.assert_allclose(tiled, whole, atol=1e-3)  # HU


@pytest.mark.parametrize("step, stage", [(0, 0), (9, 0), (10, 1), (24, 1), (25, 2), (99, 2)])
def test_stage_follows_the_step(step, stage):
    assert cascade_stage(step, (10, 15, 5)) == stage


def test_a_cascade_needs_a_level():
    with pytest.raises(ValueError, match="at least one level"):
        Cascade(levels=0)


def test_a_new_difference_network_predicts_no_difference():
    """Adding a level starts from the previous level's output, not from random noise."""
    torch.manual_seed(2)
    net = Cascade(levels=2, channels=8).eval()
    x = torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.drl(x), rtol=0, atol=0)

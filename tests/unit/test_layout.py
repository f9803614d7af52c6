"""to_channels_last: every 4D/5D weight in its rank's channels-last layout, nothing else changed."""

from __future__ import annotations

import torch
from torch import nn

from ldct_cli.models.layout import to_channels_last


class _Mixed(nn.Module):
    """A 3D layer, a 2D layer, a transposed 2D layer, a 4D buffer and a 1D parameter.

    Every kernel has 2+ input channels: a 1-channel kernel is in both layouts at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(2, 4, 3, padding=(0, 1, 1))
        self.conv2d = nn.Conv2d(4, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 2, 3, padding=1)
        self.register_buffer("kernel", torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1)))
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3d(torch.stack([x, x * x], dim=1)).squeeze(2)
        y = self.conv2d(y) * self.gain.view(1, -1, 1, 1)
        y = y + nn.functional.conv2d(x[:, 1:3], self.kernel, padding=1)
        return self.deconv(y)


def test_layouts_values_and_identity() -> None:
    torch.manual_seed(0)
    model = _Mixed()
    x = torch.randn(2, 3, 17, 13)
    expected = model(x).detach()
    before = {name: param for name, param in model.named_parameters()}
    with torch.no_grad():
        values = {name: t.clone() for name, t in model.state_dict().items()}
    # nn.Module.to refuses this network: the reason the helper exists.
    try:
        _Mixed().to(memory_format=torch.channels_last)
    except RuntimeError:
        pass
    else:  # pragma: no cover - a torch that accepts it would make the helper optional
        raise AssertionError("nn.Module.to accepted channels_last for a Conv3d")

    assert to_channels_last(model) is model
    assert model.conv3d.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not model.conv3d.weight.is_contiguous()
    for weight in (model.conv2d.weight, model.deconv.weight, model.kernel):
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()
    for name, param in model.named_parameters():
        assert param is before[name], name  # an optimizer built before still holds them
        assert param.requires_grad
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, values[name], rtol=0, atol=0)
    y = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_trains_after_conversion() -> None:
    torch.manual_seed(0)
    model = to_channels_last(_Mixed())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, target = torch.randn(4, 3, 16, 16), torch.zeros(4, 2, 16, 16)
    first = None
    for _ in range(20):
        loss = ((model(x) - target) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert model.conv3d.weight.is_contiguous(memory_format=torch.channels_last_3d)

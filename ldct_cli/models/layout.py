"""Memory layout of a network's weights: channels-last for 2D and 3D convolutions alike.

``nn.Module.to(memory_format=torch.channels_last)`` converts every 4D and 5D weight and
refuses the 5D kernels of ``Conv3d`` ("required rank 4 tensor"), so a network that mixes
2D and 3D layers (CPCA with 3 to 7 input slices) cannot take that path. This helper gives
each tensor the channels-last layout of its own rank and touches nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

_LAYOUT = {4: torch.channels_last, 5: torch.channels_last_3d}


def to_channels_last(module: nn.Module) -> nn.Module:
    """Give ``module``'s 4D and 5D parameters and buffers the channels-last layout, in place.

    Values, dtypes, devices and ``requires_grad`` are unchanged; returns ``module``.
    Call it before building an optimizer (the parameters stay the same objects, only
    their storage changes, as with ``nn.Module.to``).
    """
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                layout = _LAYOUT.get(param.dim())
                if layout is not None and not param.is_contiguous(memory_format=layout):
                    param.data = param.data.contiguous(memory_format=layout)
            for name, buffer in sub.named_buffers(recurse=False):
                layout = _LAYOUT.get(buffer.dim())
                if layout is not None and not buffer.is_contiguous(memory_format=layout):
                    setattr(sub, name, buffer.contiguous(memory_format=layout))
    return module

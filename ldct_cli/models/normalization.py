"""How Hounsfield units map to a network's input range, declared by each model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class HUNormalization:
    """x = (clip(HU, hu_min, hu_max) - offset_hu) / scale_hu, and back.

    The clip keeps scanner padding (-2000, -3024 HU outside the scan circle) out of
    the input range; ``to_hu`` is the exact inverse on the clipped range.
    """

    offset_hu: float
    scale_hu: float
    hu_min: float = -1024.0
    hu_max: float = 3072.0

    def to_model(self, image_hu):
        """HU array (numpy or torch) -> network units."""
        if isinstance(image_hu, np.ndarray):
            clipped = np.clip(image_hu, self.hu_min, self.hu_max)
        else:
            clipped = image_hu.clamp(self.hu_min, self.hu_max)
        return (clipped - self.offset_hu) / self.scale_hu

    def to_hu(self, x):
        """Network units -> HU (same array type)."""
        return x * self.scale_hu + self.offset_hu

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        values = (self.offset_hu, self.scale_hu, self.hu_min, self.hu_max)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"HU normalization values must be finite numbers, got {values}")
        if not self.scale_hu > 0:
            raise ValueError(f"scale_hu must be > 0, got {self.scale_hu}")
        if not self.hu_min < self.hu_max:
            raise ValueError(f"hu_min must be below hu_max, got {self.hu_min} and {self.hu_max}")

    @classmethod
    def from_dict(cls, d: dict) -> "HUNormalization":
        return cls(**{k: float(d[k]) for k in ("offset_hu", "scale_hu", "hu_min", "hu_max")})


# [-1024, 3072] HU -> [0, 1]: the range RED-CNN and WGAN-VGG are trained on (ReLU output).
UNIT_RANGE = HUNormalization(offset_hu=-1024.0, scale_hu=4096.0)
# [-1024, 3072] HU -> [-1, 1]: for generators that end in tanh (Pix2Pix).
SYMMETRIC_RANGE = HUNormalization(offset_hu=1024.0, scale_hu=2048.0)

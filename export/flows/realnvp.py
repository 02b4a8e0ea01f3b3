"""Real NVP: affine couplings, multi-scale for images."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .base import Flow, conditioning_features, widths
from .nets import MLP, ConvNet
from .transforms import ComposedTransform, Coupling, FactorOut, Flatten, Squeeze, alternating_mask, channel_mask


def _image_couplings(shape, masks, hidden_channels, context_dim) -> list[nn.Module]:
    return [Coupling(mask, ConvNet(shape[0], 2 * shape[0], hidden_channels, context_dim)) for mask in masks]


class RealNVP(Flow):
    """Real NVP (Dinh et al., 2017): affine couplings.

    Vectors: ``num_couplings`` couplings with alternating masks and tanh MLPs (bounded
    conditioners keep the tails sane: with ReLU ones, unstandardised two moons scored
    log p(4, 4) = -1.4e8). Images [C, H, W]: the multi-scale architecture, ``num_scales``
    scales of three checkerboard couplings, a squeeze, three channel couplings and a
    factor-out of half the channels; the last scale has four checkerboard couplings.
    """

    family = "realnvp"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_couplings: int = 8,
                 hidden_features: Sequence[int] = (64, 64), num_scales: int = 2, hidden_channels: int = 32,
                 context_embedding: dict | None = None):
        self.num_couplings, self.hidden_features = num_couplings, widths(hidden_features)
        self.num_scales, self.hidden_channels = num_scales, hidden_channels
        event_shape = tuple(event_shape)
        features = conditioning_features(context_dim, context_embedding)
        if len(event_shape) == 3:
            body = [self._scale(event_shape, num_scales, features)]
        else:
            dim = math.prod(event_shape)
            if dim < 2:
                raise ValueError(f"RealNVP needs at least 2 features, got {dim}")
            body = [Flatten(event_shape)] + [
                Coupling(alternating_mask([dim], index % 2),
                         MLP(dim, 2 * dim, self.hidden_features, context_features=features))
                for index in range(num_couplings)
            ]
        super().__init__(event_shape, body, context_dim, preprocessing, context_embedding)

    def _scale(self, shape, scales_left, context_dim) -> nn.Module:
        channels, height, width = shape
        if scales_left == 1 or height % 2 or width % 2:
            masks = [alternating_mask(shape, i % 2) for i in range(4)]
            return ComposedTransform([*_image_couplings(shape, masks, self.hidden_channels, context_dim),
                                      Flatten(shape)])
        squeezed = (4 * channels, height // 2, width // 2)
        inner_shape = (squeezed[0] // 2, *squeezed[1:])
        return ComposedTransform([
            *_image_couplings(shape, [alternating_mask(shape, i % 2) for i in range(3)],
                              self.hidden_channels, context_dim),
            Squeeze(),
            *_image_couplings(squeezed, [channel_mask(squeezed, i % 2) for i in range(3)],
                              self.hidden_channels, context_dim),
            FactorOut(self._scale(inner_shape, scales_left - 1, context_dim), squeezed),
        ])

    def options(self):
        return {"num_couplings": self.num_couplings, "hidden_features": list(self.hidden_features),
                "num_scales": self.num_scales, "hidden_channels": self.hidden_channels}

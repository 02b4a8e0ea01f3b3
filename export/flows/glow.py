"""Glow: actnorm, invertible 1x1 convolutions and affine couplings."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .base import Flow, conditioning_features, widths
from .nets import MLP, ConvNet
from .transforms import ActNorm, ComposedTransform, Coupling, FactorOut, Flatten, InvertibleLinearLU, Squeeze, channel_mask


class Glow(Flow):
    """Glow (Kingma & Dhariwal, 2018): steps of actnorm, an invertible 1x1 convolution
    (LU-parametrised) and an affine coupling on half the channels.

    Images [C, H, W]: ``num_levels`` levels of squeeze and ``steps_per_level`` steps, with a
    factor-out of half the channels between levels. Vectors: ``steps_per_level`` steps.
    """

    family = "glow"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_levels: int = 2,
                 steps_per_level: int = 4, hidden_features: Sequence[int] = (64, 64), hidden_channels: int = 32,
                 context_embedding: dict | None = None):
        self.num_levels, self.steps_per_level = num_levels, steps_per_level
        self.hidden_features, self.hidden_channels = widths(hidden_features), hidden_channels
        self._seed = 0
        event_shape = tuple(event_shape)
        features = conditioning_features(context_dim, context_embedding)
        if len(event_shape) == 3:
            body = [self._level(event_shape, num_levels, features)]
        else:
            dim = math.prod(event_shape)
            body = [Flatten(event_shape), *self._steps((dim,), features)]
        super().__init__(event_shape, body, context_dim, preprocessing, context_embedding)

    def _steps(self, shape, context_dim) -> list[nn.Module]:
        steps = []
        for index in range(self.steps_per_level):
            self._seed += 1
            if len(shape) == 1:
                net = MLP(shape[0], 2 * shape[0], self.hidden_features, context_features=context_dim)
            else:
                net = ConvNet(shape[0], 2 * shape[0], self.hidden_channels, context_dim)
            steps += [ActNorm(shape[0]), InvertibleLinearLU(shape[0], seed=self._seed),
                      Coupling(channel_mask(shape, index % 2), net)]
        return steps

    def _level(self, shape, levels_left, context_dim) -> nn.Module:
        channels, height, width = shape
        if height % 2 or width % 2:
            raise ValueError(f"Glow squeezes 2x2 blocks: a level's height and width must be even, got {list(shape)}")
        squeezed = (4 * channels, height // 2, width // 2)
        steps = self._steps(squeezed, context_dim)
        if levels_left == 1 or squeezed[1] % 2 or squeezed[2] % 2:
            return ComposedTransform([Squeeze(), *steps, Flatten(squeezed)])
        inner = self._level((squeezed[0] // 2, *squeezed[1:]), levels_left - 1, context_dim)
        return ComposedTransform([Squeeze(), *steps, FactorOut(inner, squeezed)])

    def options(self):
        return {"num_levels": self.num_levels, "steps_per_level": self.steps_per_level,
                "hidden_features": list(self.hidden_features), "hidden_channels": self.hidden_channels}

"""Networks that parameterise transforms: MLPs, MADE and small convnets.

Every network takes ``(x, context)`` with an optional context ``[B, C]`` and starts
with its last layer at zero, so the transform it drives starts as the identity (a context
embedding's MLP, which drives no transform, does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """Fully connected ``in_features (+ context) -> hidden... -> out_features``; the last
    layer starts at zero unless not ``zero_last`` (a context embedding's)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
        context_features: int = 0,
        zero_last: bool = True,
    ):
        super().__init__()
        widths = [in_features + context_features, *hidden_features]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), activation()]
        last = nn.Linear(widths[-1], out_features)
        self.layers = nn.Sequential(*layers, _zero_init(last) if zero_last else last)
        self.context_features = context_features

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if self.context_features:
            x = torch.cat([x, context], dim=1)
        return self.layers(x)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` [out, in]."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al., 2015).

    Returns ``outputs_per_feature`` blocks of ``features`` values, block after block;
    output ``i`` of every block depends only on inputs ``0..i-1`` and on the context,
    which feeds every unit of the first hidden layer. (Flows reorder features with
    permutations between MADE layers.)
    """

    def __init__(
        self,
        features: int,
        hidden_features: Sequence[int] = (64, 64),
        outputs_per_feature: int = 2,
        context_features: int = 0,
        activation: type[nn.Module] = nn.Tanh,
    ):
        super().__init__()
        if features < 2:
            raise ValueError(f"MADE needs at least 2 features, got {features}")
        degree_in = torch.arange(features)
        degrees = [degree_in]
        for width in hidden_features:
            # Hidden degrees cycle over 0..D-2: a unit of degree k sees inputs of degree <= k.
            degrees.append(torch.arange(width) % (features - 1))
        layers: list[nn.Module] = []
        for previous, current in zip(degrees[:-1], degrees[1:]):
            layers.append(MaskedLinear(current[:, None] >= previous[None, :]))
            layers.append(activation())
        output_degree = degree_in.repeat(outputs_per_feature)
        layers.append(_zero_init(MaskedLinear(output_degree[:, None] > degrees[-1][None, :])))
        self.first = layers[0]
        self.rest = nn.Sequential(*layers[1:])
        self.context_layer = nn.Linear(context_features, len(degrees[1])) if context_features else None

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h = self.first(x)
        if self.context_layer is not None and context is not None:
            h = h + self.context_layer(context)
        return self.rest(h)


class ConvNet(nn.Module):
    """Coupling network for images: conv3x3 -> conv1x1 -> conv3x3 (zero-initialised).

    The context, if any, is projected to a per-channel bias after the first layer.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int = 32, context_features: int = 0
    ):
        super().__init__()
        self.first = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.rest = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            _zero_init(nn.Conv2d(hidden_channels, out_channels, 3, padding=1)),
        )
        self.context_layer = nn.Linear(context_features, hidden_channels) if context_features else None

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        h = self.first(x)
        if self.context_layer is not None:
            h = h + self.context_layer(context)[:, :, None, None]
        return self.rest(h)

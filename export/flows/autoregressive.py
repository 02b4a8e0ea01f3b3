"""MAF and IAF: stacked MADE layers, one direction in one pass, the other in D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import Flow, conditioning_features, widths
from .cached_inverse import CachedMADEInverse
from .nets import MADE
from .transforms import AutoregressiveAffine, Flatten, Inverse, Permutation, fixed_point_inverses


def _autoregressive_layers(dim, num_layers, hidden_features, context_dim, inverted: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    reverse = torch.arange(dim - 1, -1, -1)
    for index in range(num_layers):
        layer = AutoregressiveAffine(MADE(dim, hidden_features, context_features=context_dim))
        layers.append(Inverse(layer) if inverted else layer)
        if index < num_layers - 1:
            layers.append(Permutation(reverse))
    return layers


class MAF(Flow):
    """Masked autoregressive flow (Papamakarios et al., 2017): stacked MADE layers with
    the feature order reversed between them. Density in one pass per layer; sampling in
    ``D`` sequential passes per layer."""

    family = "maf"
    inverted = False

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_layers: int = 5,
                 hidden_features: Sequence[int] = (64, 64), context_embedding: dict | None = None):
        dim = math.prod(event_shape)
        self.num_layers, self.hidden_features = num_layers, widths(hidden_features)
        features = conditioning_features(context_dim, context_embedding)
        body = [Flatten(event_shape),
                *_autoregressive_layers(dim, num_layers, self.hidden_features, features, self.inverted)]
        super().__init__(event_shape, body, context_dim, preprocessing, context_embedding)

    def options(self):
        return {"num_layers": self.num_layers, "hidden_features": list(self.hidden_features)}


class IAF(MAF):
    """Inverse autoregressive flow (Kingma et al., 2016): MAF's layers inverted. Sampling
    in one pass per layer; density in ``D`` sequential passes per layer."""

    family = "iaf"
    inverted = True


def use_cached_inverse(model: nn.Module, min_batch: int = 256) -> int:
    """Give every MADE layer's sequential inverse below ``model`` a :class:`CachedMADEInverse`
    built from its weights as they are now: the model's ONNX export then computes batches of
    ``min_batch`` rows or more with it. Returns how many layers got one."""
    if min_batch < 1:
        raise ValueError(f"min_batch must be at least 1, got {min_batch}")
    inverses = [inverse for inverse in fixed_point_inverses(model)
                if inverse.cacheable and isinstance(inverse.net, MADE)]
    for inverse in inverses:
        inverse.cached = CachedMADEInverse(inverse.net, inverse.log_scale_bound, min_batch=min_batch)
    return len(inverses)

"""NICE: additive couplings and a diagonal scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Flow, conditioning_features, widths
from .nets import MLP
from .transforms import Coupling, DiagonalScaling, Flatten, alternating_mask


class NICE(Flow):
    """NICE (Dinh et al., 2015): additive couplings with alternating masks, then a
    learned diagonal scaling. Images are flattened."""

    family = "nice"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_couplings: int = 4,
                 hidden_features: Sequence[int] = (64, 64), context_embedding: dict | None = None):
        dim = math.prod(event_shape)
        features = conditioning_features(context_dim, context_embedding)
        self.num_couplings, self.hidden_features = num_couplings, widths(hidden_features)
        couplings = [
            Coupling(alternating_mask([dim], index % 2),
                     MLP(dim, dim, self.hidden_features, context_features=features), affine=False)
            for index in range(num_couplings)
        ]
        super().__init__(event_shape, [Flatten(event_shape), *couplings, DiagonalScaling(dim)],
                         context_dim, preprocessing, context_embedding)

    def options(self):
        return {"num_couplings": self.num_couplings, "hidden_features": list(self.hidden_features)}

"""Neural spline flows: rational-quadratic spline couplings, or autoregressive splines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import Flow, conditioning_features, widths
from .nets import MADE, MLP
from .splines import AutoregressiveSpline, SplineCoupling
from .transforms import Flatten, Permutation, alternating_mask

VARIANTS = ("coupling", "autoregressive")


class NSF(Flow):
    """Neural spline flow (Durkan et al., 2019): ``num_transforms`` monotonic
    rational-quadratic splines of ``bins`` bins on ``[-tail_bound, tail_bound]``, identity
    outside, per feature. Images are flattened.

    ``variant`` ``coupling`` (RQ-NSF (C)): half the features, alternating, parameterise the
    splines of the others through an MLP; both directions in one pass. ``autoregressive``
    (RQ-NSF (AR)): a MADE gives each feature's spline from the features before it, with the
    order reversed between transforms; density in one pass, sampling in ``D`` sequential
    passes (a loop, as MAF's). The data are standardised first by default, so the tails
    start at ``tail_bound`` standard deviations.
    """

    family = "nsf"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_transforms: int = 4,
                 hidden_features: Sequence[int] = (64, 64), bins: int = 8, tail_bound: float = 5.0,
                 variant: str = "coupling", context_embedding: dict | None = None):
        dim = math.prod(event_shape)
        if dim < 2:
            raise ValueError(f"NSF needs at least 2 features, got {dim}")
        if variant not in VARIANTS:
            raise ValueError(f"NSF variant must be one of {VARIANTS}, got {variant!r}")
        if bins < 2 or not tail_bound > 0:
            raise ValueError(f"NSF needs bins >= 2 and tail_bound > 0, got {bins} and {tail_bound}")
        self.num_transforms, self.hidden_features = num_transforms, widths(hidden_features)
        self.bins, self.tail_bound, self.variant = int(bins), float(tail_bound), variant
        features = conditioning_features(context_dim, context_embedding)
        params = 3 * self.bins - 1
        body: list[nn.Module] = [Flatten(event_shape)]
        for index in range(num_transforms):
            if variant == "coupling":
                body.append(SplineCoupling(alternating_mask([dim], index % 2),
                                           MLP(dim, params * dim, self.hidden_features, context_features=features),
                                           self.tail_bound))
            else:
                made = MADE(dim, self.hidden_features, outputs_per_feature=params, context_features=features)
                body.append(AutoregressiveSpline(made, self.tail_bound))
                if index < num_transforms - 1:
                    body.append(Permutation(torch.arange(dim - 1, -1, -1)))
        super().__init__(event_shape, body, context_dim, preprocessing, context_embedding)

    def options(self):
        return {"num_transforms": self.num_transforms, "hidden_features": list(self.hidden_features),
                "bins": self.bins, "tail_bound": self.tail_bound, "variant": self.variant}

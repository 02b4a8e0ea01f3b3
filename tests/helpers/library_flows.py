"""zuko and nflows flows as a user's builder file holds them: each function returns an
untrained flow. The adapter tests build them directly, and the live test also exports them
with ``flowserve export --module library_flows.py:FUNCTION``; the defaults fit two moons."""

from __future__ import annotations

import torch
import zuko
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
from nflows.transforms.permutations import ReversePermutation


def zuko_maf() -> zuko.flows.Flow:
    return zuko.flows.MAF(2, transforms=3)


def zuko_nsf_coupling() -> zuko.flows.Flow:
    return zuko.flows.NSF(2, transforms=2, passes=2)


def zuko_nsf_conditional() -> zuko.flows.Flow:
    """An autoregressive NSF with one context value."""
    return zuko.flows.NSF(2, 1, transforms=2)


def nflows_maf(features: int = 2, context: int = 0, layers: int = 3, embedded: int = 0) -> Flow:
    """nflows' MAF; with ``embedded`` E, an embedding net maps the context to E values first."""
    transforms = []
    for _ in range(layers):
        transforms += [MaskedAffineAutoregressiveTransform(features, 32, context_features=embedded or context or None),
                       ReversePermutation(features)]
    embedding = None
    if embedded:
        embedding = torch.nn.Sequential(torch.nn.Linear(context, 16), torch.nn.ReLU(), torch.nn.Linear(16, embedded))
    return Flow(CompositeTransform(transforms), StandardNormal([features]), embedding_net=embedding)


def nflows_maf_embedded() -> Flow:
    """A MAF with one context value, which an embedding net maps to 4."""
    return nflows_maf(context=1, embedded=4)


def nflows_spline_coupling(features: int = 2, tails: str | None = "linear") -> Flow:
    transforms = []
    for parity in range(2):
        mask = (torch.arange(features) % 2 == parity).long()
        transforms += [PiecewiseRationalQuadraticCouplingTransform(
            mask, lambda inputs, outputs: ResidualNet(inputs, outputs, 32, num_blocks=1), num_bins=6, tails=tails,
            tail_bound=4.0), ReversePermutation(features)]
    return Flow(CompositeTransform(transforms), StandardNormal([features]))

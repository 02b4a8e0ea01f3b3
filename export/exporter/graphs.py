"""The served directions of a model as ``nn.Module`` graphs, with the spec's tensors.

density:    x[B, D] (, context[B, C]) -> log_prob[B]
generation: z[B, N] (, context[B, C]) -> x[B, D], log_prob[B]
encode:     x[B, D] (, context[B, C]) -> z[B, N], log_det[B], log_prob[B]   (models with ``encode``)
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from flowserve.contract.spec import DENSITY, DIRECTIONS, ENCODE, GENERATION, DirectionSpec, direction_spec

from ..flows.base import ServableModel


class DensityGraph(nn.Module):
    """x[B, D] (, context[B, C]) -> log_prob[B]; rows are flat, the model sees its event shape."""

    def __init__(self, model: ServableModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.log_prob(x.reshape(-1, *self.model.event_shape), context)


class GenerationGraph(nn.Module):
    """z[B, N] (, context[B, C]) -> x[B, D], log_prob[B] (log-density of x, same pass)."""

    def __init__(self, model: ServableModel):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_prob = self.model.sample_with_log_prob(z, context)
        return x.flatten(1), log_prob


class EncodeGraph(nn.Module):
    """x[B, D] (, context[B, C]) -> z[B, N], log|det dz/dx|[B], log_prob[B]."""

    def __init__(self, model: ServableModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        z, log_det, log_prob = self.model.encode(x.reshape(-1, *self.model.event_shape), context)
        return z.flatten(1), log_det, log_prob


GRAPHS = {DENSITY: DensityGraph, GENERATION: GenerationGraph, ENCODE: EncodeGraph}


def served_directions(model: ServableModel, encode: bool = True) -> tuple[str, ...]:
    """The directions ``model`` is exported in: both always, and (unless not ``encode``)
    encode where the model has ``encode``."""
    return DIRECTIONS + ((ENCODE,) if encode and callable(getattr(model, "encode", None)) else ())


def model_spec(model: ServableModel, direction: str) -> DirectionSpec:
    """The serving contract of one direction of ``model``."""
    return direction_spec(direction, math.prod(model.event_shape), noise_dim=model.noise_dim,
                          context_dim=model.context_dim)


def prepared_copy(model: ServableModel) -> nn.Module:
    """A copy of ``model`` ready to export: its ``prepare_for_export()`` if it has one (Glow
    precomputes its matrix inverses), in eval mode; ``model`` itself is left untouched."""
    prepared = copy.deepcopy(model)
    prepare = getattr(prepared, "prepare_for_export", None)
    return (prepare() if prepare is not None else prepared).eval()


def example_inputs(model: ServableModel, direction: str, rows: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, *t.dims, generator=generator) for t in model_spec(model, direction).inputs)

"""The two served directions of a model as ``nn.Module`` graphs, with the spec's tensors.

density:    x[B, D] (, context[B, C]) -> log_prob[B]
generation: z[B, N] (, context[B, C]) -> x[B, D], log_prob[B]
"""

from __future__ import annotations

import torch
from torch import nn

from flowserve.spec import DENSITY, GENERATION, DirectionSpec, direction_spec

from ..flows.base import DensityModel


class DensityGraph(nn.Module):
    """x[B, D] (, context[B, C]) -> log_prob[B]; rows are flat, the model sees its event shape."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.log_prob(x.reshape(-1, *self.model.event_shape), context)


class GenerationGraph(nn.Module):
    """z[B, N] (, context[B, C]) -> x[B, D], log_prob[B] (log-density of x, same pass)."""

    def __init__(self, model: DensityModel):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_prob = self.model.sample_with_log_prob(z, context)
        return x.flatten(1), log_prob


GRAPHS = {DENSITY: DensityGraph, GENERATION: GenerationGraph}


def model_spec(model: DensityModel, direction: str) -> DirectionSpec:
    """The serving contract of one direction of ``model``."""
    return direction_spec(direction, model.dim, noise_dim=model.noise_dim, context_dim=model.context_dim)


def example_inputs(model: DensityModel, direction: str, rows: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, *t.dims, generator=generator) for t in model_spec(model, direction).inputs)

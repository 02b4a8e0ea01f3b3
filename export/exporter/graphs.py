"""The served directions of a model as ``nn.Module`` graphs, with the spec's tensors.

density:    x[B, D] (, context[B, C]) -> log_prob[B]
generation: z[B, N] (, context[B, C]) -> x[B, D], log_prob[B]
encode:     x[B, D] (, context[B, C]) -> z[B, N], log_det[B], log_prob[B]   (models with ``encode``)
embed:      context[B, C] -> embedded_context[B, E]   (models with a ``context_embedding``,
            see :class:`EmbeddingApart`; their directions then take embedded_context[B, E])
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from flowserve.contract.spec import DENSITY, DIRECTIONS, EMBED, ENCODE, GENERATION, DirectionSpec, direction_spec

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


class EmbedGraph(nn.Module):
    """context[B, C] -> embedded_context[B, E]: the model's context embedding alone."""

    def __init__(self, model: ServableModel):
        super().__init__()
        self.model = model

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.model.context_embedding(context)


GRAPHS = {DENSITY: DensityGraph, GENERATION: GenerationGraph, ENCODE: EncodeGraph, EMBED: EmbedGraph}


def context_embedding(model: ServableModel) -> nn.Module | None:
    """The model's ``context_embedding`` (None if it has none); TypeError if it is not a module."""
    embedding = getattr(model, "context_embedding", None)
    if embedding is not None and not isinstance(embedding, nn.Module):
        raise TypeError(f"context_embedding of {type(model).__name__} must be a torch.nn.Module or None, "
                        f"not {type(embedding).__name__}")
    return embedding


class EmbeddingApart(nn.Module):
    """``model`` with its context embedding served as a model apart.

    ``context_embedding`` is a copy of the model's ([B, C] -> [B, E], E is ``embedded_dim``);
    the directions are those of a copy of the model whose embedding is the identity, so they
    take the embedded context. Composed, they compute what the model computes.
    """

    def __init__(self, model: ServableModel):
        super().__init__()
        embedding = context_embedding(model)
        path = next((name for name, module in model.named_modules() if module is embedding and name), None)
        if embedding is None or path is None:
            raise ValueError(f"{type(model).__name__} has no context_embedding among its submodules")
        self.context_embedding = copy.deepcopy(embedding).eval()
        with torch.no_grad():
            embedded = self.context_embedding(torch.zeros(2, model.context_dim))
        if embedded.ndim != 2 or embedded.shape[0] != 2:
            raise ValueError(f"context_embedding maps contexts [B, {model.context_dim}] to {list(embedded.shape)} "
                             "for B = 2; it must give [B, E]")
        self.model = copy.deepcopy(model)
        parent, _, leaf = path.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, nn.Identity())
        self.event_shape, self.noise_dim = tuple(model.event_shape), model.noise_dim
        self.context_dim, self.embedded_dim = model.context_dim, int(embedded.shape[1])

    def log_prob(self, x, embedded=None):
        return self.model.log_prob(x, embedded)

    def sample_with_log_prob(self, z, embedded=None):
        return self.model.sample_with_log_prob(z, embedded)

    def encode(self, x, embedded=None):
        return self.model.encode(x, embedded)

    def prepare_for_export(self) -> EmbeddingApart:
        prepare = getattr(self.model, "prepare_for_export", None)
        if prepare is not None:
            self.model = prepare()
        return self.eval()


def served_directions(model: ServableModel, encode: bool = True) -> tuple[str, ...]:
    """The directions ``model`` is exported in: both always, and (unless not ``encode``)
    encode where the model has ``encode``."""
    return DIRECTIONS + ((ENCODE,) if encode and callable(getattr(model, "encode", None)) else ())


def model_spec(model: ServableModel, direction: str) -> DirectionSpec:
    """The serving contract of one direction (or the embed model) of ``model``."""
    return direction_spec(direction, math.prod(model.event_shape), noise_dim=model.noise_dim,
                          context_dim=model.context_dim, embedded_dim=getattr(model, "embedded_dim", 0))


def prepared_copy(model: ServableModel) -> nn.Module:
    """A copy of ``model`` ready to export: its ``prepare_for_export()`` if it has one (Glow
    precomputes its matrix inverses), in eval mode; ``model`` itself is left untouched."""
    prepared = copy.deepcopy(model)
    prepare = getattr(prepared, "prepare_for_export", None)
    return (prepare() if prepare is not None else prepared).eval()


def example_inputs(model: ServableModel, direction: str, rows: int = 4) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, *t.dims, generator=generator) for t in model_spec(model, direction).inputs)

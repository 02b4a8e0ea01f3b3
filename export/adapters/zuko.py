"""A ``zuko.flows.Flow`` as a servable model, with autoregressive inverses as loops.

Density: the flow's own ``log_prob``. Generation: the flow's transform inverted on base
noise, with ``log p(x) = log N(z) - log|det dx/dz|`` in the same pass. zuko inverts an
autoregressive transform with a Python loop of ``passes`` steps, which tracing unrolls into
``passes`` copies of the network; here each such transform is rebuilt, at call time, with
flowserve's loop (the same steps from the same start), which exports as one ONNX ``Loop``.
The user's flow is not modified.
"""

from __future__ import annotations

import functools
from typing import Any

import zuko
from torch import Tensor, nn
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.transforms import AutoregressiveTransform, ComposedTransform

from ..flows.transforms import fixed_point_loop


class LoopedAutoregressiveTransform(AutoregressiveTransform):
    """zuko's autoregressive transform whose inverse is :func:`fixed_point_loop`."""

    def _inverse(self, y: Tensor) -> Tensor:
        meta = self.meta
        return fixed_point_loop(lambda x, target: meta(x).inv(target), y, self.passes)


class ZukoFlow(nn.Module):
    """``flow`` (a ``zuko.flows.Flow`` over ``features`` values, with a context of
    ``context`` values or none) in flowserve's model protocol. ``embedding``, if given, maps
    the context ``[B, context]`` to what the flow was trained to take (an sbi or lampe
    embedding net); flowserve exports it apart, so a call embeds each distinct context once."""

    family = "zuko"
    export_formats = ("onnx",)
    """TorchScript traces would unroll the autoregressive inverse, so ONNX only."""

    def __init__(self, flow: zuko.flows.Flow, features: int, context: int = 0, embedding: nn.Module | None = None):
        super().__init__()
        if not isinstance(flow, zuko.flows.Flow):
            raise TypeError(f"expected a zuko.flows.Flow, got {type(flow).__name__}")
        base_loc = dict(flow.base.named_buffers()).get("loc")  # the base of zuko's MAF, NSF, RealNVP...
        if base_loc is not None and tuple(base_loc.shape[-1:]) != (int(features),):
            raise ValueError(f"the zuko flow is over {base_loc.shape[-1]} features, not {features}; "
                             "its data rows must have as many values")
        self.flow = flow
        self.event_shape = (int(features),)
        self.noise_dim = int(features)
        self.context_dim = int(context)
        if embedding is not None and not context:
            raise ValueError("an embedding needs the size of the context it embeds (context > 0)")
        self.context_embedding = embedding

    def _embed(self, context: Tensor | None) -> Tensor | None:
        return context if context is None or self.context_embedding is None else self.context_embedding(context)

    def _transform(self, context: Tensor | None) -> ComposedTransform:
        lazy = self.flow.transform
        layers = []
        for layer in getattr(lazy, "transforms", [lazy]):
            if isinstance(layer, MaskedAutoregressiveTransform):
                layers.append(LoopedAutoregressiveTransform(functools.partial(layer.meta, context), layer.passes))
            else:
                layers.append(layer(context))
        return ComposedTransform(*layers)

    def _base(self, context: Tensor | None):
        base = self.flow.base(context)
        return base if context is None else base.expand(context.shape[:-1])

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, log|det dz/dx|, log p(x))`` through the flow's transform."""
        context = self._embed(context)
        z, ladj = self._transform(context).call_and_ladj(x)
        return z, ladj, self._base(context).log_prob(z) + ladj

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.encode(x, context)[2]

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self._embed(context)
        x, ladj = self._transform(context).inv.call_and_ladj(z)
        return x, self._base(context).log_prob(z) - ladj

    def config(self) -> dict[str, Any]:
        """The library, the flow's class and its layers, for the metadata."""
        return {"library": f"zuko {zuko.__version__}", "class": type(self.flow).__name__,
                "transforms": [type(t).__name__ for t in getattr(self.flow.transform, "transforms", [])],
                **({} if self.context_embedding is None else
                   {"context_embedding": type(self.context_embedding).__name__})}

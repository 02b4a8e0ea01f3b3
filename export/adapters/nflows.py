"""An ``nflows.flows.Flow`` as a servable model, with autoregressive inverses as loops.

Supported layers: ``MaskedAffineAutoregressiveTransform`` (MAF),
``PiecewiseRationalQuadraticCouplingTransform`` (spline coupling, no tails or linear
tails, without an unconditional transform), permutations, ``LULinear``,
``PointwiseAffineTransform`` (sbi's z-scoring), and ``CompositeTransform``s of them, over a
``StandardNormal`` base: what sbi's ``maf`` and ``nsf`` estimators are made of. Any other
layer is refused by name.

The layers' own networks and parameters are used; what changes is how two computations
are written, so that they export:

- MAF's inverse is a loop and the spline picks its tails with ``torch.where``
  (:mod:`.nflows_layers`, shared with the normflows adapter);
- ``LULinear``'s inverse solves two triangular systems, which ONNX has no operator for: the
  exported graphs multiply by the inverse matrix, computed once when the export starts
  (:meth:`NflowsFlow.prepare_for_export`).

Eagerly the results equal nflows' own (a test compares them).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
from nflows.transforms.lu import LULinear
from nflows.transforms.permutations import Permutation
from nflows.transforms.standard import PointwiseAffineTransform
from torch import Tensor, nn

from .nflows_layers import autoregressive_inverse, coupling, refuse_unsupported_tails

SUPPORTED = (MaskedAffineAutoregressiveTransform, PiecewiseRationalQuadraticCouplingTransform, Permutation, LULinear,
             PointwiseAffineTransform)


def layers_of(transform) -> list[nn.Module]:
    """The transform's layers in data-to-noise order, composites flattened; raises
    ValueError naming the first layer that cannot be exported."""
    if isinstance(transform, CompositeTransform):
        return [layer for inner in transform._transforms for layer in layers_of(inner)]
    if not isinstance(transform, SUPPORTED):
        raise ValueError(f"nflows transform {type(transform).__name__} cannot be exported; supported: "
                         f"{', '.join(t.__name__ for t in SUPPORTED)} (and CompositeTransform of them)")
    if isinstance(transform, PiecewiseRationalQuadraticCouplingTransform):
        if transform.unconditional_transform is not None:
            raise ValueError("nflows PiecewiseRationalQuadraticCouplingTransform can be exported without an "
                             "unconditional transform")
        refuse_unsupported_tails(transform, "nflows")
    return [transform]


class NflowsFlow(nn.Module):
    """``flow`` (an ``nflows.flows.Flow``; with a context of ``context`` values, or none) in
    flowserve's model protocol."""

    family = "nflows"
    export_formats = ("onnx",)
    """TorchScript traces would unroll the autoregressive inverse, so ONNX only."""

    def __init__(self, flow: Flow, context: int = 0):
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"expected an nflows.flows.Flow, got {type(flow).__name__}")
        if type(flow._distribution) is not StandardNormal:
            raise ValueError(f"nflows base distribution {type(flow._distribution).__name__} cannot be exported; "
                             "use StandardNormal")
        self.flow = flow
        self.layers = layers_of(flow._transform)  # the flow's own modules, not copies
        (features,) = flow._distribution._shape
        self.event_shape = (int(features),)
        self.noise_dim = int(features)
        self.context_dim = int(context)
        self.lu_inverses: list[Tensor] | None = None
        """The inverse matrix of each ``LULinear`` layer, in layer order, once
        :meth:`prepare_for_export` has computed them; None: invert with nflows' solves."""

    def prepare_for_export(self) -> NflowsFlow:
        """This flow, with the inverse matrix of each ``LULinear`` computed (from its current
        weights) for the exported generation graph."""
        with torch.no_grad():
            self.lu_inverses = [layer.weight_inverse() for layer in self.layers if isinstance(layer, LULinear)]
        return self

    @property
    def context_embedding(self) -> nn.Module | None:
        """The flow's embedding net, which flowserve exports apart; None for nflows' default
        (the identity)."""
        net = self.flow._embedding_net
        return None if isinstance(net, nn.Identity) else net

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, log|det dz/dx|, log p(x))`` through the flow's layers."""
        context = self.flow._embedding_net(context)
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, logabsdet = _forward(layer, x, context)
            total = total + logabsdet
        return x, total, self.flow._distribution.log_prob(x, context) + total

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.encode(x, context)[2]

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        context = self.flow._embedding_net(context)
        x, total = z, z.new_zeros(z.shape[0])
        lu_inverses = None if self.lu_inverses is None else iter(reversed(self.lu_inverses))
        for layer in reversed(self.layers):
            if isinstance(layer, LULinear) and lu_inverses is not None:
                x, logabsdet = F.linear(x - layer.bias, next(lu_inverses)), -layer.logabsdet().expand(x.shape[0])
            else:
                x, logabsdet = _inverse(layer, x, context)
            total = total + logabsdet
        return x, self.flow._distribution.log_prob(z, context) - total

    def config(self) -> dict[str, Any]:
        """The library and the flow's layers, for the metadata."""
        return {"library": f"nflows {metadata.version('nflows')}", "class": type(self.flow).__name__,
                "transforms": [type(layer).__name__ for layer in self.layers],
                **({} if self.context_embedding is None else
                   {"context_embedding": type(self.context_embedding).__name__})}


def _forward(layer: nn.Module, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    if isinstance(layer, PiecewiseRationalQuadraticCouplingTransform):
        return coupling(layer, x, context, inverse=False)
    return layer(x, context)


def _inverse(layer: nn.Module, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    if isinstance(layer, PiecewiseRationalQuadraticCouplingTransform):
        return coupling(layer, y, context, inverse=True)
    if isinstance(layer, MaskedAffineAutoregressiveTransform):
        return autoregressive_inverse(layer.autoregressive_net, layer._elementwise_inverse, y, context)
    return layer.inverse(y, context)

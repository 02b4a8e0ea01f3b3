"""nflows' spline and autoregressive layers, computed so that they export.

normflows copied these layers from nflows (and sbi builds on nflows), with the same
attributes and parameterisation, so both adapters pass their layers here; this module
imports neither library and reads the layers by their attributes:

- an autoregressive layer's inverse is nflows' ``D`` passes from zeros, written as
  flowserve's loop (one ONNX ``Loop``) instead of a Python loop that tracing unrolls;
- the rational-quadratic spline computes every element and picks the tails with
  ``torch.where``, where nflows indexes with boolean masks and checks the domain with
  Python ``if``s, neither of which ``torch.export`` can capture.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flows.splines import rational_quadratic, unit_derivative, with_linear_tails
from ..flows.transforms import fixed_point_loop

Elementwise = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(inputs, params) -> (outputs, log|det| per row)``: one autoregressive layer's map
given its network's output."""


def autoregressive_inverse(net: nn.Module, elementwise_inverse: Elementwise, y: Tensor,
                           context: Tensor | None) -> tuple[Tensor, Tensor]:
    """nflows' ``D`` passes from zeros, as one loop; the log-det comes from a last pass, whose
    parameters equal those of nflows' last pass (a feature's depend only on earlier ones)."""
    x = fixed_point_loop(lambda x, target: elementwise_inverse(target, net(x, context))[0], y, y.shape[1])
    return elementwise_inverse(y, net(x, context))


def spline_limits(layer) -> dict[str, float]:
    """The layer's minimum bin width and height and minimum derivative."""
    return dict(min_width=layer.min_bin_width, min_height=layer.min_bin_height, min_derivative=layer.min_derivative)


def refuse_unsupported_tails(layer, library: str) -> None:
    """Raise ValueError unless the spline ``layer`` has no tails or linear ones, with one bound."""
    if layer.tails not in (None, "linear") or isinstance(layer.tail_bound, Tensor):
        raise ValueError(f"{library} {type(layer).__name__} can be exported with tails None or 'linear' and one "
                         f"tail bound (got tails {layer.tails!r})")


def spline(layer, net: nn.Module, inputs: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """nflows' spline of ``inputs`` ``[B, F]`` with a network's ``params`` ``[B, F, P]``:
    ``(outputs, log|det| per element)``. Bin widths and heights are scaled down by the square
    root of the network's hidden size, as nflows does."""
    bins = layer.num_bins
    widths, heights, derivatives = params[..., :bins], params[..., bins:2 * bins], params[..., 2 * bins:]
    scale = getattr(net, "hidden_features", None) or getattr(net, "hidden_channels", None)
    if scale:
        widths, heights = widths / math.sqrt(scale), heights / math.sqrt(scale)
    return spline_of(layer, inputs, widths, heights, derivatives, inverse)


def spline_of(layer, inputs: Tensor, widths: Tensor, heights: Tensor, derivatives: Tensor,
              inverse: bool) -> tuple[Tensor, Tensor]:
    """The spline of ``layer`` (its bins, limits, tails and bound) with these unnormalized
    widths, heights and derivatives."""
    if layer.tails is None:
        return rational_quadratic(inputs, widths, heights, derivatives, inverse, 0.0, 1.0, **spline_limits(layer))
    derivatives = F.pad(derivatives, (1, 1), value=unit_derivative(layer.min_derivative))
    return with_linear_tails(inputs, widths, heights, derivatives, inverse, layer.tail_bound, **spline_limits(layer))


def autoregressive_spline(layer, inputs: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
    """nflows' masked autoregressive spline: one pass of its MADE towards the noise, its
    passes as a loop the other way."""
    net = layer.autoregressive_net

    def elementwise(values: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        outputs, logabsdet = spline(layer, net, values, params.reshape(values.shape[0], values.shape[1], -1), inverse)
        return outputs, logabsdet.sum(dim=1)

    if inverse:
        return autoregressive_inverse(net, lambda y, params: elementwise(y, params, True), inputs, context)
    return elementwise(inputs, net(inputs, context), False)


Unconditional = Callable[[Tensor, bool], tuple[Tensor, Tensor]]
"""``(identity features, inverse) -> (outputs, log|det| per row)``: what a coupling layer
applies to the features it passes on."""


def coupling(layer, inputs: Tensor, context: Tensor | None, inverse: bool,
             unconditional: Unconditional | None = None) -> tuple[Tensor, Tensor]:
    """nflows' spline coupling: the identity features parameterise a spline of the others
    (before ``unconditional``, if given, maps them on its own; after its inverse)."""
    identity = inputs[:, layer.identity_features]
    logabsdet = inputs.new_zeros(inputs.shape[0])
    if unconditional is not None and inverse:
        identity, logabsdet = unconditional(identity, True)
    params = layer.transform_net(identity, context).reshape(inputs.shape[0], layer.num_transform_features, -1)
    transformed, spline_logabsdet = spline(layer, layer.transform_net, inputs[:, layer.transform_features], params,
                                           inverse)
    if unconditional is not None and not inverse:
        identity, logabsdet = unconditional(identity, False)
    order = inverse_permutation(torch.cat([layer.identity_features, layer.transform_features]))
    return torch.cat([identity, transformed], dim=1)[:, order], logabsdet + spline_logabsdet.sum(dim=1)


def inverse_permutation(permutation: Tensor) -> Tensor:
    """The permutation that undoes ``permutation``, by a scatter (an ``argsort`` of the
    layer's constant indices would export as a ``TopK`` that ONNX's constant folding skips,
    with a warning)."""
    positions = torch.arange(len(permutation), device=permutation.device)
    return torch.zeros_like(permutation).scatter(0, permutation, positions)

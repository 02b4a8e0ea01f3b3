"""Monotonic rational-quadratic splines (Durkan et al., 2019) and the transforms built on them.

A spline maps ``[-bound, bound]`` onto itself through ``K`` bins whose widths, heights and
inner knot derivatives come from a network; outside, it is the identity (linear tails),
with derivative 1 at both ends so the joins are smooth. Every element is computed and the
tails are picked with ``torch.where``, and the bin search is a comparison count, so the
same code runs eagerly, under ``torch.export`` (ONNX) and in TorchScript.

:func:`rational_quadratic` is the spline itself on ``[low, high]``; the nflows adapter uses
it with nflows' parameterisation. flowserve's own spline transforms read ``3K - 1`` values
per feature (:func:`spline_with_linear_tails`), offset so that a network whose last layer
is zero gives the identity.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import FixedPointInverse

MIN_BIN_WIDTH = MIN_BIN_HEIGHT = MIN_DERIVATIVE = 1e-3
SEARCH_EPS = 1e-6
"""The last bin edge is widened by this much in the bin search, so the right end falls in
the last bin (as nflows does)."""


def unit_derivative(min_derivative: float = MIN_DERIVATIVE) -> float:
    """The unnormalized derivative that gives derivative 1: the linear tails' slope, and (for
    flowserve's splines) an inner knot's slope when its network output is zero."""
    return math.log(math.exp(1 - min_derivative) - 1)


def knots(unnormalized: Tensor, low: float, high: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Bin edges from ``low`` to ``high`` (exactly) and bin sizes, each bin at least ``minimum``
    of the interval."""
    bins = unnormalized.shape[-1]
    sizes = minimum + (1 - minimum * bins) * F.softmax(unnormalized, dim=-1)
    edges = (high - low) * F.pad(torch.cumsum(sizes, dim=-1), [1, 0], value=0.0) + low
    edges = torch.cat([torch.full_like(edges[..., :1], low), edges[..., 1:-1], torch.full_like(edges[..., :1], high)],
                      dim=-1)
    return edges, edges[..., 1:] - edges[..., :-1]


def _at(values: Tensor, index: Tensor) -> Tensor:
    """``values[..., index]`` per element (``index`` has a trailing axis of 1)."""
    return values.gather(-1, index)[..., 0]


def rational_quadratic(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                       unnormalized_derivatives: Tensor, inverse: bool, low: float, high: float,
                       min_width: float = MIN_BIN_WIDTH, min_height: float = MIN_BIN_HEIGHT,
                       min_derivative: float = MIN_DERIVATIVE, search_eps: float = SEARCH_EPS) -> tuple[Tensor, Tensor]:
    """The spline on ``[low, high]``, elementwise: ``(outputs, log|d outputs / d inputs|)``.

    ``unnormalized_widths`` and ``unnormalized_heights`` are ``[..., K]`` (softmax),
    ``unnormalized_derivatives`` ``[..., K + 1]`` (softplus, at every knot). Outside
    ``[low, high]`` the end bins extrapolate (callers pick their tails), and no index is
    ever out of range.
    """
    cumwidths, widths = knots(unnormalized_widths, low, high, min_width)
    cumheights, heights = knots(unnormalized_heights, low, high, min_height)
    derivatives = min_derivative + F.softplus(unnormalized_derivatives)
    edges = cumheights if inverse else cumwidths
    edges = torch.cat([edges[..., :-1], edges[..., -1:] + search_eps], dim=-1)
    index = (torch.sum((inputs[..., None] >= edges).long(), dim=-1) - 1).clamp(0, edges.shape[-1] - 2)[..., None]

    input_cumwidths, input_widths = _at(cumwidths, index), _at(widths, index)
    input_cumheights, input_heights = _at(cumheights, index), _at(heights, index)
    input_delta = _at(heights / widths, index)
    input_derivatives, input_derivatives_next = _at(derivatives, index), _at(derivatives[..., 1:], index)
    slopes = input_derivatives + input_derivatives_next - 2 * input_delta
    if inverse:
        shifted = inputs - input_cumheights
        a = shifted * slopes + input_heights * (input_delta - input_derivatives)
        b = input_heights * input_derivatives - shifted * slopes
        c = -input_delta * shifted
        theta = (2 * c) / (-b - torch.sqrt(b.pow(2) - 4 * a * c))
        outputs = theta * input_widths + input_cumwidths
    else:
        theta = (inputs - input_cumwidths) / input_widths
        outputs = inputs  # bound on both branches for TorchScript; set below
    theta_one_minus_theta = theta * (1 - theta)
    denominator = input_delta + slopes * theta_one_minus_theta
    if not inverse:
        numerator = input_heights * (input_delta * theta.pow(2) + input_derivatives * theta_one_minus_theta)
        outputs = input_cumheights + numerator / denominator
    derivative_numerator = input_delta.pow(2) * (input_derivatives_next * theta.pow(2)
                                                 + 2 * input_delta * theta_one_minus_theta
                                                 + input_derivatives * (1 - theta).pow(2))
    logabsdet = torch.log(derivative_numerator) - 2 * torch.log(denominator)
    return outputs, -logabsdet if inverse else logabsdet


def with_linear_tails(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                      unnormalized_derivatives: Tensor, inverse: bool, bound: float,
                      min_width: float = MIN_BIN_WIDTH, min_height: float = MIN_BIN_HEIGHT,
                      min_derivative: float = MIN_DERIVATIVE) -> tuple[Tensor, Tensor]:
    """:func:`rational_quadratic` on ``[-bound, bound]`` and the identity outside; the end
    derivatives must be :func:`unit_derivative` for the joins to be smooth."""
    inside = (inputs >= -bound) & (inputs <= bound)
    outputs, logabsdet = rational_quadratic(inputs.clamp(-bound, bound), unnormalized_widths, unnormalized_heights,
                                            unnormalized_derivatives, inverse, -bound, bound,
                                            min_width, min_height, min_derivative)
    return torch.where(inside, outputs, inputs), torch.where(inside, logabsdet, torch.zeros_like(logabsdet))


def spline_with_linear_tails(inputs: Tensor, params: Tensor, inverse: bool, bound: float) -> tuple[Tensor, Tensor]:
    """flowserve's spline, elementwise: ``params`` ``[..., 3K - 1]`` are each element's K bin
    widths, K heights and K - 1 inner knot derivatives (0 meaning slope 1); identity outside
    ``[-bound, bound]``."""
    bins = (params.shape[-1] + 1) // 3
    unit = unit_derivative()
    derivatives = F.pad(params[..., 2 * bins:] + unit, [1, 1], value=unit)
    return with_linear_tails(inputs, params[..., :bins], params[..., bins:2 * bins], derivatives, inverse, bound)


def per_feature(params: Tensor, features: int) -> Tensor:
    """A network's output ``[B, P * features]``, P blocks of ``features`` values (MADE's
    layout), as ``[B, features, P]``."""
    return params.reshape(params.shape[0], -1, features).transpose(1, 2)


class SplineCoupling(nn.Module):
    """Coupling layer with a spline per transformed feature (Durkan et al.'s RQ-NSF (C)).

    Features where ``mask == 1`` pass unchanged and condition the others through
    ``conditioner(x * mask, context)``, which returns ``3K - 1`` blocks of ``D`` values.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, bound: float):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.conditioner = conditioner
        self.bound = bound

    def _spline(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        params = per_feature(self.conditioner(x * self.mask, context), x.shape[1])
        outputs, logabsdet = spline_with_linear_tails(x, params, inverse, self.bound)
        kept = self.mask.bool()
        return torch.where(kept, x, outputs), torch.where(kept, torch.zeros_like(logabsdet), logabsdet).sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._spline(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._spline(z, context, inverse=True)


class SplineFixedPointInverse(FixedPointInverse):
    """The inverse of an autoregressive spline transform, ``z_i = s_i(x_i; params(x_<i))``:
    :class:`FixedPointInverse`'s loop, with the spline's inverse as its step."""

    cacheable = False  # the cached inverse is for affine layers

    def __init__(self, net: nn.Module, bound: float):
        super().__init__(net)
        self.bound = bound

    def _spline(self, values: Tensor, x: Tensor, context: Optional[Tensor], inverse: bool) -> tuple[Tensor, Tensor]:
        """The spline (or its inverse) of ``values`` with the parameters that ``x`` gives."""
        params = per_feature(self.net(x, context), x.shape[1])
        return spline_with_linear_tails(values, params, inverse, self.bound)

    def _step(self, z: Tensor, x: Tensor, context: Optional[Tensor]) -> Tensor:
        return self._spline(z, x, context, True)[0]

    def _log_det(self, z: Tensor, x: Tensor, context: Optional[Tensor]) -> Tensor:
        return self._spline(z, x, context, True)[1].sum(1)


class AutoregressiveSpline(nn.Module):
    """Masked autoregressive spline transform (Durkan et al.'s RQ-NSF (AR)): ``net`` (a
    MADE with ``3K - 1`` outputs per feature) gives each feature's spline from the features
    before it. ``forward`` (x -> z) is one pass; ``inverse`` is the sequential loop."""

    def __init__(self, net: nn.Module, bound: float):
        super().__init__()
        self.sequential_inverse = SplineFixedPointInverse(net, bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, logabsdet = self.sequential_inverse._spline(x, x, context, False)
        return outputs, logabsdet.sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.sequential_inverse(z, context)

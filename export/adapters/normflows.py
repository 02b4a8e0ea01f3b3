"""A normflows ``NormalizingFlow`` or ``ConditionalNormalizingFlow`` as a servable model.

normflows' layers map the base space to the data (``forward``, z -> x) and back
(``inverse``, x -> z, what its ``log_prob`` runs). Supported layers: affine couplings
(``AffineCouplingBlock``, ``AffineCoupling`` between ``Split`` and ``Merge``,
``MaskedAffineFlow``), ``GlowBlock`` (coupling, ``Invertible1x1Conv``, ``ActNorm``),
``MaskedAffineAutoregressive`` (MAF), ``CoupledRationalQuadraticSpline`` and
``AutoregressiveRationalQuadraticSpline``, ``AffineConstFlow``, ``Permute``,
``InvertibleAffine``, ``LULinearPermute``, ``Squeeze`` and ``Composite``s of them, over a
``DiagGaussian`` or ``ConditionalDiagGaussian`` base. Any other layer is refused by name.

flowserve draws standard normal noise; the base Gaussian's location and scale are the first
step of generation and the last of encoding, as normflows applies them. The layers' own
networks and parameters are used; what changes is how some computations are written:

- MAF's density direction and the autoregressive spline's sampling direction are nflows'
  ``D`` passes (normflows copied those layers), as a loop, and the splines pick their tails
  with ``torch.where`` (:mod:`.nflows_layers`);
- ONNX has no matrix inverse or determinant: the matrices of ``Invertible1x1Conv``,
  ``InvertibleAffine`` and ``LULinearPermute``, their inverses and log-determinants are
  computed once when the export starts (:meth:`NormflowsFlow.prepare_for_export`);
- ``ActNorm`` initialises itself from the first batch it sees, a branch on a buffer's value
  that does not export: the exported graphs apply the affine map it holds, and the export
  refuses an ``ActNorm`` that was never initialised (a flow that has not seen data);
- ``Split`` and ``Merge`` in checkerboard modes gather with a fixed index where normflows
  calls ``torch.nonzero``, and ``Permute`` is written without the ``len`` of the batch that
  would pin it to the example's size.

The other layers run normflows' own code (``ActNorm`` too, eagerly, so a flow trained
through this adapter initialises it as normflows does), and tests compare every supported
layer's results with normflows' own.
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from normflows.core import ConditionalNormalizingFlow, NormalizingFlow
from normflows.distributions.base import ConditionalDiagGaussian, DiagGaussian
from normflows.flows import (
    ActNorm,
    AffineConstFlow,
    AffineCoupling,
    AffineCouplingBlock,
    AutoregressiveRationalQuadraticSpline,
    Composite,
    CoupledRationalQuadraticSpline,
    GlowBlock,
    Invertible1x1Conv,
    InvertibleAffine,
    LULinearPermute,
    MaskedAffineAutoregressive,
    MaskedAffineFlow,
    Merge,
    Permute,
    Split,
    Squeeze,
)
from torch import Tensor, nn

from ..flows.base import standard_normal_log_prob
from .nflows_layers import (
    autoregressive_inverse,
    autoregressive_spline,
    coupling,
    inverse_permutation,
    refuse_unsupported_tails,
    spline_of,
)

CONTAINERS = (GlowBlock, AffineCouplingBlock, Composite)
"""Layers made of layers, flattened into theirs."""
AS_THEY_ARE = (AffineCoupling, MaskedAffineFlow, AffineConstFlow, Squeeze)
"""Layers whose own code exports (``ActNorm``, an ``AffineConstFlow``, is run without its
initialisation branch)."""
MATRICES = (Invertible1x1Conv, InvertibleAffine, LULinearPermute)
SUPPORTED = (*AS_THEY_ARE, *MATRICES, Permute, Split, MaskedAffineAutoregressive, CoupledRationalQuadraticSpline,
             AutoregressiveRationalQuadraticSpline)
TAKE_CONTEXT = (InvertibleAffine, LULinearPermute, MaskedAffineAutoregressive, CoupledRationalQuadraticSpline,
                AutoregressiveRationalQuadraticSpline)
"""The supported layers whose methods take the context (normflows' conditional layers)."""


def layers_of(flow: nn.Module) -> list[nn.Module]:
    """The layer ``flow`` and the layers inside it, in base-to-data order, containers
    flattened; raises ValueError naming the first layer that cannot be exported."""
    if isinstance(flow, CONTAINERS):
        return [layer for inner in getattr(flow, "flows", getattr(flow, "_flows", None)) for layer in layers_of(inner)]
    if not isinstance(flow, SUPPORTED):
        names = sorted({t.__name__ for t in SUPPORTED + CONTAINERS} | {"ActNorm", "Merge"})
        raise ValueError(f"normflows layer {type(flow).__name__} cannot be exported; supported: {', '.join(names)}")
    if isinstance(flow, Permute) and flow.mode not in ("shuffle", "swap"):
        raise ValueError(f"normflows Permute mode {flow.mode!r} cannot be exported; use 'shuffle' or 'swap'")
    if isinstance(flow, CoupledRationalQuadraticSpline):
        refuse_unsupported_tails(flow.prqct, "normflows")
    if isinstance(flow, AutoregressiveRationalQuadraticSpline):
        refuse_unsupported_tails(flow.mprqat, "normflows")
    return [flow]


class FrozenMatrix(nn.Module):
    """A linear layer's matrix towards the noise, its inverse and its log|det| per row
    (per pixel for a 1x1 convolution), computed from the layer's weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        with torch.no_grad():
            if isinstance(layer, LULinearPermute):
                lower, upper = layer.linear._create_lower_upper()
                identity = torch.eye(len(lower), dtype=lower.dtype)
                inverse = torch.linalg.solve_triangular(
                    upper, torch.linalg.solve_triangular(lower, identity, upper=False, unitriangular=True), upper=True)
                to_noise, to_data, log_det = lower @ upper, inverse, layer.linear.logabsdet()
            elif layer.use_lu:
                to_noise, to_data, log_det = layer._assemble_W(), layer._assemble_W(inverse=True), layer.log_S.sum()
            else:
                to_noise = layer.W
                to_data = torch.inverse(layer.W.double()).to(layer.W.dtype)
                log_det = torch.slogdet(layer.W)[1]
        self.register_buffer("to_noise", to_noise.detach().clone(), persistent=False)
        self.register_buffer("to_data", to_data.detach().clone(), persistent=False)
        self.register_buffer("log_det", log_det.detach().clone(), persistent=False)

    def transform(self, layer: nn.Module, values: Tensor, to_noise: bool) -> tuple[Tensor, Tensor]:
        """``layer`` applied with these matrices: ``(outputs, log|det| of that direction)``."""
        matrix, log_det = (self.to_noise, self.log_det) if to_noise else (self.to_data, -self.log_det)
        if isinstance(layer, Invertible1x1Conv):
            channels = len(matrix)
            return F.conv2d(values, matrix.view(channels, channels, 1, 1)), log_det * values.shape[2] * values.shape[3]
        if isinstance(layer, InvertibleAffine):
            return values @ matrix, log_det.expand(values.shape[0])
        permutation = layer.permutation._permutation
        if to_noise:
            return F.linear(values[:, permutation], matrix, layer.linear.bias), log_det.expand(values.shape[0])
        return F.linear(values - layer.linear.bias, matrix)[:, inverse_permutation(permutation)], log_det.expand(
            values.shape[0])


class NormflowsFlow(nn.Module):
    """``flow`` (a normflows ``NormalizingFlow``; a ``ConditionalNormalizingFlow`` with a
    context of ``context`` values) in flowserve's model protocol."""

    family = "normflows"
    export_formats = ("onnx",)
    """TorchScript traces would unroll the autoregressive passes, so ONNX only."""

    def __init__(self, flow: NormalizingFlow, context: int = 0):
        super().__init__()
        if not isinstance(flow, NormalizingFlow):
            raise TypeError(f"expected a normflows NormalizingFlow or ConditionalNormalizingFlow, got "
                            f"{type(flow).__name__}")
        conditional = isinstance(flow, ConditionalNormalizingFlow)
        if conditional != bool(context):
            raise ValueError(f"a normflows {type(flow).__name__} is served "
                             f"{'with a context' if conditional else 'without a context'}; the rows given have "
                             f"{'none' if not context else f'a context of {context} values'}")
        if type(flow.q0) not in (DiagGaussian, ConditionalDiagGaussian):
            raise ValueError(f"normflows base distribution {type(flow.q0).__name__} cannot be exported; use "
                             "DiagGaussian or ConditionalDiagGaussian")
        if getattr(flow.q0, "temperature", None) is not None:
            raise ValueError("the normflows DiagGaussian has a temperature: set q0.temperature = None to export the "
                             "flow's own density")
        self.flow = flow
        self.layers = [layer for top in flow.flows for layer in layers_of(top)]  # the flow's own modules
        self.base_shape = tuple(int(size) for size in flow.q0.shape)
        self.event_shape = _data_shape(self.base_shape, self.layers)
        self.noise_dim = math.prod(self.base_shape)
        self.context_dim = int(context)
        self.context_embedding = None
        self.frozen = nn.ModuleDict()
        """Keyed by layer position: the matrices of :data:`MATRICES` layers once
        :meth:`prepare_for_export` has computed them; empty: normflows computes them."""

    def prepare_for_export(self) -> NormflowsFlow:
        """This flow in eval mode, with the matrices of its linear layers computed (from
        their current weights) for the exported graphs."""
        if any(isinstance(layer, ActNorm) and not bool(layer.data_dep_init_done > 0) for layer in self.layers):
            raise ValueError("a normflows ActNorm was never initialised (it takes its scale from the first batch it "
                             "sees): train the flow, or load its trained weights, before exporting it")
        self.frozen = nn.ModuleDict({str(index): FrozenMatrix(layer) for index, layer in enumerate(self.layers)
                                     if isinstance(layer, MATRICES)})
        return self.eval()

    def _base(self, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The base Gaussian's location and log-scale, ``[1 or B, *base_shape]``."""
        if isinstance(self.flow.q0, ConditionalDiagGaussian):
            encoded = self.flow.q0.context_encoder(context)
            half = encoded.shape[-1] // 2
            return encoded[..., :half].reshape(-1, *self.base_shape), encoded[..., half:].reshape(-1, *self.base_shape)
        return self.flow.q0.loc, self.flow.q0.log_scale

    def _layer(self, index: int, layer: nn.Module, values, context: Tensor | None, to_noise: bool):
        """One layer towards the noise (normflows' ``inverse``) or the data (its ``forward``)."""
        if str(index) in self.frozen:
            return self.frozen[str(index)].transform(layer, values, to_noise)
        if isinstance(layer, ActNorm) and torch.compiler.is_compiling():  # eagerly normflows' own, which initialises
            return (AffineConstFlow.inverse if to_noise else AffineConstFlow.forward)(layer, values)
        if isinstance(layer, Permute):
            return _permute(layer, values, to_noise)
        if isinstance(layer, Split):  # Merge is a Split the other way round
            return _split(layer, values, split=to_noise == isinstance(layer, Merge))
        if isinstance(layer, MaskedAffineAutoregressive) and to_noise:
            return autoregressive_inverse(layer.autoregressive_net, layer._elementwise_inverse, values, context)
        if isinstance(layer, CoupledRationalQuadraticSpline):
            return coupling(layer.prqct, values, context, not to_noise, _unconditional_spline(layer.prqct))
        if isinstance(layer, AutoregressiveRationalQuadraticSpline):
            return autoregressive_spline(layer.mprqat, values, context, not to_noise)
        method = layer.inverse if to_noise else layer.forward
        return method(values, context) if isinstance(layer, TAKE_CONTEXT) else method(values)

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, log|det dz/dx|, log p(x))``: normflows' layers towards the base, then its
        Gaussian standardised to the noise ``z``."""
        total = x.new_zeros(x.shape[0])
        for index in reversed(range(len(self.layers))):
            x, log_det = self._layer(index, self.layers[index], x, context, to_noise=True)
            total = total + log_det
        loc, log_scale = self._base(context)
        z = ((x - loc) / torch.exp(log_scale)).reshape(x.shape[0], -1)
        log_det = total - log_scale.reshape(log_scale.shape[0], -1).sum(dim=1)
        return z, log_det, standard_normal_log_prob(z) + log_det

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.encode(x, context)[2]

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """normflows' ``sample`` from the base noise ``z``: its Gaussian, then its layers."""
        loc, log_scale = self._base(context)
        noise = z.reshape(z.shape[0], *self.base_shape)
        x = loc + torch.exp(log_scale) * noise
        log_prob = standard_normal_log_prob(z) - log_scale.reshape(log_scale.shape[0], -1).sum(dim=1)
        for index, layer in enumerate(self.layers):
            x, log_det = self._layer(index, layer, x, context, to_noise=False)
            log_prob = log_prob - log_det
        return x, log_prob

    def config(self) -> dict[str, Any]:
        """The library, the flow's class, base and layers, for the metadata."""
        return {"library": f"normflows {metadata.version('normflows')}", "class": type(self.flow).__name__,
                "base": type(self.flow.q0).__name__, "transforms": [type(layer).__name__ for layer in self.layers]}


def _data_shape(base_shape: tuple[int, ...], layers: list[nn.Module]) -> tuple[int, ...]:
    """The shape of a data row: the base's, unless a ``Squeeze`` (towards the data: a quarter
    of the channels, twice the height and width) changes it."""
    shape = base_shape
    for layer in layers:
        if isinstance(layer, Squeeze):
            channels, height, width = shape
            shape = (channels // 4, 2 * height, 2 * width)
    return shape


def _unconditional_spline(layer):
    """The elementwise spline normflows' coupling applies to the features it passes on
    (``apply_unconditional_transform``), or None."""
    cdf = layer.unconditional_transform
    if cdf is None:
        return None

    def apply(values: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        shared = [p.expand(values.shape[0], *p.shape) for p in
                  (cdf.unnormalized_widths, cdf.unnormalized_heights, cdf.unnormalized_derivatives)]
        outputs, logabsdet = spline_of(cdf, values, *shared, inverse)
        return outputs, logabsdet.sum(dim=1)

    return apply


def _permute(layer: Permute, values: Tensor, to_noise: bool) -> tuple[Tensor, Tensor]:
    """normflows' ``Permute`` of the channels (whose own code takes ``len`` of the batch,
    which pins it to the example's size in an export)."""
    if layer.mode == "shuffle":
        permuted = values[:, layer.inv_perm if to_noise else layer.perm, ...]
    else:
        half = (layer.num_channels + 1) // 2 if to_noise else layer.num_channels // 2
        permuted = torch.cat([values[:, half:, ...], values[:, :half, ...]], dim=1)
    return permuted, values.new_zeros(values.shape[0])


def _split(layer: Split, values, split: bool):
    """normflows' ``Split`` (``split``: one tensor into two) or its inverse, in every mode."""
    if layer.mode in ("channel", "channel_inv"):
        return Split.forward(layer, values) if split else Split.inverse(layer, values)
    shape = tuple(values.shape[1:]) if split else (*values[0].shape[1:-1], 2 * values[0].shape[-1])
    first, second = _checkerboard(shape, "inv" in layer.mode)
    if split:
        flat = values.reshape(values.shape[0], -1)
        halves = [flat[:, torch.from_numpy(part)].reshape(-1, *shape[:-1], shape[-1] // 2) for part in (first, second)]
        return halves, 0
    flat = torch.cat([half.reshape(half.shape[0], -1) for half in values], dim=1)
    order = torch.from_numpy(np.argsort(np.concatenate([first, second])))
    return flat[:, order].reshape(-1, *shape), 0


def _checkerboard(shape: tuple[int, ...], inverted: bool) -> tuple[np.ndarray, np.ndarray]:
    """The flat positions of normflows' checkerboard's two colours in a row of ``shape``: the
    first (``z1``) where the indices sum to an odd number (even, ``inverted``)."""
    parity = np.indices(shape).sum(axis=0).reshape(-1) % 2
    first = parity == (0 if inverted else 1)
    return np.flatnonzero(first), np.flatnonzero(~first)

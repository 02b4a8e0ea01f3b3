"""Bijective transforms with log-determinants, the building blocks of every flow.

A transform maps data ``x`` to latent ``z`` with ``forward`` and back with ``inverse``;
both return the output and ``log|det J|`` of the map they computed, one value per row,
and both take an optional ``context`` [B, C] that they hand to their networks.

Tensors are ``[B, D]`` for vectors or ``[B, C, H, W]`` for images; axis 1 is the
feature (channel) axis. Couplings and autoregressive transforms are given their networks
(``nets.py``); the only parameters a transform owns are the elementwise or per-channel
ones of the papers (NICE's scaling, Glow's actnorm and 1x1 convolution).

Every operation exports to ONNX with a dynamic batch. The one sequential computation,
inverting an autoregressive transform, is a loop: a ``while_loop`` when exported to
ONNX, a scripted ``for`` loop in TorchScript, a plain loop in eager PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch._higher_order_ops import while_loop


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Squash ``x`` smoothly into ``(-bound, bound)``; close to the identity near zero."""
    return bound * torch.tanh(x / bound)


def sum_per_row(x: Tensor) -> Tensor:
    """Sum over every axis but the batch axis: ``[B, ...] -> [B]``."""
    return x.flatten(1).sum(1)


def zeros_per_row(x: Tensor) -> Tensor:
    """Zeros shaped ``[B]`` like the batch of ``x``."""
    return torch.zeros_like(x.flatten(1)[:, 0])


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    """``values`` [C] shaped to broadcast along axis 1 of ``like``."""
    return values.view(1, -1, *([1] * (like.dim() - 2)))


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


class ElementwiseAffine:
    """``z = x * exp(log_scale) + shift``, elementwise, with parameters given per element."""

    def __init__(self, shift: Tensor, log_scale: Tensor):
        self.shift = shift
        self.log_scale = log_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale) + self.shift, sum_per_row(self.log_scale)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return (z - self.shift) * torch.exp(-self.log_scale), -sum_per_row(self.log_scale)


class Coupling(nn.Module):
    """Coupling layer: affine (Real NVP, Glow) or additive (NICE).

    Where ``mask == 1`` features pass unchanged and condition the rest through
    ``conditioner(x * mask, context)``, which returns ``2C`` channels along axis 1,
    read as ``(shift, raw_log_scale)``, or ``C`` shift channels when ``affine`` is False.
    The log-scale is soft-clamped to ``(-log_scale_bound, log_scale_bound)``. ``mask``
    has the event's shape (``[D]`` or ``[C, H, W]``).
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, affine: bool = True, log_scale_bound: float = 3.0):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.conditioner = conditioner
        self.affine = affine
        self.log_scale_bound = log_scale_bound

    def _elementwise(self, kept: Tensor, context: Tensor | None) -> ElementwiseAffine:
        params = self.conditioner(kept * self.mask, context)
        transformed = 1.0 - self.mask
        if not self.affine:
            return ElementwiseAffine(params * transformed, torch.zeros_like(params))
        shift, raw_log_scale = params.chunk(2, dim=1)
        log_scale = soft_clamp(raw_log_scale, self.log_scale_bound) * transformed
        return ElementwiseAffine(shift * transformed, log_scale)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._elementwise(x, context).forward(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._elementwise(z, context).inverse(z)


def alternating_mask(shape: Sequence[int], parity: int) -> Tensor:
    """Checkerboard over the last axes: ``[D]`` alternates features, ``[C, H, W]`` pixels."""
    if len(shape) == 1:
        return (torch.arange(shape[0]) % 2 == parity).float()
    channels, height, width = shape
    board = (torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2 == parity
    return board.float().expand(channels, height, width).clone()


def channel_mask(shape: Sequence[int], parity: int) -> Tensor:
    """Keep the first half of the channels (``parity`` 0) or the second half (1)."""
    channels = shape[0]
    kept = (torch.arange(channels) < channels // 2) if parity == 0 else (torch.arange(channels) >= channels // 2)
    return kept.float().view(channels, *([1] * (len(shape) - 1))).expand(*shape).clone()


class DiagonalScaling(nn.Module):
    """``z = x * exp(log_scale)`` with a learned log-scale per feature (NICE's last layer)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale), self.log_scale.sum() + zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.log_scale), -self.log_scale.sum() + zeros_per_row(z)


class ActNorm(nn.Module):
    """Per-channel affine map ``z = (x + bias) * exp(log_scale)`` (Glow).

    The first forward pass in training mode sets bias and scale from the batch, so the
    outputs have zero mean and unit variance per channel (data-dependent init).
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.log_scale = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        per_channel = x.transpose(0, 1).flatten(1)
        self.bias.copy_(-per_channel.mean(1))
        self.log_scale.copy_(-torch.log(per_channel.std(1) + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        z = (x + _per_channel(self.bias, x)) * torch.exp(_per_channel(self.log_scale, x))
        return z, self.log_scale.sum() * _spatial_size(x) + zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(-_per_channel(self.log_scale, z)) - _per_channel(self.bias, z)
        return x, -self.log_scale.sum() * _spatial_size(z) + zeros_per_row(z)


class InvertibleLinearLU(nn.Module):
    """Invertible linear map over axis 1 in the LU parametrisation (Glow's 1x1 convolution).

    ``W = P L (U + diag(sign * exp(log_diag)))`` with ``P`` a fixed permutation, ``L``
    unit lower- and ``U`` strictly upper-triangular. The log-det is ``sum(log_diag)`` per
    position. :meth:`freeze` stores ``W``, ``W^-1`` and the log-det as buffers, which is
    what the exported graphs compute with: ONNX has no matrix inverse.
    """

    def __init__(self, num_features: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(num_features, num_features, generator=generator))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_features, num_features), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_diag = nn.Parameter(torch.log(diagonal.abs()))
        self.frozen = False

    def weight(self) -> Tensor:
        """The current matrix ``W``."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_diag))
        return self.permutation @ lower @ upper

    @torch.no_grad()
    def freeze(self) -> None:
        """Precompute ``W``, ``W^-1`` and the log-det as buffers (for export and inference)."""
        weight = self.weight()
        self.register_buffer("frozen_weight", weight.clone(), persistent=False)
        self.register_buffer("frozen_inverse", torch.linalg.inv(weight.double()).to(weight.dtype), persistent=False)
        self.register_buffer("frozen_log_det", self.log_diag.sum().clone(), persistent=False)
        self.frozen = True

    def _apply_matrix(self, matrix: Tensor, x: Tensor) -> Tensor:
        return (x.movedim(1, -1) @ matrix.T).movedim(-1, 1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        weight = self.frozen_weight if self.frozen else self.weight()
        log_det = self.frozen_log_det if self.frozen else self.log_diag.sum()
        return self._apply_matrix(weight, x), log_det * _spatial_size(x) + zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        inverse = self.frozen_inverse if self.frozen else torch.linalg.inv(self.weight())
        log_det = self.frozen_log_det if self.frozen else self.log_diag.sum()
        return self._apply_matrix(inverse, z), -log_det * _spatial_size(z) + zeros_per_row(z)


class Permutation(nn.Module):
    """Reorders the features of a vector ``[B, D]``; volume-preserving."""

    def __init__(self, order: Tensor):
        super().__init__()
        self.register_buffer("order", order.long())
        self.register_buffer("inverse_order", torch.argsort(order).long())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.order], zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[:, self.inverse_order], zeros_per_row(z)


class Squeeze(nn.Module):
    """Space to depth: ``[B, C, H, W] -> [B, 4C, H/2, W/2]`` (Real NVP's multi-scale step)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _, channels, height, width = x.shape
        x = x.reshape(-1, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(-1, channels * 4, height // 2, width // 2), zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _, channels, height, width = z.shape
        z = z.reshape(-1, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(-1, channels // 4, height * 2, width * 2), zeros_per_row(z)


class Flatten(nn.Module):
    """``[B, *shape] -> [B, prod(shape)]`` and back; volume-preserving."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.flatten(1), zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z.reshape(-1, *self.shape), zeros_per_row(z)


class FactorOut(nn.Module):
    """Multi-scale split: ``inner`` transforms the first half of the channels further,
    the other half leaves the flow here and is modelled by the base distribution.

    Input ``[B, C, H, W]`` of ``shape``; output flat ``[B, C*H*W]``: ``inner``'s (flat)
    output, then the factored-out half.
    """

    def __init__(self, inner: nn.Module, shape: Sequence[int]):
        super().__init__()
        channels, height, width = shape
        self.inner = inner
        self.kept_channels = channels // 2
        self.factored_shape = (channels - self.kept_channels, height, width)
        self.kept_size = self.kept_channels * height * width

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, factored = x[:, : self.kept_channels], x[:, self.kept_channels :]
        z, ladj = self.inner(kept, context)
        return torch.cat([z, factored.flatten(1)], dim=1), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kept, ladj = self.inner.inverse(z[:, : self.kept_size], context)
        factored = z[:, self.kept_size :].reshape(-1, *self.factored_shape)
        return torch.cat([kept, factored], dim=1), ladj


class Standardize(nn.Module):
    """``z = (x - mean) / std`` with statistics of the training data, stored as buffers."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.mean) / self.std, -torch.log(self.std).sum() + zeros_per_row(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * self.std + self.mean, torch.log(self.std).sum() + zeros_per_row(z)


class PixelLogit(nn.Module):
    """Dequantized pixels in ``[0, levels]`` to logit space (Real NVP's preprocessing).

    ``p = alpha + (1 - 2 alpha) x / levels``, ``z = log p - log(1 - p)``. Densities are
    in pixel units, so a pixel bin has width 1 and ``-log p(x) / (D ln 2)`` is bits/dim.
    """

    def __init__(self, levels: int, alpha: float = 0.05):
        super().__init__()
        self.levels = levels
        self.alpha = alpha
        self.log_slope = math.log((1.0 - 2.0 * alpha) / levels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x / self.levels
        z = torch.log(p) - torch.log1p(-p)
        return z, sum_per_row(self.log_slope - torch.log(p) - torch.log1p(-p))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (torch.sigmoid(z) - self.alpha) / (1.0 - 2.0 * self.alpha) * self.levels
        # log p + log(1 - p) for p = sigmoid(z), written with exp(-|z|) only: ONNX Runtime's
        # Sigmoid is accurate in absolute terms, so log(sigmoid(z)) loses digits where p is tiny.
        log_p_q = -z.abs() - 2.0 * torch.log1p(torch.exp(-z.abs()))
        return x, sum_per_row(log_p_q - self.log_slope)


def fixed_point_loop(step: Callable[[Tensor, Tensor], Tensor], target: Tensor, passes: int,
                     early_exit: bool = True) -> Tensor:
    """``x <- step(x, target)`` from zeros shaped like ``target`` (the inversion of an
    autoregressive map onto ``target``), until a step changes nothing (unless not
    ``early_exit``) or after ``passes`` steps.

    Feature ``i`` of ``step(x)`` depends only on features before ``i``, so the map has one
    fixed point, the ``passes``-step result: stopping when a step returns its input bit for
    bit (Jacobi iteration with early exit) gives exactly that result, often in far fewer
    steps. A plain loop in eager PyTorch; one ``while_loop`` (an ONNX ``Loop`` whose
    condition carries the early exit) while being exported, where a Python loop would be
    unrolled. There ``target`` is cloned first: the loop body may not capture the output of
    an earlier ``while_loop`` (zuko's spline inverse then fails to export), and a stacked
    flow's target is exactly that.
    """
    if torch.compiler.is_compiling():
        target = target.clone()

        def unfinished(index, x, changed):
            return (index < passes) & changed

        def body(index, x, changed):
            stepped = step(x, target)
            return index + 1, stepped, torch.any(stepped != x) | (not early_exit)

        start = (torch.zeros((), dtype=torch.int64), torch.zeros_like(target), torch.ones((), dtype=torch.bool))
        return while_loop(unfinished, body, start)[1]
    x = torch.zeros_like(target)
    for _ in range(passes):
        stepped = step(x, target)
        if early_exit and torch.equal(stepped, x):
            break
        x = stepped
    return x


class FixedPointInverse(nn.Module):
    """Inverts the autoregressive map ``z = (x - shift(x)) * exp(-log_scale(x))``.

    ``net(x, context)`` returns ``2D`` values, read as ``(shift, raw_log_scale)``, where
    feature ``i`` depends only on features before ``i`` in the network's order (a MADE).
    Iterating ``x <- z * exp(log_scale(x)) + shift(x)`` from ``x = 0`` makes one more
    feature exact per step, so ``D`` steps invert exactly: one network pass per step, and
    the loop stays a loop in both export formats. The loop stops early once a step changes
    nothing, with the same result bit for bit (see :func:`fixed_point_loop`). Subclasses
    invert other elementwise maps by overriding :meth:`_step` and :meth:`_log_det`.
    """

    cacheable = True
    """Whether a ``CachedMADEInverse`` can stand in for the loop (affine layers only)."""

    def __init__(self, net: nn.Module, log_scale_bound: float = 3.0):
        super().__init__()
        self.net = net
        self.log_scale_bound = log_scale_bound
        self.early_exit = True  # False: always D steps (the reference the tests compare with)
        # Optional: a module with the same (x, log|det|) for batches of ``cached.min_batch``
        # rows or more (a ``CachedMADEInverse``: see autoregressive.use_cached_inverse).
        self.cached = None

    def params(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(shift, log_scale)`` of every feature given ``x``."""
        shift, raw_log_scale = self.net(x, context).chunk(2, dim=1)
        return shift, soft_clamp(raw_log_scale, self.log_scale_bound)

    def _step(self, z: Tensor, x: Tensor, context: Optional[Tensor]) -> Tensor:
        """One pass: the elementwise inverse of ``z`` with the parameters that ``x`` gives."""
        shift, log_scale = self.params(x, context)
        return z * torch.exp(log_scale) + shift

    def _log_det(self, z: Tensor, x: Tensor, context: Optional[Tensor]) -> Tensor:
        """``log|det dx/dz|`` at the inverse ``x`` of ``z``."""
        _, log_scale = self.params(x, context)
        return log_scale.sum(1)

    @torch.jit.unused
    def _outside_torchscript(self, z: Tensor, context: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        """While exporting to ONNX, the graph's inverse: one loop (a ``while_loop``), or with
        ``cached`` set, an ``If`` of the loop and ``cached``. Eagerly, ``cached`` for large
        enough batches, else None (the loop)."""
        use_cached = self.cached is not None and self.early_exit
        if not torch.compiler.is_compiling():
            return self.cached(z, context) if use_cached and z.shape[0] >= self.cached.min_batch else None

        def loop(z: Tensor) -> tuple[Tensor, Tensor]:
            x = fixed_point_loop(lambda x, target: self._step(target, x, context), z, z.shape[1], self.early_exit)
            return x, self._log_det(z, x, context)

        if not use_cached:
            return loop(z)
        cached = self.cached
        return torch.cond(z.shape[0] >= cached.min_batch, lambda z: cached(z, context), loop, (z,))

    def forward(self, z: Tensor, context: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``; ``passes_run`` then holds the steps the loop ran, if it ran
        eagerly. With ``cached`` set, batches of ``cached.min_batch`` rows or more go to it."""
        if not torch.jit.is_scripting():
            inverse = self._outside_torchscript(z, context)
            if inverse is not None:
                return inverse
        # Scripted as it stands (TorchScript has no closures): see fixed_point_loop.
        x = torch.zeros_like(z)
        passes = 0
        for _ in range(z.shape[1]):
            stepped = self._step(z, x, context)
            passes += 1
            if self.early_exit and torch.equal(stepped, x):
                break
            x = stepped
        if not torch.jit.is_scripting():
            self.passes_run = passes
        return x, self._log_det(z, x, context)


def fixed_point_inverses(module: nn.Module) -> list[FixedPointInverse]:
    """Every :class:`FixedPointInverse` below ``module``: its sequential inverses."""
    return [child for child in module.modules() if isinstance(child, FixedPointInverse)]


class AutoregressiveAffine(nn.Module):
    """Masked autoregressive affine transform (MAF's layer; IAF is its :class:`Inverse`).

    ``forward`` (x -> z) is one pass of the net; ``inverse`` (z -> x) is ``D``
    sequential passes (:class:`FixedPointInverse`).
    """

    def __init__(self, net: nn.Module, log_scale_bound: float = 3.0):
        super().__init__()
        self.sequential_inverse = FixedPointInverse(net, log_scale_bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.sequential_inverse.params(x, context)
        return (x - shift) * torch.exp(-log_scale), -log_scale.sum(1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.sequential_inverse(z, context)


class Inverse(nn.Module):
    """The inverse of a transform: its ``forward`` and ``inverse`` swapped."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, context)


class ComposedTransform(nn.Module):
    """Transforms applied in order (``forward``) or in reverse order (``inverse``)."""

    def __init__(self, transforms: Iterable[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = zeros_per_row(x)
        for transform in self.transforms:
            x, step_ladj = transform(x, context)
            ladj = ladj + step_ladj
        return x, ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = zeros_per_row(z)
        for transform in reversed(self.transforms):
            z, step_ladj = transform.inverse(z, context)
            ladj = ladj + step_ladj
        return z, ladj

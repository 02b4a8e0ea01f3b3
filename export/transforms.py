"""Bijective transforms with log-determinants, the building blocks of every flow.

A transform maps data ``x`` to latent ``z`` with ``forward`` and back with ``inverse``;
both return the output and ``log|det J|`` of the map they computed, one value per row.
Transforms hold no ``nn.Parameter`` of their own: a coupling is given its conditioner
network, and an elementwise transform is built from a network's outputs.

Every operation here is elementwise, a sum over the last axis or a call to a given
network, so a flow made of these transforms exports to ONNX with a dynamic batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor, nn


class Transform(Protocol):
    """A bijection ``x -> z`` that also reports ``log|det dz/dx|`` per row."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)`` with ``z`` shaped like ``x`` and the log-det shaped ``[B]``."""
        ...

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``, the exact inverse of :meth:`forward`."""
        ...


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Squash ``x`` smoothly into ``(-bound, bound)``; close to the identity near zero."""
    return bound * torch.tanh(x / bound)


class ElementwiseAffine:
    """``z = x * exp(log_scale) + shift``, elementwise, with parameters given per element.

    Built from a network's outputs for one batch; ``shift`` and ``log_scale`` broadcast
    against the input.
    """

    def __init__(self, shift: Tensor, log_scale: Tensor):
        self.shift = shift
        self.log_scale = log_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x * exp(log_scale) + shift, sum(log_scale))``."""
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum(-1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``((z - shift) * exp(-log_scale), -sum(log_scale))``."""
        return (z - self.shift) * torch.exp(-self.log_scale), -self.log_scale.sum(-1)


class AffineCoupling(nn.Module):
    """Affine coupling layer (Dinh et al., 2017).

    Features where ``mask == 1`` pass through unchanged and condition the rest:
    ``conditioner(x * mask)`` must return ``2 * D`` values, read as ``(shift, raw_log_scale)``.
    The log-scale is soft-clamped to ``(-log_scale_bound, log_scale_bound)``, and both are
    zeroed where ``mask == 1``, so those features map to themselves exactly. A conditioner
    whose last layer is zero makes the coupling the identity.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, log_scale_bound: float = 3.0):
        super().__init__()
        if mask.dim() != 1:
            raise ValueError(f"mask must be 1-D over the features, got shape {tuple(mask.shape)}")
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.conditioner = conditioner
        self.log_scale_bound = log_scale_bound

    def _affine(self, kept: Tensor) -> ElementwiseAffine:
        """The elementwise affine map of the transformed features, given the kept ones."""
        shift, raw_log_scale = self.conditioner(kept * self.mask).chunk(2, dim=-1)
        transformed = 1.0 - self.mask
        log_scale = soft_clamp(raw_log_scale, self.log_scale_bound) * transformed
        return ElementwiseAffine(shift * transformed, log_scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)``."""
        return self._affine(x).forward(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``; the kept features of ``z`` equal those of ``x``."""
        return self._affine(z).inverse(z)


class ComposedTransform(nn.Module):
    """Transforms applied in order (``forward``) or in reverse order (``inverse``).

    The log-determinants of the steps add up.
    """

    def __init__(self, transforms: Iterable[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det dz/dx|)`` of the whole chain."""
        ladj = torch.zeros_like(x[..., 0])
        for transform in self.transforms:
            x, step_ladj = transform(x)
            ladj = ladj + step_ladj
        return x, ladj

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` of the whole chain."""
        ladj = torch.zeros_like(z[..., 0])
        for transform in reversed(self.transforms):
            z, step_ladj = transform.inverse(z)
            ladj = ladj + step_ladj
        return z, ladj

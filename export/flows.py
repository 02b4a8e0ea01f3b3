"""Normalizing flows: a standard-normal base distribution pushed through a transform.

Each family is a :class:`Flow` subclass named after its paper, with a ``family`` name and
a ``config()`` of plain values; :func:`build_flow` rebuilds any registered family from
such a config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .nets import MLP
from .transforms import AffineCoupling, ComposedTransform

LOG_2PI = math.log(2.0 * math.pi)


class Flow(nn.Module):
    """A flow over ``dim`` features: ``z = T(x)`` with ``z ~ N(0, I)``.

    Subclasses set ``family``, build the transform ``T`` and implement :meth:`config`.
    Calling the module returns :meth:`log_prob`.
    """

    family: str = ""

    def __init__(self, dim: int, transform: nn.Module):
        super().__init__()
        self.dim = dim
        self.transform = transform

    def base_log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` per row."""
        return -0.5 * (z**2).sum(-1) - 0.5 * self.dim * LOG_2PI

    def to_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data to latent: ``(z, log|det dz/dx|)``, the log-det shaped ``[B]``."""
        return self.transform(x)

    def from_latent(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent to data: ``(x, log|det dx/dz|)``, the log-det shaped ``[B]``."""
        return self.transform.inverse(z)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of ``x`` [B, D], shaped ``[B]``."""
        z, ladj = self.to_latent(x)
        return self.base_log_prob(z) + ladj

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    def sample_with_log_prob(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Samples ``x`` pushed forward from base noise ``z`` [B, D], with their log-density.

        One pass through the inverse transform; deterministic given ``z``.
        """
        x, ladj = self.from_latent(z)
        return x, self.base_log_prob(z) - ladj

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``[n, D]``, drawing base noise with ``generator`` if given."""
        reference = next(self.parameters())
        z = torch.randn(
            n, self.dim, generator=generator, device=reference.device, dtype=reference.dtype
        )
        return self.from_latent(z)[0]

    def config(self) -> dict[str, Any]:
        """JSON-able description with ``family`` and ``dim``; ``build_flow`` rebuilds from it."""
        raise NotImplementedError


class RealNVP(Flow):
    """Real NVP (Dinh et al., 2017, "Density estimation using Real NVP").

    ``num_couplings`` affine couplings with alternating checkerboard masks over the
    features (``[1, 0]`` then ``[0, 1]`` for ``dim == 2``), each conditioned by an MLP
    with tanh hidden units. Bounded conditioner outputs keep the tails sane: on two moons
    tanh scored log p(4, 4) = -289 where ReLU gave -1.4e8, and held-out log-likelihood was
    better too (-0.43 against -0.51 after 1500 steps).
    """

    family = "realnvp"

    def __init__(
        self, dim: int, num_couplings: int = 8, hidden_features: Sequence[int] = (64, 64)
    ):
        if dim < 2:
            raise ValueError(f"RealNVP needs dim >= 2, got {dim}")
        if num_couplings < 1:
            raise ValueError(f"num_couplings must be >= 1, got {num_couplings}")
        hidden_features = tuple(int(width) for width in hidden_features)
        parity = torch.arange(dim) % 2
        couplings = [
            AffineCoupling(
                mask=parity == index % 2,
                conditioner=MLP(dim, 2 * dim, hidden_features, activation=nn.Tanh),
            )
            for index in range(num_couplings)
        ]
        super().__init__(dim, ComposedTransform(couplings))
        self.num_couplings = num_couplings
        self.hidden_features = hidden_features

    def config(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "dim": self.dim,
            "num_couplings": self.num_couplings,
            "hidden_features": list(self.hidden_features),
        }


FLOW_FAMILIES: dict[str, type[Flow]] = {cls.family: cls for cls in (RealNVP,)}


def build_flow(config: dict[str, Any]) -> Flow:
    """Build the flow that ``config`` (as returned by ``Flow.config()``) describes."""
    options = dict(config)
    family = options.pop("family", None)
    if family not in FLOW_FAMILIES:
        raise ValueError(
            f"unknown flow family {family!r}; known families: {sorted(FLOW_FAMILIES)}"
        )
    try:
        return FLOW_FAMILIES[family](**options)
    except TypeError as error:
        raise ValueError(f"invalid config for flow family {family!r}: {error}") from error

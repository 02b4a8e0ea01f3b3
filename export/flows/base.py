"""The base of every model: the two served directions, a plain config, and preprocessing.

Every model maps between data ``x`` [B, *event_shape] and base noise ``z`` [B, noise_dim]
drawn from N(0, I), optionally given a context [B, context_dim], and offers both served
directions: :meth:`DensityModel.log_prob` and :meth:`DensityModel.sample_with_log_prob`.
This is the model protocol that training, export and the quality report rely on. A
model's ``config()`` holds plain values; ``registry.build_flow`` rebuilds it from them.

Data preprocessing (standardisation, or dequantized pixels to logits) is the first
transform of a model, so the exported graphs take raw data and their densities are in
the data's own units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flowserve.contract.metadata import EXACT

from .nets import MLP
from .transforms import ComposedTransform, InvertibleLinearLU, PixelLogit, Standardize

LOG_2PI = math.log(2.0 * math.pi)


@runtime_checkable
class ServableModel(Protocol):
    """What flowserve needs of a model to export and serve both its directions, whoever
    built it: a ``torch.nn.Module`` with

    - ``event_shape``: the shape of one data row, e.g. ``(2,)`` or ``(1, 8, 8)``;
    - ``noise_dim``: base-noise values per generated row (``prod(event_shape)`` for a flow);
    - ``context_dim``: values in one row's context, 0 for a model without one;
    - ``log_prob(x, context=None)``: the log-density ``[B]`` of ``x`` ``[B, *event_shape]``;
    - ``sample_with_log_prob(z, context=None)``: samples ``[B, *event_shape]`` pushed forward
      from base noise ``z`` ``[B, noise_dim]`` ~ N(0, I), and their log-density, in one pass.

    Optional, read when present: ``encode(x, context=None)``, for a model with an exact
    data -> noise map: the noise ``z`` ``[B, noise_dim]`` of ``x``, ``log|det dz/dx|`` ``[B]``
    and ``log p(x)`` ``[B]``, in one pass (exported as the ``encode`` direction);
    ``context_embedding``, a submodule (or None) that the model's methods apply to the
    context first, ``[B, context_dim] -> [B, E]``, and nowhere else: the exporter serves it
    as a model apart, so that a call embeds each distinct context once, not once per row;
    ``family`` (a name shown by ListModels, default
    ``custom``), ``log_likelihood`` (``EXACT``, or ``LOWER_BOUND`` for a bound),
    ``support`` (``(low, high)`` that every data value must lie in), ``config()`` (a plain
    description, recorded as the architecture) and ``prepare_for_export()`` (precompute
    what the graphs need; returns the module in eval mode). :class:`DensityModel`, the base
    of flowserve's own families, has them all.
    """

    event_shape: tuple[int, ...]
    noise_dim: int
    context_dim: int

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor: ...

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]: ...


SERVABLE_MEMBERS = ("event_shape", "noise_dim", "context_dim", "log_prob", "sample_with_log_prob")
"""The required members of :class:`ServableModel`."""


def servable_problem(model: Any) -> str | None:
    """Why ``model`` is not a :class:`ServableModel` (naming missing members), or None if it is."""
    missing = [member for member in SERVABLE_MEMBERS if not hasattr(model, member)]
    if isinstance(model, nn.Module) and not missing:
        return None
    return (f"{type(model).__name__} is not a servable model: it needs to be a torch.nn.Module with "
            f"{', '.join(SERVABLE_MEMBERS)}{f' (missing: {missing})' if missing else ''}")


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per row of ``z`` [B, N]."""
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * LOG_2PI


def with_preprocessing(config: dict[str, Any], event_shape: Sequence[int], rest: list[nn.Module]) -> ComposedTransform:
    """The preprocessing that ``config`` describes, followed by the transforms ``rest``."""
    first = build_preprocessing(config, event_shape)
    return ComposedTransform(([first] if first is not None else []) + rest)


def build_preprocessing(config: dict[str, Any] | None, event_shape: Sequence[int]) -> nn.Module | None:
    """The data-side transform a preprocessing config describes (None for ``none``)."""
    kind = (config or {"kind": "none"}).get("kind")
    if kind == "none":
        return None
    if kind == "standardize":
        mean = torch.tensor(config["mean"], dtype=torch.float32).reshape(event_shape)
        std = torch.tensor(config["std"], dtype=torch.float32).reshape(event_shape)
        if not bool((std > 0).all()):
            raise ValueError("standardize needs every std > 0 (a constant feature cannot be modelled)")
        return Standardize(mean, std)
    if kind == "dequantize":
        return PixelLogit(int(config["levels"]), float(config.get("alpha", 0.05)))
    raise ValueError(f"unknown preprocessing kind {kind!r}; expected none, standardize or dequantize")


class DensityModel(nn.Module):
    """The base of flowserve's families: a :class:`ServableModel` with a plain config.

    Subclasses set ``family`` and ``log_likelihood`` (``EXACT`` or ``LOWER_BOUND`` of
    :mod:`flowserve.contract.metadata`),
    implement :meth:`log_prob`, :meth:`sample_with_log_prob` and :meth:`options`, and give
    their networks :func:`conditioning_features` context values, which their methods get
    from :meth:`embed_context`.

    ``context_embedding`` (``{"features": E, "hidden_features": [...]}``, or None) puts an
    MLP between the context and the networks: they see its ``E`` outputs.
    """

    family: str = ""
    log_likelihood: str = EXACT

    def __init__(self, event_shape: Sequence[int], context_dim: int = 0, preprocessing: dict | None = None,
                 context_embedding: dict | None = None):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if not self.event_shape or min(self.event_shape) < 1:
            raise ValueError(f"invalid event_shape {event_shape}")
        self.dim = math.prod(self.event_shape)
        self.context_dim = int(context_dim)
        self.preprocessing_config = dict(preprocessing or {"kind": "none"})
        self.context_embedding_config = _embedding_config(context_dim, context_embedding)
        self.context_embedding = None if self.context_embedding_config is None else MLP(
            self.context_dim, self.context_embedding_config["features"],
            self.context_embedding_config["hidden_features"], activation=nn.ReLU, zero_last=False)

    def embed_context(self, context: Tensor | None) -> Tensor | None:
        """The context as the networks see it: through ``context_embedding`` when there is one."""
        if context is None or self.context_embedding is None:
            return context
        return self.context_embedding(context)

    @property
    def noise_dim(self) -> int:
        """Base-noise values per generated row."""
        return self.dim

    @property
    def support(self) -> tuple[float, float] | None:
        """The range data values must lie in (``[0, levels]`` for pixels), or None for any."""
        if self.preprocessing_config["kind"] == "dequantize":
            return (0.0, float(self.preprocessing_config["levels"]))
        return None

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` [B, *event_shape] (or its lower bound), shaped ``[B]``."""
        raise NotImplementedError

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples [B, *event_shape] pushed forward from base noise ``z`` [B, noise_dim], and
        their log-density (the same quantity :meth:`log_prob` returns)."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, context)

    def training_loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """What maximum-likelihood training minimises: the mean negative log-density."""
        return -self.log_prob(x, context).mean()

    def sample(self, n: int, context: Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> Tensor:
        """``n`` samples, drawing base noise (scaled by ``temperature``) with ``generator``."""
        reference = next(self.parameters())
        z = torch.randn(n, self.noise_dim, generator=generator, device=reference.device, dtype=reference.dtype)
        return self.sample_with_log_prob(z * temperature, context)[0]

    def options(self) -> dict[str, Any]:
        """The family's own constructor arguments, as plain values."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description; ``registry.build_flow`` rebuilds the model from it."""
        config = {
            "family": self.family,
            "event_shape": list(self.event_shape),
            "context_dim": self.context_dim,
            "preprocessing": self.preprocessing_config,
            **self.options(),
        }
        if self.context_embedding_config is not None:
            config["context_embedding"] = self.context_embedding_config
        return config

    def prepare_for_export(self) -> DensityModel:
        """Precompute what the exported graphs need (Glow's matrix inverses); eval mode."""
        for module in self.modules():
            if isinstance(module, InvertibleLinearLU):
                module.freeze()
        return self.eval()


class Flow(DensityModel):
    """A normalizing flow: ``z = T(x)`` with ``z ~ N(0, I)`` and an exact density.

    ``T`` is the preprocessing followed by the family's ``body``, which must end with
    latents flattened to ``[B, D]``.
    """

    def __init__(self, event_shape, body: list[nn.Module], context_dim: int = 0, preprocessing: dict | None = None,
                 context_embedding: dict | None = None):
        super().__init__(event_shape, context_dim, preprocessing, context_embedding)
        self.transform = with_preprocessing(self.preprocessing_config, self.event_shape, body)

    def to_latent(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent: ``(z [B, D], log|det dz/dx|)``."""
        return self.transform(x, self.embed_context(context))

    def from_latent(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data: ``(x [B, *event_shape], log|det dx/dz|)``."""
        return self.transform.inverse(z, self.embed_context(context))

    def encode(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Data to noise: ``(z [B, D], log|det dz/dx| [B], log p(x) [B])``."""
        z, ladj = self.to_latent(x, context)
        return z, ladj, standard_normal_log_prob(z) + ladj

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.encode(x, context)[2]

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ladj = self.from_latent(z, context)
        return x, standard_normal_log_prob(z) - ladj


def widths(hidden_features: Sequence[int]) -> tuple[int, ...]:
    """Hidden layer widths as plain ints (configs hold them as lists)."""
    return tuple(int(width) for width in hidden_features)


def conditioning_features(context_dim: int, context_embedding: dict | None) -> int:
    """Context values a family's networks take: the embedding's ``features`` if it has one,
    else ``context_dim``."""
    config = _embedding_config(context_dim, context_embedding)
    return int(context_dim) if config is None else config["features"]


def _embedding_config(context_dim: int, context_embedding: dict | None) -> dict[str, Any] | None:
    """``context_embedding`` checked and as plain values (None for none)."""
    if context_embedding is None:
        return None
    features, hidden = context_embedding.get("features"), context_embedding.get("hidden_features", [256, 256])
    if not context_dim:
        raise ValueError("context_embedding is set but the model takes no context (context_dim is 0)")
    if (type(features) is not int or features < 1 or not isinstance(hidden, (list, tuple))
            or any(type(width) is not int or width < 1 for width in hidden)
            or set(context_embedding) - {"features", "hidden_features"}):
        raise ValueError("context_embedding must be {'features': E, 'hidden_features': [H, ...]} with positive "
                         f"integers, got {context_embedding!r}")
    return {"features": features, "hidden_features": list(hidden)}

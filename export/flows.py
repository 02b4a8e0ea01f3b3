"""Flow builders named after their papers, and a VAE whose prior is a flow.

Every model maps between data ``x`` [B, *event_shape] and base noise ``z`` [B, noise_dim]
drawn from N(0, I), optionally given a context [B, context_dim], and offers both served
directions: :meth:`DensityModel.log_prob` and :meth:`DensityModel.sample_with_log_prob`.
A model's ``config()`` holds plain values; :func:`build_flow` rebuilds it from them.

Data preprocessing (standardisation, or dequantized pixels to logits) is the first
transform of a model, so the exported graphs take raw data and their densities are in
the data's own units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .nets import MADE, MLP, ConvNet
from .transforms import (
    ActNorm,
    AutoregressiveAffine,
    ComposedTransform,
    Coupling,
    DiagonalScaling,
    FactorOut,
    Flatten,
    Inverse,
    InvertibleLinearLU,
    Permutation,
    PixelLogit,
    Squeeze,
    Standardize,
    alternating_mask,
    channel_mask,
)

LOG_2PI = math.log(2.0 * math.pi)
EXACT, LOWER_BOUND = "exact", "lower_bound"


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
    """What export and serving need of a model: both directions and a plain config.

    Subclasses set ``family`` and ``log_likelihood`` (``"exact"`` or ``"lower_bound"``),
    implement :meth:`log_prob`, :meth:`sample_with_log_prob` and :meth:`options`.
    """

    family: str = ""
    log_likelihood: str = EXACT

    def __init__(self, event_shape: Sequence[int], context_dim: int = 0, preprocessing: dict | None = None):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        if not self.event_shape or min(self.event_shape) < 1:
            raise ValueError(f"invalid event_shape {event_shape}")
        self.dim = math.prod(self.event_shape)
        self.context_dim = int(context_dim)
        self.preprocessing_config = dict(preprocessing or {"kind": "none"})

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
        """JSON-able description; ``build_flow`` rebuilds the model from it."""
        return {
            "family": self.family,
            "event_shape": list(self.event_shape),
            "context_dim": self.context_dim,
            "preprocessing": self.preprocessing_config,
            **self.options(),
        }

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

    def __init__(self, event_shape, body: list[nn.Module], context_dim: int = 0, preprocessing: dict | None = None):
        super().__init__(event_shape, context_dim, preprocessing)
        self.transform = with_preprocessing(self.preprocessing_config, self.event_shape, body)

    def to_latent(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to latent: ``(z [B, D], log|det dz/dx|)``."""
        return self.transform(x, context)

    def from_latent(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Latent to data: ``(x [B, *event_shape], log|det dx/dz|)``."""
        return self.transform.inverse(z, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, ladj = self.to_latent(x, context)
        return standard_normal_log_prob(z) + ladj

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ladj = self.from_latent(z, context)
        return x, standard_normal_log_prob(z) - ladj


def _widths(hidden_features: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(width) for width in hidden_features)


class NICE(Flow):
    """NICE (Dinh et al., 2015): additive couplings with alternating masks, then a
    learned diagonal scaling. Images are flattened."""

    family = "nice"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_couplings: int = 4,
                 hidden_features: Sequence[int] = (64, 64)):
        dim = math.prod(event_shape)
        self.num_couplings, self.hidden_features = num_couplings, _widths(hidden_features)
        couplings = [
            Coupling(alternating_mask([dim], index % 2),
                     MLP(dim, dim, self.hidden_features, context_features=context_dim), affine=False)
            for index in range(num_couplings)
        ]
        super().__init__(event_shape, [Flatten(event_shape), *couplings, DiagonalScaling(dim)],
                         context_dim, preprocessing)

    def options(self):
        return {"num_couplings": self.num_couplings, "hidden_features": list(self.hidden_features)}


def _image_couplings(shape, masks, hidden_channels, context_dim) -> list[nn.Module]:
    return [Coupling(mask, ConvNet(shape[0], 2 * shape[0], hidden_channels, context_dim)) for mask in masks]


class RealNVP(Flow):
    """Real NVP (Dinh et al., 2017): affine couplings.

    Vectors: ``num_couplings`` couplings with alternating masks and tanh MLPs (bounded
    conditioners keep the tails sane: with ReLU ones, unstandardised two moons scored
    log p(4, 4) = -1.4e8). Images [C, H, W]: the multi-scale architecture, ``num_scales``
    scales of three checkerboard couplings, a squeeze, three channel couplings and a
    factor-out of half the channels; the last scale has four checkerboard couplings.
    """

    family = "realnvp"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_couplings: int = 8,
                 hidden_features: Sequence[int] = (64, 64), num_scales: int = 2, hidden_channels: int = 32):
        self.num_couplings, self.hidden_features = num_couplings, _widths(hidden_features)
        self.num_scales, self.hidden_channels = num_scales, hidden_channels
        event_shape = tuple(event_shape)
        if len(event_shape) == 3:
            body = [self._scale(event_shape, num_scales, context_dim)]
        else:
            dim = math.prod(event_shape)
            if dim < 2:
                raise ValueError(f"RealNVP needs at least 2 features, got {dim}")
            body = [Flatten(event_shape)] + [
                Coupling(alternating_mask([dim], index % 2),
                         MLP(dim, 2 * dim, self.hidden_features, context_features=context_dim))
                for index in range(num_couplings)
            ]
        super().__init__(event_shape, body, context_dim, preprocessing)

    def _scale(self, shape, scales_left, context_dim) -> nn.Module:
        channels, height, width = shape
        if scales_left == 1 or height % 2 or width % 2:
            masks = [alternating_mask(shape, i % 2) for i in range(4)]
            return ComposedTransform([*_image_couplings(shape, masks, self.hidden_channels, context_dim),
                                      Flatten(shape)])
        squeezed = (4 * channels, height // 2, width // 2)
        inner_shape = (squeezed[0] // 2, *squeezed[1:])
        return ComposedTransform([
            *_image_couplings(shape, [alternating_mask(shape, i % 2) for i in range(3)],
                              self.hidden_channels, context_dim),
            Squeeze(),
            *_image_couplings(squeezed, [channel_mask(squeezed, i % 2) for i in range(3)],
                              self.hidden_channels, context_dim),
            FactorOut(self._scale(inner_shape, scales_left - 1, context_dim), squeezed),
        ])

    def options(self):
        return {"num_couplings": self.num_couplings, "hidden_features": list(self.hidden_features),
                "num_scales": self.num_scales, "hidden_channels": self.hidden_channels}


class Glow(Flow):
    """Glow (Kingma & Dhariwal, 2018): steps of actnorm, an invertible 1x1 convolution
    (LU-parametrised) and an affine coupling on half the channels.

    Images [C, H, W]: ``num_levels`` levels of squeeze and ``steps_per_level`` steps, with a
    factor-out of half the channels between levels. Vectors: ``steps_per_level`` steps.
    """

    family = "glow"

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_levels: int = 2,
                 steps_per_level: int = 4, hidden_features: Sequence[int] = (64, 64), hidden_channels: int = 32):
        self.num_levels, self.steps_per_level = num_levels, steps_per_level
        self.hidden_features, self.hidden_channels = _widths(hidden_features), hidden_channels
        self._seed = 0
        event_shape = tuple(event_shape)
        if len(event_shape) == 3:
            body = [self._level(event_shape, num_levels, context_dim)]
        else:
            dim = math.prod(event_shape)
            body = [Flatten(event_shape), *self._steps((dim,), context_dim)]
        super().__init__(event_shape, body, context_dim, preprocessing)

    def _steps(self, shape, context_dim) -> list[nn.Module]:
        steps = []
        for index in range(self.steps_per_level):
            self._seed += 1
            if len(shape) == 1:
                net = MLP(shape[0], 2 * shape[0], self.hidden_features, context_features=context_dim)
            else:
                net = ConvNet(shape[0], 2 * shape[0], self.hidden_channels, context_dim)
            steps += [ActNorm(shape[0]), InvertibleLinearLU(shape[0], seed=self._seed),
                      Coupling(channel_mask(shape, index % 2), net)]
        return steps

    def _level(self, shape, levels_left, context_dim) -> nn.Module:
        channels, height, width = shape
        if height % 2 or width % 2:
            raise ValueError(f"Glow squeezes 2x2 blocks: a level's height and width must be even, got {list(shape)}")
        squeezed = (4 * channels, height // 2, width // 2)
        steps = self._steps(squeezed, context_dim)
        if levels_left == 1 or squeezed[1] % 2 or squeezed[2] % 2:
            return ComposedTransform([Squeeze(), *steps, Flatten(squeezed)])
        inner = self._level((squeezed[0] // 2, *squeezed[1:]), levels_left - 1, context_dim)
        return ComposedTransform([Squeeze(), *steps, FactorOut(inner, squeezed)])

    def options(self):
        return {"num_levels": self.num_levels, "steps_per_level": self.steps_per_level,
                "hidden_features": list(self.hidden_features), "hidden_channels": self.hidden_channels}


def _autoregressive_layers(dim, num_layers, hidden_features, context_dim, inverted: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    reverse = torch.arange(dim - 1, -1, -1)
    for index in range(num_layers):
        layer = AutoregressiveAffine(MADE(dim, hidden_features, context_features=context_dim))
        layers.append(Inverse(layer) if inverted else layer)
        if index < num_layers - 1:
            layers.append(Permutation(reverse))
    return layers


class MAF(Flow):
    """Masked autoregressive flow (Papamakarios et al., 2017): stacked MADE layers with
    the feature order reversed between them. Density in one pass per layer; sampling in
    ``D`` sequential passes per layer."""

    family = "maf"
    inverted = False

    def __init__(self, event_shape, context_dim=0, preprocessing=None, num_layers: int = 5,
                 hidden_features: Sequence[int] = (64, 64)):
        dim = math.prod(event_shape)
        self.num_layers, self.hidden_features = num_layers, _widths(hidden_features)
        body = [Flatten(event_shape),
                *_autoregressive_layers(dim, num_layers, self.hidden_features, context_dim, self.inverted)]
        super().__init__(event_shape, body, context_dim, preprocessing)

    def options(self):
        return {"num_layers": self.num_layers, "hidden_features": list(self.hidden_features)}


class IAF(MAF):
    """Inverse autoregressive flow (Kingma et al., 2016): MAF's layers inverted. Sampling
    in one pass per layer; density in ``D`` sequential passes per layer."""

    family = "iaf"
    inverted = True


class VAE(DensityModel):
    """A VAE whose prior is a flow (Real NVP over the latent space).

    Encoder q(u|x) = N(mu(x), sigma(x)); decoder p(x|u) = N(m(u), diag(exp(2 s))) with a
    learned per-feature log-scale ``s``; prior p(u) a Real NVP flow. ``log_prob`` is the
    importance-weighted bound (Burda et al., 2016) with ``importance_samples`` K; its
    encoder noise is a fixed buffer drawn at construction, so the served bound is
    deterministic. The base noise of one sample is the prior's ``latent_dim`` values and
    then ``D`` values of decoder noise.
    """

    family = "vae"
    log_likelihood = LOWER_BOUND

    def __init__(self, event_shape, context_dim=0, preprocessing=None, latent_dim: int = 2,
                 hidden_features: Sequence[int] = (64, 64), prior_couplings: int = 4, importance_samples: int = 64):
        super().__init__(event_shape, context_dim, preprocessing)
        if latent_dim < 2:
            raise ValueError(f"VAE needs latent_dim >= 2, got {latent_dim}")
        self.latent_dim, self.hidden_features = latent_dim, _widths(hidden_features)
        self.prior_couplings, self.importance_samples = prior_couplings, importance_samples
        self.data_side = with_preprocessing(self.preprocessing_config, self.event_shape, [Flatten(self.event_shape)])
        self.encoder = MLP(self.dim, 2 * latent_dim, self.hidden_features, context_features=context_dim)
        self.decoder = MLP(latent_dim, self.dim, self.hidden_features, context_features=context_dim)
        self.decoder_log_scale = nn.Parameter(torch.zeros(self.dim))
        self.prior = RealNVP([latent_dim], context_dim, None, prior_couplings, hidden_features)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("encoder_noise", torch.randn(importance_samples, latent_dim, generator=generator))

    @property
    def noise_dim(self) -> int:
        return self.latent_dim + self.dim

    def _posterior(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mean, raw_log_scale = self.encoder(y, context).chunk(2, dim=1)
        return mean, 5.0 * torch.tanh(raw_log_scale / 5.0)

    def _log_weights(self, y: Tensor, context: Tensor | None, noise: Tensor) -> Tensor:
        """``log p(y|u) + log p(u) - log q(u|y)`` for u = mean + sigma * noise, [B, K]."""
        samples = noise.shape[-2]
        mean, log_scale = self._posterior(y, context)
        u = mean[:, None, :] + torch.exp(log_scale)[:, None, :] * noise           # [B, K, L]
        log_q = standard_normal_log_prob(noise.reshape(-1, self.latent_dim)).reshape(-1, samples) \
            - log_scale.sum(1, keepdim=True)
        flat_u = u.reshape(-1, self.latent_dim)
        flat_context = None if context is None else \
            context[:, None, :].expand(-1, samples, -1).reshape(-1, self.context_dim)
        log_prior = self.prior.log_prob(flat_u, flat_context).reshape(-1, samples)
        decoded = self.decoder(flat_u, flat_context).reshape(-1, samples, self.dim)
        scaled = (y[:, None, :] - decoded) * torch.exp(-self.decoder_log_scale)
        log_likelihood = -0.5 * (scaled**2).sum(-1) - self.decoder_log_scale.sum() - 0.5 * self.dim * LOG_2PI
        return log_likelihood + log_prior - log_q

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        y, ladj = self.data_side(x, context)
        log_weights = self._log_weights(y, context, self.encoder_noise)
        return torch.logsumexp(log_weights, dim=1) - math.log(self.importance_samples) + ladj

    def training_loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Negative importance-weighted bound with fresh encoder noise (8 samples per row)."""
        samples = 8
        y, ladj = self.data_side(x, context)
        noise = torch.randn(y.shape[0], samples, self.latent_dim, device=y.device, dtype=y.dtype)
        bound = torch.logsumexp(self._log_weights(y, context, noise), dim=1) - math.log(samples) + ladj
        return -bound.mean()

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, _ = self.prior.from_latent(z[:, : self.latent_dim], context)
        y = self.decoder(u, context) + torch.exp(self.decoder_log_scale) * z[:, self.latent_dim :]
        x, _ = self.data_side.inverse(y, context)
        return x, self.log_prob(x, context)

    def options(self):
        return {"latent_dim": self.latent_dim, "hidden_features": list(self.hidden_features),
                "prior_couplings": self.prior_couplings, "importance_samples": self.importance_samples}


FLOW_FAMILIES: dict[str, type[DensityModel]] = {
    cls.family: cls for cls in (NICE, RealNVP, Glow, MAF, IAF, VAE)
}


def default_flow_config(family: str, dataset) -> dict[str, Any]:
    """A sensible config of ``family`` for ``dataset`` (a ``data.Dataset``).

    Pixel data is dequantized to logits; continuous data is standardised with the
    training split's statistics, which thereby become part of the exported graphs.
    Widths grow with the dimension; images get the multi-scale convolutional
    architectures (Real NVP, Glow), the other families see them flattened.
    """
    if family not in FLOW_FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; known families: {sorted(FLOW_FAMILIES)}")
    if dataset.levels is not None:
        preprocessing = {"kind": "dequantize", "levels": int(dataset.levels)}
    else:
        flat = dataset.train.reshape(len(dataset.train), -1).astype("float64")
        std = flat.std(0)
        if not (std > 0).all():
            raise ValueError(f"feature {int((std > 0).argmin())} of {dataset.name!r} is constant in the training "
                             "split: a density over it is degenerate; drop the column")
        preprocessing = {"kind": "standardize", "mean": flat.mean(0).tolist(), "std": std.tolist()}
    width = max(64, 2 * dataset.dim)
    options: dict[str, Any] = {"hidden_features": [width, width]}
    if family == "vae":
        options["latent_dim"] = 2 if dataset.dim <= 4 else min(16, dataset.dim // 2)
    if family in ("realnvp", "glow") and len(dataset.event_shape) == 3:
        options["hidden_channels"] = 64
    return {"family": family, "event_shape": list(dataset.event_shape), "context_dim": dataset.context_dim,
            "preprocessing": preprocessing, **options}


def build_flow(config: dict[str, Any]) -> DensityModel:
    """Build the model that ``config`` (as returned by ``config()``) describes."""
    options = dict(config)
    family = options.pop("family", None)
    if family not in FLOW_FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; known families: {sorted(FLOW_FAMILIES)}")
    if "event_shape" not in options:
        raise ValueError(f"config of flow family {family!r} lacks event_shape")
    try:
        return FLOW_FAMILIES[family](**options)
    except TypeError as error:
        raise ValueError(f"invalid config for flow family {family!r}: {error}") from error

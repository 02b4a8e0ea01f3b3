"""A VAE whose prior is a Real NVP flow; its log-likelihood is a lower bound."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowserve.contract.metadata import LOWER_BOUND

from .base import LOG_2PI, DensityModel, conditioning_features, standard_normal_log_prob, widths, with_preprocessing
from .nets import MLP
from .realnvp import RealNVP
from .transforms import Flatten


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
                 hidden_features: Sequence[int] = (64, 64), prior_couplings: int = 4, importance_samples: int = 64,
                 context_embedding: dict | None = None):
        super().__init__(event_shape, context_dim, preprocessing, context_embedding)
        features = conditioning_features(context_dim, context_embedding)
        if latent_dim < 2:
            raise ValueError(f"VAE needs latent_dim >= 2, got {latent_dim}")
        self.latent_dim, self.hidden_features = latent_dim, widths(hidden_features)
        self.prior_couplings, self.importance_samples = prior_couplings, importance_samples
        self.data_side = with_preprocessing(self.preprocessing_config, self.event_shape, [Flatten(self.event_shape)])
        self.encoder = MLP(self.dim, 2 * latent_dim, self.hidden_features, context_features=features)
        self.decoder = MLP(latent_dim, self.dim, self.hidden_features, context_features=features)
        self.decoder_log_scale = nn.Parameter(torch.zeros(self.dim))
        self.prior = RealNVP([latent_dim], features, None, prior_couplings, hidden_features)
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
            context[:, None, :].expand(-1, samples, -1).reshape(-1, context.shape[1])
        log_prior = self.prior.log_prob(flat_u, flat_context).reshape(-1, samples)
        decoded = self.decoder(flat_u, flat_context).reshape(-1, samples, self.dim)
        scaled = (y[:, None, :] - decoded) * torch.exp(-self.decoder_log_scale)
        log_likelihood = -0.5 * (scaled**2).sum(-1) - self.decoder_log_scale.sum() - 0.5 * self.dim * LOG_2PI
        return log_likelihood + log_prior - log_q

    def _bound(self, x: Tensor, embedded: Tensor | None) -> Tensor:
        """The importance-weighted bound given the embedded context."""
        y, ladj = self.data_side(x)
        log_weights = self._log_weights(y, embedded, self.encoder_noise)
        return torch.logsumexp(log_weights, dim=1) - math.log(self.importance_samples) + ladj

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self._bound(x, self.embed_context(context))

    def training_loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Negative importance-weighted bound with fresh encoder noise (8 samples per row)."""
        samples = 8
        y, ladj = self.data_side(x)
        noise = torch.randn(y.shape[0], samples, self.latent_dim, device=y.device, dtype=y.dtype)
        bound = torch.logsumexp(self._log_weights(y, self.embed_context(context), noise), dim=1) \
            - math.log(samples) + ladj
        return -bound.mean()

    def sample_with_log_prob(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        embedded = self.embed_context(context)
        u, _ = self.prior.from_latent(z[:, : self.latent_dim], embedded)
        y = self.decoder(u, embedded) + torch.exp(self.decoder_log_scale) * z[:, self.latent_dim :]
        x, _ = self.data_side.inverse(y)
        return x, self._bound(x, embedded)

    def options(self):
        return {"latent_dim": self.latent_dim, "hidden_features": list(self.hidden_features),
                "prior_couplings": self.prior_couplings, "importance_samples": self.importance_samples}

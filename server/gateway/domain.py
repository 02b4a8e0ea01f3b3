"""The gateway's queries and results, free of gRPC and of Triton.

The service layer speaks only these (and the errors of ``flowserve.server.protocol.errors``);
the servicer converts protos to and from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowserve.contract.metadata import EXACT


@dataclass(frozen=True)
class ModelInfo:
    """A served flow as ListModels describes it."""

    name: str
    family: str
    event_shape: tuple[int, ...]
    directions: tuple[str, ...]
    versions: tuple[str, ...]
    ready: bool
    context_shape: tuple[int, ...] = ()
    """Shape of one row's context; empty when the flow takes no context."""
    log_likelihood: str = EXACT
    """One of ``flowserve.contract.metadata.LOG_LIKELIHOOD_KINDS``: exact log-density or a lower bound."""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleQuery:
    """A Sample request; ``context`` is [*context_shape] or [num_samples, *context_shape], or
    with ``samples_per_context`` N, [B, *context_shape]: N samples for each of B contexts
    (``num_samples`` is then 0 or B x N). ``truncate_to_support`` keeps only samples inside
    the flow's support box, in at most ``max_draws`` draws (None: the gateway's bound)."""

    model: str
    num_samples: int
    seed: int | None = None
    temperature: float = 1.0
    return_log_prob: bool = False
    context: np.ndarray | None = None
    samples_per_context: int | None = None
    truncate_to_support: bool = False
    max_draws: int | None = None


@dataclass(frozen=True)
class SampleResult:
    """Samples [rows, *event_shape] (Sample with samples_per_context N: [B, N, *event_shape]),
    their log p in row order, the seed, and the index of the first row among the call's rows
    (a stream's chunks); under truncation, the fraction of the call's draws so far that fell
    inside the support box, and their number."""

    samples: np.ndarray
    log_prob: np.ndarray | None
    seed: int
    first_row: int = 0
    acceptance_rate: float = 0.0
    draws: int = 0


@dataclass(frozen=True)
class LogLikelihoodQuery:
    """A LogLikelihood request; ``context`` is [N, *context_shape] or [*context_shape].
    ``truncate_to_support``: -inf for rows outside the flow's support box."""

    model: str
    x: np.ndarray
    context: np.ndarray | None = None
    return_bits_per_dim: bool = False
    truncate_to_support: bool = False


@dataclass(frozen=True)
class LogLikelihoodResult:
    """log p(x | context) per row, and bits per dimension when the query asked for them."""

    log_prob: np.ndarray
    bits_per_dim: np.ndarray | None


@dataclass(frozen=True)
class EncodeQuery:
    """An Encode request; ``context`` is [N, *context_shape] or [*context_shape]."""

    model: str
    x: np.ndarray
    context: np.ndarray | None = None


@dataclass(frozen=True)
class EncodeResult:
    """Each row's base noise z [N, noise_dim], log|det dz/dx| and log p(x | context)."""

    z: np.ndarray
    log_det: np.ndarray
    log_prob: np.ndarray

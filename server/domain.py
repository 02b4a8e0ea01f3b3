"""Domain objects and errors of the gateway, free of gRPC and of Triton.

The service layer speaks only these; the servicer converts protos to and from them and
the interceptor turns the errors into gRPC status codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowserve.metadata import EXACT


QUOTE_LIMIT = 64
"""Characters of client input an error message quotes at most."""


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters with its length said:
    a message never echoes unbounded client input (gRPC caps the metadata that carries it)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class FlowServeError(Exception):
    """Base of every error the gateway reports to a client."""


class InvalidArgument(FlowServeError):
    """The request is malformed; the message names the field."""


class ModelNotFound(FlowServeError):
    """No flow of that name is served."""


class ResourceExhausted(FlowServeError):
    """The gateway's in-flight budget or a model's queue is full; retry later, after about
    ``retry_after_s`` seconds when that is known."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(FlowServeError):
    """Triton cannot be reached or the model is not ready there."""


class DeadlineExceeded(FlowServeError):
    """The client's deadline passed before the work was done."""


class BackendError(FlowServeError):
    """Triton answered with an error that is not the client's fault."""


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
    """One of ``flowserve.metadata.LOG_LIKELIHOOD_KINDS``: exact log-density or a lower bound."""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleQuery:
    """A Sample request; ``context`` is [*context_shape] or [num_samples, *context_shape]."""

    model: str
    num_samples: int
    seed: int | None = None
    temperature: float = 1.0
    return_log_prob: bool = False
    context: np.ndarray | None = None


@dataclass(frozen=True)
class SampleResult:
    samples: np.ndarray
    log_prob: np.ndarray | None
    seed: int


@dataclass(frozen=True)
class LogLikelihoodQuery:
    """A LogLikelihood request; ``context`` is [N, *context_shape] or [*context_shape]."""

    model: str
    x: np.ndarray
    context: np.ndarray | None = None
    return_bits_per_dim: bool = False


@dataclass(frozen=True)
class LogLikelihoodResult:
    """log p(x | context) per row, and bits per dimension when the query asked for them."""

    log_prob: np.ndarray
    bits_per_dim: np.ndarray | None

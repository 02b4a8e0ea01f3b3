"""The errors a flowserve call can end with, and the status each one maps to, free of any
transport: the gateway raises them, the wire codec raises ``InvalidArgument``, and each
transport (gRPC today) turns a :class:`Status` into its own code in one place."""

from __future__ import annotations

import enum

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


class FailedPrecondition(FlowServeError):
    """The flow cannot do what was asked, whatever the request: the message says why (a VAE
    has no exact data -> noise map; a flow exported before Encode existed has no encode model)."""


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


class Unauthenticated(FlowServeError):
    """The call carries no bearer token, or not in the form ``Bearer <token>``."""


class PermissionDenied(FlowServeError):
    """The call's token is not one the gateway accepts."""


class Status(enum.Enum):
    """A transport-neutral status: its name is the gRPC status code's, ``http`` the HTTP one's
    (the value pairs it with the gRPC code's number, since two statuses share HTTP 400)."""

    INVALID_ARGUMENT = (400, 3)
    FAILED_PRECONDITION = (400, 9)
    UNAUTHENTICATED = (401, 16)
    PERMISSION_DENIED = (403, 7)
    NOT_FOUND = (404, 5)
    RESOURCE_EXHAUSTED = (429, 8)
    UNAVAILABLE = (503, 14)
    DEADLINE_EXCEEDED = (504, 4)
    INTERNAL = (500, 13)

    @property
    def http(self) -> int:
        return self.value[0]


STATUS_OF_ERROR: dict[type[FlowServeError], Status] = {
    InvalidArgument: Status.INVALID_ARGUMENT,
    FailedPrecondition: Status.FAILED_PRECONDITION,
    ModelNotFound: Status.NOT_FOUND,
    ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    BackendUnavailable: Status.UNAVAILABLE,
    DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    BackendError: Status.INTERNAL,
    Unauthenticated: Status.UNAUTHENTICATED,
    PermissionDenied: Status.PERMISSION_DENIED,
}


def status_of(error: FlowServeError) -> Status:
    """The status of an error: that of its nearest class in :data:`STATUS_OF_ERROR`, else INTERNAL."""
    for error_type in type(error).__mro__:
        if error_type in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[error_type]
    return Status.INTERNAL

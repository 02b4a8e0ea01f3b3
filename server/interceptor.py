"""One interceptor for every RPC: domain errors to gRPC status codes, and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from .domain import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    FlowServeError,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
)
from .metrics import UNKNOWN_MODEL, GatewayMetrics

log = logging.getLogger(__name__)

STATUS_OF_ERROR: dict[type[FlowServeError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    BackendError: grpc.StatusCode.INTERNAL,
}

SERVICE_PREFIX = "/flowserve.v1.FlowService/"
# A client cancels when its deadline passes, a little before the server's clock agrees.
DEADLINE_SLACK_S = 0.05


def _rows_of(response) -> int:
    """Rows a Sample or LogLikelihood response carries (0 for other RPCs)."""
    if hasattr(response, "samples") and response.samples.shape:
        return response.samples.shape[0]
    return len(getattr(response, "log_prob", ()))


def status_of(error: FlowServeError) -> grpc.StatusCode:
    """The gRPC status code of a domain error."""
    for error_type in type(error).__mro__:
        if error_type in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[error_type]
    return grpc.StatusCode.INTERNAL


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and records every flowserve RPC's outcome.

    ``is_known_model`` bounds the ``model`` label: names that match no flow are recorded
    as ``"unknown"``.
    """

    def __init__(self, metrics: GatewayMetrics, is_known_model: Callable[[str], bool]):
        self.metrics = metrics
        self.is_known_model = is_known_model

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method.removeprefix(SERVICE_PREFIX), handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behaviour):
        metrics = self.metrics

        async def wrapped(request, context: grpc.aio.ServicerContext):
            # ListModels has no model; every other RPC is labelled with a served flow or "unknown".
            name = getattr(request, "model", None)
            model = "" if name is None else (name if self.is_known_model(name) else UNKNOWN_MODEL)
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            budget = context.time_remaining()
            metrics.in_flight.labels(method).inc()
            try:
                response = await behaviour(request, context)
                rows = _rows_of(response)
                if rows:
                    metrics.rows.labels(method, model).observe(rows)
                return response
            except FlowServeError as error:
                code = status_of(error)
                await context.abort(code, str(error))
            except asyncio.CancelledError:
                elapsed = time.perf_counter() - started
                expired = budget is not None and elapsed >= budget - DEADLINE_SLACK_S
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, f"internal error: {type(error).__name__}")
            finally:
                metrics.in_flight.labels(method).dec()
                metrics.requests.labels(method, model, code.name).inc()
                metrics.latency.labels(method, model).observe(time.perf_counter() - started)

        return wrapped

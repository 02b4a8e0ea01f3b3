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
    as ``"unknown"``. The wrapped handler of each method, and the labelled collectors of
    each (method, model), are built once and reused: this runs on every RPC.
    """

    def __init__(self, metrics: GatewayMetrics, is_known_model: Callable[[str], bool]):
        self.metrics = metrics
        self.is_known_model = is_known_model
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._collectors: dict[tuple[str, str], tuple] = {}
        self._counters: dict[tuple[str, str, grpc.StatusCode], object] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(SERVICE_PREFIX) or handler.unary_unary is None:
            return handler
        self._handlers[method] = grpc.unary_unary_rpc_method_handler(
            self._wrap(method.removeprefix(SERVICE_PREFIX), handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        return self._handlers[method]

    def _collectors_of(self, method: str, model: str) -> tuple:
        """The in-flight gauge, the latency and the rows histograms of (method, model)."""
        key = (method, model)
        if key not in self._collectors:
            self._collectors[key] = (self.metrics.in_flight.labels(method), self.metrics.latency.labels(method, model),
                                     self.metrics.rows.labels(method, model))
        return self._collectors[key]

    def _count(self, method: str, model: str, code: grpc.StatusCode) -> None:
        key = (method, model, code)
        if key not in self._counters:
            self._counters[key] = self.metrics.requests.labels(method, model, code.name)
        self._counters[key].inc()

    def _wrap(self, method: str, behaviour):
        async def wrapped(request, context: grpc.aio.ServicerContext):
            # ListModels has no model; every other RPC is labelled with a served flow or "unknown".
            name = getattr(request, "model", None)
            model = "" if name is None else (name if self.is_known_model(name) else UNKNOWN_MODEL)
            in_flight, latency, rows_histogram = self._collectors_of(method, model)
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            budget = context.time_remaining()
            in_flight.inc()
            try:
                response = await behaviour(request, context)
                rows = _rows_of(response)
                if rows:
                    rows_histogram.observe(rows)
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
                in_flight.dec()
                self._count(method, model, code)
                latency.observe(time.perf_counter() - started)

        return wrapped

"""One interceptor for every RPC: errors to gRPC status codes (by their transport-neutral
``Status``), and metrics; its handlers send ``tensors.Serialized`` responses as they are."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from flowserve.server.protocol.errors import FlowServeError, InvalidArgument, ResourceExhausted, status_of
from flowserve.server.protocol.names import METHOD_PREFIX, RETRY_AFTER_KEY
from flowserve.server.protocol.tensors import Serialized, serializer

from .metrics import UNKNOWN_MODEL, GatewayMetrics

log = logging.getLogger(__name__)

# A client cancels when its deadline passes, a little before the server's clock agrees.
DEADLINE_SLACK_S = 0.05


def _rows_of(response) -> int:
    """Rows a Sample or LogLikelihood response carries (0 for other RPCs)."""
    return response.rows if isinstance(response, Serialized) else 0


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and records every flowserve RPC's outcome.

    ``is_known_model`` bounds the ``model`` label: names that match no flow are recorded
    as ``"unknown"``. The wrapped handler of each method, and the labelled collectors of
    each (method, model), are built once and reused: this runs on every RPC.

    Beyond ``max_running`` flowserve RPCs at once, a new one is refused with
    RESOURCE_EXHAUSTED as soon as its request is parsed (and counted).
    """

    def __init__(self, metrics: GatewayMetrics, is_known_model: Callable[[str], bool],
                 max_running: int | None = None):
        self.metrics = metrics
        self.is_known_model = is_known_model
        self.max_running = max_running
        self.running = 0
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._children: dict[tuple, object] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(METHOD_PREFIX):
            return handler
        name = method.removeprefix(METHOD_PREFIX)
        # Requests arrive as bytes and are parsed inside the wrapper, where a message that does
        # not parse becomes INVALID_ARGUMENT and is counted (gRPC itself would answer UNKNOWN).
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(name, handler.unary_unary, handler.request_deserializer),
                response_serializer=serializer(handler.response_serializer),
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(name, handler.unary_stream, handler.request_deserializer),
                response_serializer=serializer(handler.response_serializer),
            )
        else:
            return handler
        self._handlers[method] = wrapped
        return wrapped

    def _labelled(self, collector, *labels: str):
        """``collector.labels(*labels)``, looked up once per label set."""
        key = (collector, labels)
        if key not in self._children:
            self._children[key] = collector.labels(*labels)
        return self._children[key]

    def in_flight_of(self, method: str):
        return self._labelled(self.metrics.in_flight, method)

    def latency_of(self, method: str, model: str):
        return self._labelled(self.metrics.latency, method, model)

    def rows_of(self, method: str, model: str):
        return self._labelled(self.metrics.rows, method, model)

    def count(self, method: str, model: str, code: grpc.StatusCode) -> None:
        self._labelled(self.metrics.requests, method, model, code.name).inc()

    def count_refused(self, method: str, code: grpc.StatusCode) -> None:
        """Count an RPC that was refused before its handler ran: ``method`` is the full path of
        a method the server has, counted if it is a flowserve RPC; its request was never
        parsed, so its model is "unknown"."""
        if method.startswith(METHOD_PREFIX):
            self.count(method.removeprefix(METHOD_PREFIX), UNKNOWN_MODEL, code)

    def _wrap_unary(self, method: str, behaviour, deserialize):
        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext):
            async with _Recorded(self, method, context) as record:
                response = await behaviour(record.parse(raw, deserialize), context)
                record.rows = _rows_of(response)
                return response

        return wrapped

    def _wrap_stream(self, method: str, behaviour, deserialize):
        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext):
            async with _Recorded(self, method, context) as record:
                async for response in behaviour(record.parse(raw, deserialize), context):
                    record.rows += _rows_of(response)
                    yield response

        return wrapped


class _Recorded:
    """One RPC's outcome: its status code (domain errors become aborts), latency, rows and
    the in-flight gauge. ListModels has no model; every other RPC is labelled with a served
    flow or "unknown"."""

    def __init__(self, interceptor: ErrorAndMetricsInterceptor, method: str, context):
        self.interceptor, self.method, self.context = interceptor, method, context
        self.model = UNKNOWN_MODEL  # until the request is parsed
        self.rows = 0

    def parse(self, raw: bytes, deserialize):
        """The request message of ``raw``; InvalidArgument if it does not parse."""
        try:
            request = deserialize(raw)
        except DecodeError:
            raise InvalidArgument(
                f"the {self.method} request does not parse as a flowserve.v1 message ({len(raw)} bytes): "
                "malformed protobuf, or a string field that is not UTF-8"
            ) from None
        name = getattr(request, "model", None)
        self.model = "" if name is None else (name if self.interceptor.is_known_model(name) else UNKNOWN_MODEL)
        limit = self.interceptor.max_running
        if limit is not None and self.interceptor.running > limit:
            raise ResourceExhausted(f"the gateway is running {limit} RPCs, its limit (--max-concurrent-rpcs); "
                                    "retry later")
        return request

    async def __aenter__(self) -> "_Recorded":
        self.started = time.perf_counter()
        self.budget = self.context.time_remaining()
        self.in_flight = self.interceptor.in_flight_of(self.method)
        self.in_flight.inc()
        self.interceptor.running += 1
        return self

    async def __aexit__(self, error_type, error, traceback) -> bool:
        code = grpc.StatusCode.OK
        try:
            if error is None:
                if self.rows:
                    self.interceptor.rows_of(self.method, self.model).observe(self.rows)
            elif isinstance(error, FlowServeError):
                code = grpc.StatusCode[status_of(error).name]
                retry_after_s = getattr(error, "retry_after_s", None)
                hint = () if retry_after_s is None else ((RETRY_AFTER_KEY, str(math.ceil(1000 * retry_after_s))),)
                await self.context.abort(code, str(error), trailing_metadata=hint)
            elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # a stream the reader left
                elapsed = time.perf_counter() - self.started
                expired = self.budget is not None and elapsed >= self.budget - DEADLINE_SLACK_S
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            elif isinstance(error, Exception):
                code = grpc.StatusCode.INTERNAL
                log.error("%s failed", self.method, exc_info=(error_type, error, traceback))
                await self.context.abort(code, f"internal error: {error_type.__name__}")
        finally:
            self.in_flight.dec()
            self.interceptor.running -= 1
            self.interceptor.count(self.method, self.model, code)
            self.interceptor.latency_of(self.method, self.model).observe(time.perf_counter() - self.started)
        return False

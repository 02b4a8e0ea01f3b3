"""One interceptor for every RPC: errors to gRPC status codes (by their transport-neutral
``Status``), and metrics; its handlers send ``tensors.Serialized`` responses as they are."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc
from google.protobuf.message import DecodeError

from flowserve.server.protocol.errors import FlowServeError, InvalidArgument, status_of
from flowserve.server.protocol.names import METHOD_PREFIX, RETRY_AFTER_KEY
from flowserve.server.protocol.tensors import Serialized, serializer

from .calls import CANCELLED, DEADLINE_EXCEEDED, GRPC, INTERNAL, OK, Call, CallLedger

log = logging.getLogger(__name__)

# A client cancels when its deadline passes, a little before the server's clock agrees.
DEADLINE_SLACK_S = 0.05


def _rows_of(response) -> int:
    """Rows a Sample or LogLikelihood response carries (0 for other RPCs)."""
    return response.rows if isinstance(response, Serialized) else 0


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and records every flowserve RPC's outcome in the
    gateway's :class:`~.calls.CallLedger` (shared with the HTTP API, which holds the same
    limit of running calls). The wrapped handler of each method is built once and reused.
    """

    def __init__(self, ledger: CallLedger):
        self.ledger = ledger
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

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

    def count_refused(self, method: str, code: str) -> None:
        """Count an RPC that was refused before its handler ran: ``method`` is the full path of
        a method the server has, counted if it is a flowserve RPC."""
        if method.startswith(METHOD_PREFIX):
            self.ledger.count_refused(GRPC, method.removeprefix(METHOD_PREFIX), code)

    def _wrap_unary(self, method: str, behaviour, deserialize):
        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext):
            async with _Recorded(self.ledger.open(GRPC, method), context) as record:
                response = await behaviour(record.parse(raw, deserialize), context)
                record.call.rows = _rows_of(response)
                return response

        return wrapped

    def _wrap_stream(self, method: str, behaviour, deserialize):
        async def wrapped(raw: bytes, context: grpc.aio.ServicerContext):
            async with _Recorded(self.ledger.open(GRPC, method), context) as record:
                async for response in behaviour(record.parse(raw, deserialize), context):
                    record.call.rows += _rows_of(response)
                    yield response

        return wrapped


class _Recorded:
    """One RPC's outcome: its status code (domain errors become aborts), counted by its
    :class:`~.calls.Call`. ListModels has no model; every other RPC is labelled with a served
    flow or "unknown"."""

    def __init__(self, call: Call, context: grpc.aio.ServicerContext):
        self.call, self.context = call, context
        self.budget = context.time_remaining()

    def parse(self, raw: bytes, deserialize):
        """The request message of ``raw``; InvalidArgument if it does not parse."""
        try:
            request = deserialize(raw)
        except DecodeError:
            raise InvalidArgument(
                f"the {self.call.method} request does not parse as a flowserve.v1 message ({len(raw)} bytes): "
                "malformed protobuf, or a string field that is not UTF-8"
            ) from None
        self.call.admit(getattr(request, "model", None))
        return request

    async def __aenter__(self) -> "_Recorded":
        return self

    async def __aexit__(self, error_type, error, traceback) -> bool:
        code = OK
        try:
            if isinstance(error, FlowServeError):
                code = status_of(error).name
                retry_after_s = getattr(error, "retry_after_s", None)
                hint = () if retry_after_s is None else ((RETRY_AFTER_KEY, str(math.ceil(1000 * retry_after_s))),)
                await self.context.abort(grpc.StatusCode[code], str(error), trailing_metadata=hint)
            elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # a stream the reader left
                expired = self.budget is not None and self.call.elapsed_s >= self.budget - DEADLINE_SLACK_S
                code = DEADLINE_EXCEEDED if expired else CANCELLED
            elif isinstance(error, Exception):
                code = INTERNAL
                log.error("%s failed", self.call.method, exc_info=(error_type, error, traceback))
                await self.context.abort(grpc.StatusCode.INTERNAL, f"internal error: {error_type.__name__}")
        finally:
            self.call.close(code)
        return False

"""The HTTP/JSON API: a thin transport over the gateway's ``FlowService``, beside gRPC.

Every call runs through the same service (validation, seeds, batching, budgets), the same
:class:`~flowserve.server.gateway.calls.CallLedger` (the limit of running calls, metrics
labelled ``protocol="http"``) and the same token check as a gRPC call. Domain errors become
HTTP statuses through ``errors.status_of``; errors of HTTP itself (no such path, a body over
the limit, a media type the API does not speak) keep their HTTP status. Every error is JSON:
``{"error": {"code": <gRPC status name>, "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np
from aiohttp import hdrs, web

from flowserve.server.protocol import npy
from flowserve.server.protocol.auth import AUTHORIZATION
from flowserve.server.protocol.errors import (
    BackendError,
    DeadlineExceeded,
    FlowServeError,
    InvalidArgument,
    status_of,
)
from flowserve.server.protocol.tensors import MAX_MESSAGE_BYTES

from ..auth import TokenCheck
from ..calls import CANCELLED, DEADLINE_EXCEEDED, HTTP, INTERNAL, OK, Call, CallLedger
from ..domain import EncodeQuery, LogLikelihoodQuery, ModelInfo, SampleQuery, SampleResult
from ..service import FlowService
from . import fields as api_fields
from . import openapi
from .fields import ENCODE, LOG_LIKELIHOOD, SAMPLE, SAMPLE_STREAM, Operation, json_floats

log = logging.getLogger(__name__)

JSON = "application/json"
NDJSON = "application/x-ndjson"
TIMEOUT_HEADER = "Flowserve-Timeout"
"""Seconds the caller gives a call (gRPC's deadline); 504 DEADLINE_EXCEEDED after them."""
SEED_HEADER = "Flowserve-Seed"
"""The seed of a Sample answered as .npy (a JSON answer carries it in its body)."""
MAX_TIMEOUT_S = 86_400
HTTP_STATUS_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 406: "INVALID_ARGUMENT", 413: "RESOURCE_EXHAUSTED",
                     415: "INVALID_ARGUMENT"}
"""The gRPC status name of each error of HTTP itself (the rest are domain errors)."""
_CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": f"Authorization, Content-Type, Accept, {TIMEOUT_HEADER}",
    "Access-Control-Max-Age": "600",
}
_CORS_EXPOSED = f"Retry-After, {SEED_HEADER}"
JSON_ROWS = 2048
"""Rows of a JSON answer's arrays written at a time."""
PAGE_FILES = {"/": ("page.html", "text/html"), "/page.js": ("page.js", "text/javascript")}
_PAGE_POLICY = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"


class HttpApi:
    """The aiohttp application of the HTTP API over ``service``. ``is_ready()`` says whether the
    gateway serves (Triton ready, not shutting down); ``cors_origins`` are the origins a
    browser may call it from (``*``: any; empty: none, the default)."""

    def __init__(self, service: FlowService, calls: CallLedger, is_ready: Callable[[], bool],
                 token_check: TokenCheck | None = None, cors_origins: frozenset[str] = frozenset()):
        self.service = service
        self.calls = calls
        self.is_ready = is_ready
        self.token_check = token_check
        self.cors_origins = cors_origins
        self._openapi = openapi.text().encode()
        self._page = {path: (resources.files(__package__).joinpath(name).read_bytes(), kind)
                      for path, (name, kind) in PAGE_FILES.items()}

    def application(self) -> web.Application:
        """The routes, under a body limit equal to the gRPC message limit."""
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES, middlewares=[self._middleware])
        app.on_response_prepare.append(self._cors_headers)
        app.router.add_get("/openapi.json", self._openapi_document)
        for path in PAGE_FILES:
            app.router.add_get(path, self._page_file)
        app.router.add_get("/livez", self._live)
        app.router.add_get("/readyz", self._ready)
        app.router.add_get("/v1/models", self._endpoint("ListModels", self._list_models))
        app.router.add_get("/v1/models/{model}", self._endpoint("GetModel", self._get_model))
        handlers = {SAMPLE: self._sample, SAMPLE_STREAM: self._sample_stream, LOG_LIKELIHOOD: self._log_likelihood,
                    ENCODE: self._encode}
        for operation, handler in handlers.items():
            app.router.add_post(f"/v1/models/{{model}}/{operation.path}", self._endpoint(operation.method, handler))
        return app

    # --- the flowserve calls -------------------------------------------------------------

    def _endpoint(self, method: str, handler: Callable[[web.Request, _Exchange], Awaitable[web.StreamResponse]]):
        """``handler`` behind the token check, counted as one call of ``method`` within the
        caller's timeout, its errors answered as JSON (or, once a stream has begun, as its
        last line)."""
        async def endpoint(request: web.Request) -> web.StreamResponse:
            refusal = None if self.token_check is None else self.token_check.refusal(
                request.headers.getall(AUTHORIZATION, []))
            if refusal is not None:
                self.calls.count_refused(HTTP, method, status_of(refusal).name)
                return error_response(refusal)
            exchange = _Exchange(self.calls.open(HTTP, method))
            code = INTERNAL
            try:
                exchange.timeout = _timeout(request)
                exchange.call.admit(request.match_info.get("model"))
                response = await asyncio.wait_for(handler(request, exchange), exchange.timeout)
                code = OK
                return response
            except asyncio.TimeoutError:
                code = DEADLINE_EXCEEDED
                return await exchange.end_with(DeadlineExceeded(f"{method} did not finish within {TIMEOUT_HEADER}"))
            except FlowServeError as error:
                code = status_of(error).name
                return await exchange.end_with(error)
            except web.HTTPException as error:  # a body over the limit: HTTP's own error
                code = HTTP_STATUS_CODES.get(error.status, INTERNAL)
                return http_error_response(error)
            except asyncio.CancelledError:  # the client went away
                code = CANCELLED
                raise
            except Exception:
                log.exception("%s over HTTP failed", method)
                return await exchange.end_with(BackendError(f"internal error in {method}"))
            finally:
                exchange.call.close(code)

        return endpoint

    async def _list_models(self, request: web.Request, exchange: _Exchange) -> web.Response:
        models = await self.service.list_models()
        return _json({"models": [model_json(m) for m in models]})

    async def _get_model(self, request: web.Request, exchange: _Exchange) -> web.Response:
        return _json(model_json(await self.service.model_info(request.match_info["model"])))

    async def _sample(self, request: web.Request, exchange: _Exchange) -> web.Response:
        as_npy = _accepts_npy(request)
        query = _sample_query(request, await _fields(request, SAMPLE))
        result = await self.service.sample(query, exchange.timeout)
        lead = result.samples.shape[:1 if query.samples_per_context is None else 2]
        exchange.call.rows = math.prod(lead)
        arrays = _sample_arrays(result, lead)
        if as_npy:
            return web.Response(body=npy.write(arrays, lead), content_type=npy.MEDIA_TYPE,
                                headers={SEED_HEADER: str(result.seed)})
        return await _json_arrays(request, exchange, arrays, _sample_tally(result))

    async def _sample_stream(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        _negotiated(request, (NDJSON,))
        query = _sample_query(request, await _fields(request, SAMPLE_STREAM))
        async with contextlib.aclosing(self.service.sample_stream(query, exchange.timeout)) as chunks:
            chunk = await anext(chunks)  # errors before the first chunk get their own status
            response = exchange.stream = web.StreamResponse(headers={hdrs.CONTENT_TYPE: NDJSON})
            await response.prepare(request)
            while chunk is not None:
                rows = (len(chunk.samples),)
                line = {name: json_floats(array) for name, array in _sample_arrays(chunk, rows).items()}
                await response.write(_line({**line, "first_row": chunk.first_row, **_sample_tally(chunk)}))
                exchange.call.rows += rows[0]
                chunk = await anext(chunks, None)
        await response.write_eof()
        return response

    async def _log_likelihood(self, request: web.Request, exchange: _Exchange) -> web.Response:
        as_npy = _accepts_npy(request)
        values = await _fields(request, LOG_LIKELIHOOD)
        query = LogLikelihoodQuery(request.match_info["model"], _required(values, "x"), values.get("context"),
                                   values.get("return_bits_per_dim", False), values.get("truncate_to_support", False))
        result = await self.service.log_likelihood(query, exchange.timeout)
        arrays = {"log_prob": result.log_prob}
        if result.bits_per_dim is not None:
            arrays["bits_per_dim"] = result.bits_per_dim
        exchange.call.rows = len(result.log_prob)
        return await _arrays_response(request, exchange, arrays, as_npy)

    async def _encode(self, request: web.Request, exchange: _Exchange) -> web.Response:
        as_npy = _accepts_npy(request)
        values = await _fields(request, ENCODE)
        query = EncodeQuery(request.match_info["model"], _required(values, "x"), values.get("context"))
        result = await self.service.encode(query, exchange.timeout)
        exchange.call.rows = len(result.z)
        return await _arrays_response(request, exchange, {"z": result.z, "log_det": result.log_det,
                                                          "log_prob": result.log_prob}, as_npy)

    # --- what is open: health, the description, the page -------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"status": "SERVING"})

    async def _ready(self, request: web.Request) -> web.Response:
        ready = self.is_ready()
        return _json({"status": "SERVING" if ready else "NOT_SERVING"}, status=200 if ready else 503)

    async def _openapi_document(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=JSON)

    async def _page_file(self, request: web.Request) -> web.Response:
        body, kind = self._page[request.path]
        return web.Response(body=body, content_type=kind, headers={"Content-Security-Policy": _PAGE_POLICY})

    # --- every response: HTTP's own errors as JSON, CORS --------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        if (request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
                and self._allowed_origin(request)):
            return web.Response(status=204, headers=_CORS_HEADERS)  # a preflight: _cors_headers adds the origin
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return http_error_response(error)

    def _allowed_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get(hdrs.ORIGIN)
        return origin if origin is not None and ("*" in self.cors_origins or origin in self.cors_origins) else None

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """Before any answer's headers leave (streamed ones too): CORS's, for an allowed origin."""
        origin = self._allowed_origin(request)
        if origin is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.VARY] = "Origin"
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _CORS_EXPOSED


def model_json(model: ModelInfo) -> dict:
    """A served flow as the HTTP API describes it (the fields of gRPC's ``ModelInfo``)."""
    return {"name": model.name, "family": model.family, "event_shape": list(model.event_shape),
            "context_shape": list(model.context_shape), "versions": list(model.versions),
            "directions": list(model.directions), "ready": model.ready,
            "log_likelihood_kind": model.log_likelihood, "metadata": model.metadata}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(error: FlowServeError) -> web.Response:
    """The JSON answer of a domain error, with its status's HTTP code; Retry-After (whole
    seconds) on 429 and 503, and a Bearer challenge on 401."""
    status = status_of(error)
    headers = {}
    if status.http in (429, 503):
        retry_after_s = getattr(error, "retry_after_s", None)
        headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(retry_after_s or 1)))
    if status.http == 401:
        headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
    return _json(error_body(status.name, str(error)), status=status.http, headers=headers)


def http_error_response(error: web.HTTPException) -> web.Response:
    """The JSON answer of an error of HTTP itself (aiohttp's message, which quotes no input)."""
    code = HTTP_STATUS_CODES.get(error.status, INTERNAL)
    return _json(error_body(code, error.text or error.reason), status=error.status)


@dataclass
class _Exchange:
    """One HTTP call: its ledger entry, the caller's timeout, and its stream once begun."""

    call: Call
    timeout: float | None = None
    stream: web.StreamResponse | None = None

    async def end_with(self, error: FlowServeError) -> web.StreamResponse:
        """The answer of a call that failed: the error's own response, or, once a stream has
        begun, the error as the stream's last line."""
        if self.stream is None:
            return error_response(error)
        with contextlib.suppress(ConnectionError):
            await self.stream.write(_line(error_body(status_of(error).name, str(error))))
            await self.stream.write_eof()
        return self.stream


def _timeout(request: web.Request) -> float | None:
    text = request.headers.get(TIMEOUT_HEADER)
    if text is None:
        return None
    try:
        timeout = float(text)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"{TIMEOUT_HEADER} must be seconds in (0, {MAX_TIMEOUT_S}]")
    return timeout


def _negotiated(request: web.Request, offered: tuple[str, ...]) -> str:
    """The media type of ``offered`` that the request's Accept names first (the first
    offered for none, ``*/*`` or ``application/*``); 406 if it names none of them."""
    accept = request.headers.get(hdrs.ACCEPT, "*/*")
    for part in accept.split(","):
        kind = part.split(";", 1)[0].strip().lower()
        if kind in offered:
            return kind
        if kind in ("*/*", "application/*", ""):
            return offered[0]
    raise web.HTTPNotAcceptable(text=f"this operation answers {' or '.join(offered)}; the Accept header names "
                                     "neither")


def _accepts_npy(request: web.Request) -> bool:
    return _negotiated(request, (JSON, npy.MEDIA_TYPE)) == npy.MEDIA_TYPE


async def _fields(request: web.Request, operation: Operation) -> dict[str, object]:
    """The fields of a request to ``operation``: its body (JSON, .npy, or none) and its query."""
    body = await request.read()
    document, arrays = None, {}
    if body:
        if request.content_type == JSON:
            document = api_fields.parse_json(body)
        elif request.content_type == npy.MEDIA_TYPE:
            arrays = npy.read(body, operation.arrays)
        else:
            raise web.HTTPUnsupportedMediaType(text=f"send the body as {JSON} or {npy.MEDIA_TYPE}")
    return api_fields.read_fields(operation, document, request.query, arrays)


def _required(values: dict[str, object], name: str) -> np.ndarray:
    if name not in values:
        raise InvalidArgument(f"{name} is missing: send [N, *event_shape]")
    return values[name]


def _sample_query(request: web.Request, values: dict[str, object]) -> SampleQuery:
    return SampleQuery(
        model=request.match_info["model"], num_samples=values.get("num_samples", 0), seed=values.get("seed"),
        temperature=values.get("temperature", 1.0), return_log_prob=values.get("return_log_prob", False),
        context=values.get("context"), samples_per_context=values.get("samples_per_context"),
        truncate_to_support=values.get("truncate_to_support", False), max_draws=values.get("max_draws"),
    )


def _sample_arrays(result: SampleResult, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A Sample answer's arrays: samples, and their log p in the samples' leading shape."""
    arrays = {"samples": result.samples}
    if result.log_prob is not None:
        arrays["log_prob"] = result.log_prob.reshape(lead)
    return arrays


def _sample_tally(result: SampleResult) -> dict:
    return {"seed": result.seed, "acceptance_rate": result.acceptance_rate, "draws": result.draws}


async def _arrays_response(request: web.Request, exchange: _Exchange, arrays: dict[str, np.ndarray],
                           as_npy: bool) -> web.StreamResponse:
    if as_npy:
        rows = (len(next(iter(arrays.values()))),)
        return web.Response(body=npy.write(arrays, rows), content_type=npy.MEDIA_TYPE)
    return await _json_arrays(request, exchange, arrays)


async def _json_arrays(request: web.Request, exchange: _Exchange, arrays: dict[str, np.ndarray],
                       scalars: dict | None = None) -> web.StreamResponse:
    """A JSON object of ``arrays`` (then ``scalars``), written :data:`JSON_ROWS` rows at a time:
    writing numbers as text is the slow part of a large answer, and the event loop (gRPC's
    calls too) runs between the parts, whose text alone the gateway holds."""
    response = exchange.stream = web.StreamResponse(headers={hdrs.CONTENT_TYPE: JSON})
    await response.prepare(request)
    opening = "{"
    for name, array in arrays.items():
        await response.write(f'{opening}"{name}": ['.encode())
        for start in range(0, len(array), JSON_ROWS):
            part = json.dumps(json_floats(array[start:start + JSON_ROWS]), allow_nan=False)[1:-1]
            await response.write(f"{',' if start else ''}{part}".encode())
        await response.write(b"]")
        opening = ", "
    tail = json.dumps(scalars or {})[1:]
    await response.write_eof(f"{', ' if scalars else ''}{tail}".encode())
    return response


def _json(document: dict, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(document, allow_nan=False), status=status, content_type=JSON,
                        headers=headers)


def _line(document: dict) -> bytes:
    return json.dumps(document, allow_nan=False).encode() + b"\n"

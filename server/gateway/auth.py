"""Bearer-token authentication of the gateway's calls, over gRPC and HTTP.

A client sends ``authorization: Bearer <token>`` (gRPC metadata, or the HTTP header).
Without it, or with a value of another form, a call ends UNAUTHENTICATED (HTTP 401); with a
token the gateway does not know, PERMISSION_DENIED (403). Health stays open, so probes need
no token. Tokens are kept only as
SHA-256 digests, compared in constant time, and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Callable, Iterable

import grpc

from flowserve.server.protocol.auth import AUTHORIZATION, NOT_A_TOKEN, is_bearer_token, read_tokens, token_of
from flowserve.server.protocol.errors import PermissionDenied, Unauthenticated, status_of

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods callable without a token: health, for the probes of load balancers and Kubernetes."""
_TOKEN_SEPARATORS = re.compile(r"[\s,]+")
NO_TOKEN = "this gateway needs a token: send 'authorization: Bearer <token>' (gRPC metadata or HTTP header)"


def _split_tokens(text: str, source: str) -> list[str]:
    """The tokens of ``text``, separated by commas or whitespace; ``source`` names it in errors."""
    tokens = [token for token in _TOKEN_SEPARATORS.split(text) if token]
    if not all(map(is_bearer_token, tokens)):
        raise ValueError(f"{source} holds something that is not a bearer token ({NOT_A_TOKEN})")
    return tokens


def accepted_tokens(tokens_file: Path | None, tokens_text: str | None, text_source: str) -> frozenset[str]:
    """The tokens a gateway accepts: those of ``tokens_file`` (see :func:`read_tokens`) and of
    ``tokens_text`` (separated by commas or whitespace; ``text_source`` names it in errors).
    Empty, so no authentication, when both are None; ValueError when authentication is asked
    for but no token results."""
    tokens, sources = [], []
    if tokens_file is not None:
        tokens += read_tokens(tokens_file)
        sources.append(str(tokens_file))
    if tokens_text is not None:
        tokens += _split_tokens(tokens_text, text_source)
        sources.append(text_source)
    if sources and not tokens:
        raise ValueError(f"token authentication is asked for, but {' and '.join(sources)} hold no token")
    return frozenset(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenCheck:
    """Whether a call's ``authorization`` values carry one of ``tokens``, for any transport."""

    def __init__(self, tokens: Iterable[str]):
        self._digests = [_digest(token) for token in tokens]
        if not self._digests:
            raise ValueError("token authentication needs at least one token")

    def refusal(self, values: list[str]) -> Unauthenticated | PermissionDenied | None:
        """Why a call whose ``authorization`` values are ``values`` is refused; None if it may pass."""
        if not values:
            return Unauthenticated(NO_TOKEN)
        token = token_of(values[0]) if len(values) == 1 else None
        if token is None:
            return Unauthenticated("the authorization is not one 'Bearer <token>'")
        digest = _digest(token)
        known = False
        for candidate in self._digests:  # every digest, so the time does not tell which one matched
            known |= hmac.compare_digest(digest, candidate)
        if not known:
            return PermissionDenied("the token is not accepted by this gateway")
        return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets an RPC through only with an accepted token (``check``); health is open.

    Refused RPCs never reach their handler (nor is their request parsed): they end with
    UNAUTHENTICATED or PERMISSION_DENIED, and ``on_refused(method, code)`` is called for each
    (the full method path and the status name), so the metrics count them. Place it before
    the interceptors it guards.
    """

    def __init__(self, check: TokenCheck, on_refused: Callable[[str, str], None]):
        self.check = check
        self.on_refused = on_refused

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        refusal = self.check.refusal([value for key, value in metadata if key == AUTHORIZATION])
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:  # an unknown method stays UNIMPLEMENTED
            return handler
        code = status_of(refusal).name
        self.on_refused(method, code)
        return _refusing(handler, grpc.StatusCode[code], str(refusal))


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the RPC with ``code`` and ``message``
    without reading the request (it stays bytes)."""
    async def refuse(_request, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)

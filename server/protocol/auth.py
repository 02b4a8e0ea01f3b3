"""The syntax of bearer tokens on the wire: ``authorization: Bearer <token>`` metadata, and
files of tokens, one a line. The gateway checks the tokens; clients send them."""

from __future__ import annotations

import re
from pathlib import Path

AUTHORIZATION = "authorization"
_TOKEN = r"[A-Za-z0-9\-._~+/]+=*"
"""RFC 6750's b64token: what a bearer token may be made of."""
_BEARER = re.compile(rf"bearer +({_TOKEN})", re.IGNORECASE)
NOT_A_TOKEN = "letters, digits and -._~+/ with '=' at the end only"


def is_bearer_token(token: str) -> bool:
    """Whether ``token`` can travel in ``authorization: Bearer <token>`` metadata."""
    return re.fullmatch(_TOKEN, token) is not None


def bearer_metadata(token: str) -> tuple[str, str]:
    """The metadata pair that carries ``token``; ValueError (never quoting it) if it cannot."""
    if not is_bearer_token(token):
        raise ValueError(f"the token is not a bearer token ({NOT_A_TOKEN})")
    return AUTHORIZATION, f"Bearer {token}"


def token_of(value: str) -> str | None:
    """The token of an authorization value ``Bearer <token>`` (any case, any spaces), else None."""
    match = _BEARER.fullmatch(value)
    return None if match is None else match.group(1)


def read_tokens(path: Path) -> list[str]:
    """The tokens of ``path``, one a line; blank lines and ``#`` comments are skipped.
    ValueError (naming the line, never the token) for a line that is no bearer token."""
    tokens = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        token = line.split("#", 1)[0].strip()
        if token and not is_bearer_token(token):
            raise ValueError(f"line {number} of {path} is not a bearer token ({NOT_A_TOKEN})")
        if token:
            tokens.append(token)
    return tokens

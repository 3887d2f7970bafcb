"""API tokens: one scheme for the websocket, the REST API and the pages.

A request is authenticated by a token, presented as (first match wins):

1. ``Authorization: Bearer <token>`` (Python clients, ``densecap submit``);
2. the websocket subprotocol list: the browser offers ``["densecap.v1", "token.<token>"]`` (the browser
   ``WebSocket`` API cannot set headers, and a subprotocol stays out of access logs, unlike a query string);
3. ``?token=<token>`` in the query string (a last resort for links; the gateway's access log redacts it).

Tokens are compared in constant time. No token is ever logged or echoed in an error.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from flask import Request

SUBPROTOCOL = "densecap.v1"
TOKEN_SUBPROTOCOL_PREFIX = "token."


def presented_token(request: Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return proto[len(TOKEN_SUBPROTOCOL_PREFIX):]
    return request.args.get("token", "")


def token_is_valid(token: str, valid_tokens: tuple[str, ...]) -> bool:
    if not token:
        return False
    ok = False
    for candidate in valid_tokens:
        # Evaluate all to keep timing independent of which token matched.
        ok |= hmac.compare_digest(token.encode(), candidate.encode())
    return ok


def new_token() -> str:
    """A random token (32 URL-safe characters) that does not start with "-": one that did (1 in 64) would read
    as an option after ``densecap submit --token``, and users paste it there."""
    while True:
        token = secrets.token_urlsafe(24)
        if not token.startswith("-"):
            return token


def load_or_create_token(state_dir: Path) -> str:
    """The token for a single-machine install: generated once into ``state_dir/token`` (mode 0600)."""
    path = Path(state_dir) / "token"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = new_token()
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token

"""Bearer-token authentication for every route but ``/health``.

The token comes from ``SCANCACHE_TOKEN`` (never the command line, where ``ps`` shows it). It is
compared in constant time so response timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/viewer", "/viewer/"})  # "/viewer/": a redirect to the page
# the viewer's script and style, the docs pages' scripts: no data, no token
OPEN_PREFIXES = ("/viewer/static/", "/docs/assets/")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_ok(expected: str, authorization: str | None) -> bool:
    given = bearer_token(authorization)
    # Compare bytes of equal standing; an absent token still costs one comparison.
    return hmac.compare_digest((given or "").encode(), expected.encode()) and given is not None


class BearerAuthMiddleware:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if token_ok(self.token, header):
            await self.app(scope, receive, send)
            return
        detail = "missing bearer token" if header is None else "invalid bearer token"
        response = error_response(
            401,
            f"{detail}: send 'Authorization: Bearer <token>'",
            "Unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

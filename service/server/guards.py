"""Request guards that run before routing: encoded path separators and request body size;
and the headers every response carries (the served store, ``X-Content-Type-Options``).

An encoded slash (``%2F``) or backslash in the raw path would let a path parameter carry a
separator that routing never saw, so such paths are refused outright. Request bodies (only
``POST /batch`` has one) are capped before they are parsed.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.wire import STORE_HEADER
from service.server.errors import error_response, internal_error_response

FORBIDDEN_RAW = (b"%2f", b"%5c", b"%00", b"\\", b"\x00")
# h11 bounds headers still arriving (service.server.http_protocol); ones that arrive complete in
# one read are checked here, so the limit holds either way.
MAX_HEADER_BYTES = 64 * 1024


def raw_path_problem(raw_path: bytes) -> str | None:
    """Why a raw request path is refused, or None if it is acceptable."""
    lowered = raw_path.split(b"?", 1)[0].lower()  # some clients include the query; it may hold %2F
    if any(bad in lowered for bad in FORBIDDEN_RAW):
        return "path: encoded slashes, backslashes and NUL bytes are not allowed"
    return None


class UnexpectedErrorMiddleware:
    """A route's unexpected error answered (500, or 503 for a refused read) and logged once.
    Starlette's outermost layer would answer the same but then re-raise it, so that uvicorn
    printed the traceback a second time ("Exception in ASGI application") for every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # in the middle of a response: only dropping the connection can say it
                raise
            await internal_error_response(exc)(scope, receive, send)


class PathGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
            problem = raw_path_problem(raw)
            if problem:
                await error_response(400, problem, "InvalidPath", "path")(scope, receive, send)
                return
            size = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
            if size > MAX_HEADER_BYTES:
                detail = f"headers: {size} bytes, over the server's limit of {MAX_HEADER_BYTES}"
                await error_response(431, detail, "InvalidParameter", "headers")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse (413) request bodies over ``max_bytes``, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, f"request body over the server's limit of {self.max_bytes} bytes", "RequestTooLarge"
        )
        await response(scope, receive, send)


HEAD_SCOPE_KEY = "scancache.head"


class HeadAsGetMiddleware:
    """Answer HEAD wherever GET is answered: the route runs as GET without ``Range`` (RFC 9110
    defines Range for GET only, so HEAD is never 206), and uvicorn, which still sees the HEAD
    of its own scope, sends the headers (Content-Length included) without the body. Responses
    that stream files or buffers check ``HEAD_SCOPE_KEY`` so they do not read what is dropped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "HEAD":
            headers = [(k, v) for k, v in scope.get("headers", []) if k not in (b"range", b"if-range")]
            inner = {**scope, "method": "GET", "headers": headers, HEAD_SCOPE_KEY: True}
            try:
                await self.app(inner, receive, send)
            finally:
                # what routing put in the copy (the route) is what the outer middlewares (the
                # metrics' route label) read from the original
                for key in ("route", "endpoint", "path_params"):
                    if key in inner:
                        scope[key] = inner[key]
            return
        await self.app(scope, receive, send)


Header = tuple[bytes, bytes]


class HeadersMiddleware:
    """Adds the headers ``headers()`` gives to every response (errors too), replacing any of
    the same names. ``headers`` is called per response: what it says may change (a store
    replaced in place has another id)."""

    def __init__(self, app: ASGIApp, headers: Callable[[], list[Header]]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                added = self.headers()
                names = {name for name, _ in added}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": [*kept, *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def store_id_header(store_id: Callable[[], str]) -> Callable[[], list[Header]]:
    """``X-Scancache-Store: <store_id>`` on every response: a client that reconnects to a server
    now serving another store learns it from the first answer, before it takes other scans'
    voxels (or an out-of-bounds ROI error) for its own."""
    name = STORE_HEADER.lower().encode("latin-1")
    return lambda: [(name, store_id().encode("latin-1"))]


def nosniff_header() -> list[Header]:
    """``X-Content-Type-Options: nosniff`` on every response (errors, 304s, CORS preflights
    too): a browser must take a body as the type it is sent as (a ``.npy`` region or an error's
    JSON is never run as a script or rendered as a page)."""
    return [(b"x-content-type-options", b"nosniff")]

"""Response classes: a body sent as several buffers, cached JSON, and the one sequence every
body built in memory follows (:func:`budgeted_response`).

A region is sent as its ``.npy`` header followed by the array's own memory (a ``memoryview``),
so a large region is never copied into one ``bytes`` object just to be written to the socket.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.server.guards import HEAD_SCOPE_KEY
from service.server.http_cache import (
    JSON_GZIP_MIN_BYTES,
    REVALIDATE,
    accepts_gzip,
    etag_matches,
    gzip_etag,
    gzip_parts,
    make_etag,
    total_length,
)
from service.server.inflight import InflightBudget

Parts = list[bytes | memoryview]
SEND_PIECE = 1 << 20
# Bodies built in memory from this size on hold their bytes of the in-flight budget while sent;
# smaller ones (metadata, errors) are taken whole by the transport's 64 KiB buffer.
COUNTED_BODY_BYTES = 64 * 1024


class PartsResponse(Response):
    """A response whose body is a list of buffers written one after the other."""

    def __init__(
        self,
        parts: Sequence[bytes | memoryview],
        media_type: str,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.parts = list(parts)
        self.on_close = on_close  # e.g. release the bytes this body holds of the in-flight budget
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.init_headers(headers)
        self.headers["content-length"] = str(total_length(self.parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            head = scope.get("method") == "HEAD" or scope.get(HEAD_SCOPE_KEY)
            parts = [] if head else [p for p in self.parts if len(p)]
            if not parts:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            pieces = [piece for part in parts for piece in _pieces(part)]
            for i, piece in enumerate(pieces):
                await send({"type": "http.response.body", "body": piece, "more_body": i < len(pieces) - 1})
        finally:
            self.parts = []
            if self.on_close is not None:
                self.on_close()


def _pieces(part: bytes | memoryview) -> list[bytes | memoryview]:
    """A buffer in pieces of at most SEND_PIECE bytes: uvicorn waits for a slow reader's socket
    before each piece, so a response in flight holds its own array and about one piece of
    transport buffer, never a second copy of the whole body (asyncio copies what it cannot
    send at once), and the in-flight budget stays held until the client has the bytes."""
    view = memoryview(part)
    if view.nbytes <= SEND_PIECE:
        return [part]
    flat = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return [flat[i : i + SEND_PIECE] for i in range(0, flat.nbytes, SEND_PIECE)]


def _json_bytes(content: Any) -> bytes:
    try:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # only non-finite floats make strict dumps fail; the common case pays nothing
        return json.dumps(finite_json(content), separators=(",", ":"), allow_nan=False).encode()


def not_modified(etag: str, cache_control: str = REVALIDATE, vary: str | None = None) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if vary:
        headers["Vary"] = vary
    return Response(status_code=304, headers=headers)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: responses are strict JSON
    (a statistic of a scan with non-finite voxels must not make the listing invalid or a 500)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


async def cached_json(
    request: Request, content: Any, inflight: InflightBudget, in_thread: bool = False
) -> Response:
    """JSON with an ETag of its bytes (304 on a match) and gzip when it pays. Strict JSON:
    non-finite numbers anywhere (a stored prediction's Dice, a statistic) are sent as null. A
    large body (a listing with per-slice counts) holds its size of the in-flight budget until it
    is sent; small ones fit the transport's buffer and never wait. ``in_thread``: encode (and
    compress) in a worker thread, for bodies large enough to hold up the event loop (a listing
    of thousands of scans is megabytes)."""
    body = await to_thread.run_sync(_json_bytes, content) if in_thread else _json_bytes(content)
    gzip = len(body) >= JSON_GZIP_MIN_BYTES and accepts_gzip(request.headers.get("accept-encoding"))
    # A 304 carries the ETag of the representation a 200 would have sent (RFC 9110 15.4.5).
    etag = gzip_etag(make_etag("json", body)) if gzip else make_etag("json", body)
    if etag_matches(request.headers.get("if-none-match"), etag):
        return not_modified(etag, vary="Accept-Encoding")
    headers = {"ETag": etag, "Cache-Control": REVALIDATE, "Vary": "Accept-Encoding"}
    if gzip:
        headers["Content-Encoding"] = "gzip"
        raw = body
        body = await to_thread.run_sync(gzip_parts, [raw], 6) if in_thread else gzip_parts([raw], 6)
    release = await inflight.acquire(len(body)) if len(body) >= COUNTED_BODY_BYTES else None
    return PartsResponse([body], "application/json", headers=headers, on_close=release)


async def budgeted_response(
    request: Request,
    inflight: InflightBudget,
    *,
    etag: str | None,
    cost: int,
    produce: Callable[[], tuple[Parts, Mapping[str, str]]],
    media_type: str,
    headers: Mapping[str, str],
    vary: str | None = None,
    status_code: int = 200,
    counted_from: int = 0,
) -> Response:
    """A body built in memory, in the one order every such route follows: 304 when the client's
    copy (If-None-Match) matches ``etag`` (None: no ETag check here); then ``cost`` bytes of the
    in-flight budget (when at least ``counted_from``), held from before ``produce`` runs (in a
    worker thread) until the body has been sent or the request fails; then the parts it made,
    sent with ``headers`` followed by the headers ``produce`` returned."""
    if etag is not None and etag_matches(request.headers.get("if-none-match"), etag):
        return not_modified(etag, vary=vary)
    release = await inflight.acquire(cost) if cost >= counted_from else None
    try:
        parts, more = await to_thread.run_sync(produce)
    except BaseException:
        if release is not None:
            release()
        raise
    return PartsResponse(
        parts, media_type, status_code=status_code, headers={**headers, **more}, on_close=release
    )

"""The one place where errors become HTTP responses.

Every error body is ``{"detail": "<one line>", "error": "<class>", "param": "<name>"|null}``:
``detail`` is the pinned contract; ``error`` names the scancache exception so that a client can
raise the same class the local source would. Domain errors (``store.errors``) carry messages
written for users and never contain filesystem paths. Anything else is a server bug or a broken
store: the client gets a generic one-line 500 and the traceback goes to the server log only
(tensorstore and OS messages do contain paths).
"""

from __future__ import annotations

import logging
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.errors import (
    ArrayNotFound,
    InvalidParameter,
    InvalidPath,
    PredictionMismatch,
    RequestTooLarge,
    ScanCacheError,
    ScanChanged,
    ScanDamaged,
    ScanNotFound,
    Unauthorized,
    VersionGone,
    one_line,
)
from store.s3_errors import StoreUnavailable
from store.ts_status import refused_read, status_of

log = logging.getLogger("scancache.server")


class NotInStore(ScanCacheError, FileNotFoundError):
    """No such file in the served ``/zarr/`` tree (also: hidden names such as ``.staging``)."""


class ServerBusy(ScanCacheError):
    """The server's budget of bytes in flight is used up for now: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


NO_STORE = {"Cache-Control": "no-store"}

# Most specific first: the first match wins.
STATUS_BY_ERROR: tuple[tuple[type[ScanCacheError], int], ...] = (
    (ScanNotFound, 404),
    (ArrayNotFound, 404),
    (NotInStore, 404),
    (InvalidParameter, 422),
    (InvalidPath, 400),
    (PredictionMismatch, 409),
    (VersionGone, 410),
    (ScanChanged, 409),
    (RequestTooLarge, 413),
    (Unauthorized, 401),
    (ServerBusy, 503),
    (ScanDamaged, 500),
)

DESCRIPTIONS = {
    304: "Not modified: the client's copy (If-None-Match) is current.",
    400: "Malformed request or path (e.g. an invalid scan id, `..` or an encoded slash).",
    401: "Missing or wrong `Authorization: Bearer <token>` (only when SCANCACHE_TOKEN is set).",
    404: "Unknown scan, array or file.",
    409: (
        "Conflict: the stored prediction does not match the scan (another shape), or the scan was"
        " re-published while being read."
    ),
    410: "The scan version named in the path (`<scan_id>@<version>`) was superseded and removed.",
    413: "The response would exceed the server's --max-bytes (refused before reading).",
    416: "The Range cannot be satisfied for this file.",
    422: "A parameter is invalid (roi, categories, filters); `param` names it.",
    503: "Busy: the server's bytes in flight are at --max-inflight-bytes; retry after `Retry-After` seconds.",
}


class ErrorBody(BaseModel):
    """What every error response carries."""

    detail: str
    error: str | None = None
    param: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route can answer."""
    return {code: {"model": ErrorBody, "description": DESCRIPTIONS[code]} for code in codes}


def error_response(
    status: int,
    detail: str,
    error: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(detail=one_line(detail), error=error, param=param).model_dump()
    # nosniff here too: a 500 is answered outside every middleware (Starlette's error handler)
    nosniff = {"X-Content-Type-Options": "nosniff"}
    return JSONResponse(body, status_code=status, headers={**NO_STORE, **nosniff, **(headers or {})})


def status_for(exc: ScanCacheError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def unavailable_response(exc: BaseException) -> JSONResponse:
    """Storage unreachable or failing for now (after its client's retries): 503, to retry,
    never a 500 with a traceback nor a 404 a Zarr reader would take for fill values."""
    log.warning("the store is unavailable: %s", one_line(exc))
    return error_response(
        503, "store unavailable: the storage did not answer; retry later", "ServerError", None, RETRY_LATER
    )


def refused_response(exc: BaseException) -> JSONResponse:
    """The server's own files or credentials refused (a file its user may not read, object
    storage refusing its keys, a bucket gone): no bug, no retry helps; the log says which."""
    log.error("the store refused a read (permissions or credentials): %s", one_line(exc))
    return error_response(503, "store unavailable: it refused a read; see the server log", "ServerError")


RETRY_LATER = {"Retry-After": "5"}
# tensorstore's statuses for storage failing for now (its INTERNAL and UNKNOWN stay bugs: 500)
UNAVAILABLE_STATUSES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}
)


def domain_error_response(exc: ScanCacheError) -> JSONResponse:
    if isinstance(exc, StoreUnavailable):
        return refused_response(exc) if exc.refused else unavailable_response(exc)
    status = status_for(exc)
    if isinstance(exc, ScanDamaged):  # the server's own store, not the request: said as it is
        log.error("%s", exc)
        return error_response(500, str(exc), "ScanDamaged")
    if status == 500:  # a ScanCacheError we did not expect here: treat it as a bug
        return internal_error_response(exc)
    extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if isinstance(exc, ServerBusy):
        extra = {"Retry-After": str(exc.retry_after)}
    param = exc.param if isinstance(exc, InvalidParameter) else getattr(exc, "param", None)
    return error_response(status, str(exc), type(exc).__name__, param, extra)


def internal_error_response(exc: BaseException) -> JSONResponse:
    if refused_read(exc):  # the server's own files or credentials: no bug, and no path sent
        return refused_response(exc)
    if isinstance(exc, StoreUnavailable):
        return refused_response(exc) if exc.refused else unavailable_response(exc)
    if isinstance(exc, ValueError) and status_of(exc) in UNAVAILABLE_STATUSES:
        return unavailable_response(exc)  # tensorstore's reads fail so when the endpoint is down
    log.error("internal error while serving a request", exc_info=exc)
    return error_response(500, "internal server error; see the server log", "ServerError")


FASTAPI_BODY_ERROR = "There was an error parsing the body"


# what pydantic puts in a location for the branch of a union a value was tried as: no field
_BRANCH_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "regions", 3, "roi")`` -> ``regions[3].roi``; ``("query", "split")`` -> ``split``;
    a union branch's tag (``categories.list[any]``, ``categories.str``) is left out."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or [parts[0]]
    fields = [p for p in parts if not (isinstance(p, str) and (p in _BRANCH_TAGS or "[" in p or "-" in p))]
    parts = fields or parts
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request"


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return error_response(422, "request: invalid", "InvalidParameter", "request")
    first = errors[0]
    if first.get("type") == "json_invalid":  # its loc is ("body", character offset): not a field
        where = first.get("loc", ())[-1:]
        at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
        detail = first.get("ctx", {}).get("error", "")
        message = f"body: not valid JSON{at}" + (f" ({detail})" if detail else "")
        return error_response(422, message, "InvalidParameter", "body")
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        message = "body: expected a JSON object (send it with Content-Type: application/json)"
        return error_response(422, message, "InvalidParameter", "body")
    param = _location(first.get("loc", ()))
    # a value that fits no branch of a union is one error per branch, all of one parameter
    same = [e for e in errors if _location(e.get("loc", ())) == param]
    said = "; or ".join(dict.fromkeys(str(e.get("msg", "invalid")) for e in same))
    others = len(errors) - len(same)
    more = f" (and {others} more)" if others else ""
    return error_response(422, f"{param}: {said}{more}", "InvalidParameter", param)


def unaccepted_encoding(request: Request) -> str | None:
    """Why a request body's ``Content-Encoding`` is refused (anything but identity: the server
    reads plain JSON only), or None. One check for a body that decodes and one that does not."""
    encoding = ", ".join(v.strip() for v in request.headers.getlist("content-encoding"))
    if any(c.strip().lower() not in ("", "identity") for c in encoding.split(",")):
        return f"Content-Encoding {encoding!r} is not accepted; send plain JSON"
    return None


def body_decode_message(cause: BaseException | None) -> str:
    """Why FastAPI could not decode a JSON body, other than as invalid JSON (its answer is one
    generic 400 for all of these; the cause is the exception it chained)."""
    if isinstance(cause, RecursionError):  # '[' * 5000, as the query's form is
        return "body: not valid JSON (nested too deeply)"
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not UTF-8 text (byte {cause.start})"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int('9' * 5000)
        return "body: a number has more than 4300 digits"
    return f"body: not valid JSON ({type(cause).__name__ if cause else 'undecodable'})"


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ScanCacheError)
        state = getattr(request.app.state, "scancache", None)
        if (
            isinstance(exc, ScanNotFound)
            and state is not None
            and not await to_thread.run_sync(state.store_readable)
        ):
            return error_response(503, "store unavailable", "ServerError")  # not "no such scan"
        return domain_error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            refused = unaccepted_encoding(request)  # a compressed body: 415, as a plain one is
            if refused is not None:
                return error_response(415, f"body: {refused}", "InvalidParameter", "body")
            return error_response(422, body_decode_message(exc.__cause__), "InvalidParameter", "body")
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(exc)

    app.add_exception_handler(ScanCacheError, on_domain)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)

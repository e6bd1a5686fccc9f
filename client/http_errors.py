"""What a scancache server's refusal means to a client: the same typed error ``LocalSource``
raises for the same request, rebuilt from the response (its status, and the body's ``error``,
``param`` and ``detail``), or one line for a status no error class names."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn

import httpx

from store.errors import (
    ArrayNotFound,
    InvalidCategories,
    InvalidParameter,
    InvalidPath,
    InvalidROI,
    RequestTooLarge,
    ScanCacheError,
    ScanChanged,
    ScanDamaged,
    ScanNotFound,
    Unauthorized,
    one_line,
)


def response_body(response: httpx.Response) -> dict[str, Any]:
    """The response's JSON object, or {} (a proxy's HTML page, a truncated body)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def response_detail(response: httpx.Response) -> str:
    """The server's one-line ``detail`` (a FastAPI validation list names its first field)."""
    detail = response_body(response).get("detail")
    if detail is None:
        text = response.text.strip()
        return text.splitlines()[0][:200] if text else response.reason_phrase
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = [str(p) for p in first.get("loc", []) if p not in ("query", "body", "path")]
        return f"{loc[-1] if loc else 'request'}: {first.get('msg', 'invalid')}"
    return one_line(str(detail))


_PARAM_ERRORS: dict[str, Callable[[str, str], InvalidParameter]] = {
    "InvalidROI": lambda param, msg: InvalidROI(msg, param),
    "InvalidCategories": lambda param, msg: InvalidCategories(msg, param),
}


def _param_error(error: str | None, param: str | None, detail: str) -> InvalidParameter:
    """Rebuild the parameter error the server raised: same class, param and message."""
    if not param:
        head, sep, rest = detail.partition(": ")
        param, detail = (head, rest) if sep and head and " " not in head else ("request", detail)
    elif detail.startswith(param + ": "):
        detail = detail[len(param) + 2 :]
    leaf = param.rsplit(".", 1)[-1]
    if error is None:  # an older server or a proxy: guess from the parameter's name
        error = {"roi": "InvalidROI", "categories": "InvalidCategories"}.get(leaf)
    factory = _PARAM_ERRORS.get(error or "")
    return factory(param, detail) if factory else InvalidParameter(param, detail)


def is_damaged_scan(response: httpx.Response) -> bool:
    """A 500 the server answers for a scan damaged in its store (``ScanDamaged``)."""
    return response.status_code == 500 and response_body(response).get("error") == "ScanDamaged"


class NotAScancacheServer(ScanCacheError, ValueError):
    """The URL answers, but not as a scancache server: a refusal without its JSON body."""


def raise_client_error(response: httpx.Response) -> NoReturn:
    """4xx -> the error ``LocalSource`` raises for the same request (the body's ``error`` names it)."""
    status = response.status_code
    body = response_body(response)
    detail = response_detail(response)
    error = body.get("error") if isinstance(body.get("error"), str) else None
    if not body and status in (404, 405):  # e.g. a web server's HTML page: no scan is "not found"
        request = response.request
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        raise NotAScancacheServer(
            f"{request.url.scheme}://{request.url.netloc.decode()}: {request.method} {request.url.path} "
            f"answered {status} ({kind}), not a scancache server's JSON; give the URL of `scancache serve`"
        )
    if status == 404:
        if error == "ArrayNotFound" or (error is None and "no mask" in detail):
            raise ArrayNotFound(detail)
        raise ScanNotFound(detail)
    if status == 400 and (error == "InvalidPath" or (error is None and "invalid scan id" in detail)):
        raise InvalidPath(detail)
    if status in (400, 422):
        param = body.get("param") if isinstance(body.get("param"), str) else None
        raise _param_error(error, param, detail)
    if status == 413:
        raise RequestTooLarge(detail)
    if status in (401, 403):
        # the server's words are for any client; this one takes its token from the environment
        raise Unauthorized(
            f"{detail or 'missing or wrong bearer token'} (this client sends the token in SCANCACHE_TOKEN,"
            " or HttpSource(url, token=...))"
        )
    if (status == 409 and error == "ScanChanged") or (status == 410 and error == "VersionGone"):
        raise ScanChanged(detail)
    if status == 500 and error == "ScanDamaged":
        named = re.match(r"scan '([^']*)'", detail)
        raise ScanDamaged(named[1] if named else "", "", message=detail)
    raise InvalidParameter("request", f"HTTP {status}: {detail}")

"""The statuses the middleware answers, written into every operation of ``/openapi.json``.

Routes document what they raise themselves (``error_responses``); the guards in front of them
(service/server/guards.py, auth.py) can answer any route before it runs: 400 for an encoded
slash or NUL in the raw path, 431 for oversized headers, 401 without the token (every route but
the open ones), 413 for a request body over ``--max-body-bytes`` (methods with a body), 422 for
a query parameter the route does not take (every route but the pages, ``query_check``). A client
or fuzzer reading the document must find every status it can get, so they are added here, once,
from the same lists the middleware uses, instead of by hand on each route.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.server.auth import OPEN_PATHS, OPEN_PREFIXES
from service.server.errors import DESCRIPTIONS
from service.server.query_check import PAGES

BODY_METHODS = frozenset({"post", "put", "patch"})
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorBody"}
MIDDLEWARE_DESCRIPTIONS = {
    400: DESCRIPTIONS[400],
    401: DESCRIPTIONS[401],
    413: "The request body is over the server's --max-body-bytes (refused before it is read).",
    431: "The request's headers are over the server's limit (64 KiB).",
    422: "A query parameter this route does not take (a typo must not return other data); `param` names it.",
}


def middleware_statuses(path: str, method: str) -> list[int]:
    """What the guards can answer for ``method path`` before the route runs."""
    codes = [400, 431]
    if path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
        codes.append(401)
    if method in BODY_METHODS:
        codes.append(413)
    if not path.startswith(PAGES):  # service.server.query_check
        codes.append(422)
    return codes


def add_middleware_statuses(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (an OpenAPI dict) with the guards' statuses in every operation that lacks them."""
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for code in middleware_statuses(path, method):
                responses.setdefault(
                    str(code),
                    {
                        "description": MIDDLEWARE_DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    },
                )
    return document


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json`` and /docs) include the guards' statuses."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            app.openapi_schema = add_middleware_statuses(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""``GET /viewer``: a page to look at the store, served by the app itself (no CDN, offline).

Plain HTML, JS and CSS shipped as package data (``service/server/static``); the page reads the
REST API (scans with filters, metadata with Dice, ``preview.png``). The page and its files hold
no data, so they need no token; the page sends the token the user types to every API call.
``colors.json`` is made from ``store.ome.CLASS_COLORS``, so the legend shows the colours the
previews and the OME label metadata use.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from service.server.errors import error_responses
from store.errors import ArrayNotFound
from store.ome import CLASS_COLORS

router = APIRouter(tags=["viewer"])

STATIC_PREFIX = "/viewer/static/"
STATIC_FILES = {"viewer.js": "text/javascript", "viewer.css": "text/css", "colors.json": "application/json"}
NO_CACHE = {"Cache-Control": "no-cache"}
# What the page uses, nothing more: its own script and style sheet (no inline script or style
# element), the API through fetch, previews as blob: URLs, the empty data: favicon. Styles set
# from the script (element.style) are not inline style and need no 'unsafe-inline'.
VIEWER_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _static(name: str) -> bytes:
    if name == "colors.json":  # the legend's colours: class k is drawn in CLASS_COLORS[k]
        return json.dumps([list(rgb) for rgb in CLASS_COLORS]).encode()
    return resources.files("service.server").joinpath("static", name).read_bytes()


@router.get(
    "/viewer",
    summary="The viewer page: scans with filters, a slice slider and axis, overlays, Dice",
    response_class=Response,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "The page."}},
)
async def viewer_page() -> Response:
    headers = {**NO_CACHE, "Content-Security-Policy": VIEWER_CSP}
    return Response(_static("viewer.html"), media_type="text/html; charset=utf-8", headers=headers)


@router.get(
    "/viewer/static/{name}",
    summary="The viewer's script, style sheet and class colours (`colors.json`: RGB of class k at k)",
    response_class=Response,
    responses={200: {"description": "The file."}, **error_responses(404)},
)
async def viewer_static(
    name: Annotated[str, Path(description="`viewer.js`, `viewer.css` or `colors.json`")],
) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:  # a fixed list: nothing else of the package is reachable
        raise ArrayNotFound(f"no viewer file {name!r}")
    return Response(_static(name), media_type=f"{media_type}; charset=utf-8", headers=NO_CACHE)

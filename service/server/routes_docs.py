"""``/docs`` and ``/redoc`` with their scripts served by the app itself: they work offline.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without internet
access (a cluster node, an air-gapped site) ``/docs`` stays blank. The files come from the
``fastapi-offline`` package (Swagger UI 5, which renders FastAPI's OpenAPI 3.1, and ReDoc);
only its ``static`` folder is used, through a fixed list of names.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse, Response

from store.errors import ArrayNotFound

ASSETS_PREFIX = "/docs/assets/"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# the files change only with the installed package: cached a day, revalidated after
CACHE = {"Cache-Control": "public, max-age=86400"}


@cache
def assets_folder() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError('the /docs page needs fastapi-offline: pip install -e ".[service]"')
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@cache
def _asset(name: str) -> bytes:  # about 3 MB in all, read once
    return (assets_folder() / name).read_bytes()


def add_docs_routes(app: FastAPI) -> None:
    """``/docs`` (Swagger UI), its OAuth2 redirect, ``/redoc`` and ``/docs/assets/{name}``;
    create the app with ``docs_url=None, redoc_url=None``."""
    assets_folder()  # fails at startup, in one line, rather than with a blank page
    router = APIRouter(include_in_schema=False)
    openapi_url = str(app.openapi_url)
    redirect_url = str(app.swagger_ui_oauth2_redirect_url)

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}",
            swagger_js_url=f"{root}{ASSETS_PREFIX}swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PREFIX}swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PREFIX}favicon.png",
        )

    @router.get(redirect_url)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PREFIX}redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PREFIX}favicon.png",
            with_google_fonts=False,
        )

    @router.get(ASSETS_PREFIX + "{name}")
    async def asset(name: Annotated[str, PathParam()]) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:  # a fixed list: nothing else of the package is reachable
            raise ArrayNotFound(f"no docs file {name!r}")
        return Response(_asset(name), media_type=media_type, headers=CACHE)

    app.include_router(router)

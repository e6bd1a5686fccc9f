"""``create_app(settings)``: the FastAPI application serving one store.

Request path, outermost first: store id and nosniff headers -> CORS (only if configured) ->
metrics -> bearer auth -> path guard -> body limit -> FastAPI routing and error handlers -> routes. The app holds a ``LocalSource``
(whose tensorstore context owns the byte-capped decoded-chunk cache) and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from client.wire import STORE_HEADER, VERSIONS_HEADER
from service.server.auth import BearerAuthMiddleware
from service.server.errors import error_response, error_responses, install_error_handlers
from service.server.guards import (
    BodyLimitMiddleware,
    HeadAsGetMiddleware,
    HeadersMiddleware,
    PathGuardMiddleware,
    UnexpectedErrorMiddleware,
    nosniff_header,
    store_id_header,
)
from service.server.inflight import InflightBudget
from service.server.metrics import Metrics, MetricsMiddleware
from service.server.openapi_statuses import install_openapi
from service.server.params import UnsupportedEncoding
from service.server.query_check import refuse_unknown_query
from service.server.routes_docs import add_docs_routes
from service.server.routes_predictions import router as predictions_router
from service.server.routes_preview import router as preview_router
from service.server.routes_regions import router as regions_router
from service.server.routes_scans import router as scans_router
from service.server.routes_viewer import router as viewer_router
from service.server.settings import Settings
from service.server.state import ServerState, server_state
from service.server.zarr_http import router as zarr_router
from service.version import package_version
from store.predictions import PredictionStore, check_predictions_root
from store.source import LocalSource

log = logging.getLogger("scancache.server")

DESCRIPTION = """\
Serves a scancache store (Zarr v3, one group per scan) to training jobs on other machines.

* `GET /scans`, `GET /scans/{scan_id}`: metadata as JSON.
* `GET /scans/{scan_id}/image|mask?roi=...`: one region as `.npy` (`application/x-npy`).
* `POST /batch`: many regions in one round trip (`application/x-npy-stream`: concatenated `.npy`).
* `GET /scans/{scan_id}/prediction[/label_map]?roi=...`: the stored prediction (`--predictions`).
* `GET /scans/{scan_id}/preview.png?z=K&axis=z&overlay=none|mask|prediction`: a slice as PNG.
* `GET /viewer`: a page to look at scans, masks and predictions in a browser.
* `GET /zarr/{path}`: the store itself, read-only Zarr v3 with HTTP Range (tensorstore, zarr-python).

Errors are `{"detail": "<one line>", "error": "<class>", "param": "<name>"}`. When the server has a
token (`SCANCACHE_TOKEN`), every route but `/health` needs `Authorization: Bearer <token>`.
"""


def close_app(app: FastAPI) -> None:
    """Release what ``create_app`` opened (its store reader) without serving it."""
    app.state.scancache.source.close()


def create_app(settings: Settings) -> FastAPI:
    # Fails fast, in one line, on a missing store or one of another format (store.format).
    source = LocalSource(settings.store, cache_bytes=settings.cache_bytes)
    metrics = Metrics(settings.cache_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info("serving %d scans, chunk cache %d bytes", len(source.scan_ids()), settings.cache_bytes)
        try:
            yield
        finally:
            source.close()

    app = FastAPI(
        title="scancache",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc without a CDN: routes_docs
        redoc_url=None,
        dependencies=[Depends(refuse_unknown_query)],
    )
    add_docs_routes(app)
    install_openapi(app)
    inflight = InflightBudget(settings.max_inflight_bytes, settings.inflight_wait)
    app.state.scancache = ServerState(settings=settings, source=source, metrics=metrics, inflight=inflight)
    install_error_handlers(app)

    async def on_encoding(_: Request, exc: Exception) -> JSONResponse:
        # an InvalidParameter (the client raises that), answered 415 (RFC 9110 15.5.16)
        assert isinstance(exc, UnsupportedEncoding)
        return error_response(UnsupportedEncoding.status, str(exc), "InvalidParameter", exc.param)

    app.add_exception_handler(UnsupportedEncoding, on_encoding)
    app.include_router(scans_router)
    app.include_router(regions_router)
    app.include_router(zarr_router)
    # predictions, previews and the viewer page (scancache serve --predictions PRED)
    app.state.predictions = open_predictions(settings.predictions)
    app.include_router(predictions_router)
    app.include_router(preview_router)
    app.include_router(viewer_router)

    @app.get(
        "/metrics",
        tags=["service"],
        summary="Prometheus metrics of this worker process",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format.",
            },
            **error_responses(401),
        },
    )
    async def get_metrics(state: Annotated[ServerState, Depends(server_state)]) -> Response:
        return Response(
            state.metrics.render(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"}
        )

    # add_middleware puts each new one outermost: add innermost first.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(PathGuardMiddleware)
    if settings.token:
        app.add_middleware(BearerAuthMiddleware, token=settings.token)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Authorization", "Range", "If-None-Match", "Content-Type"],
            expose_headers=[
                "Content-Range",
                "Accept-Ranges",
                "ETag",
                "Content-Length",
                "Content-Encoding",
                STORE_HEADER,
                VERSIONS_HEADER,
            ],
        )
    store_id = store_id_header(lambda: source.store_id)
    # outermost, one layer for both: CORS preflights carry them too
    app.add_middleware(HeadersMiddleware, headers=lambda: [*store_id(), *nosniff_header()])
    return app


def open_predictions(path: Path | str | None) -> PredictionStore | None:
    """The ``--predictions`` store, checked at startup like the scan store."""
    if path is None:
        return None
    check_predictions_root(path)
    return PredictionStore(path)


def app_from_env() -> FastAPI:
    """The app factory uvicorn workers import (``--workers N``): settings from ``SCANCACHE_*``."""
    return create_app(Settings.from_env())

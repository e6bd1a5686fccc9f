"""Request parameters the routers share: typed annotations, their descriptions, the ``.npy``
response documentation and the request-body guard.

Routers import these and never each other: each receives what it needs (the server state, the
predictions store) through these dependencies, as xpublish's routers do.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request

from client.wire import NPY_MEDIA_TYPE
from service.server.errors import ErrorBody, error_responses, unaccepted_encoding
from service.server.state import ServerState, server_state
from store.errors import InvalidParameter
from store.predictions import PredictionStore

ROI_DOC = (
    "Region `y0:y1,x0:x1,z0:z1`: each axis is numpy slice syntax (`a:b`, `:`, `a:`, `:b`, negative "
    "bounds allowed) or an index `k` (kept as length 1); missing axes, or no `roi`, mean the whole "
    "axis. Empty or out-of-bounds regions are refused (422), never clamped."
)
CATEGORIES_DOC = (
    "JSON list of classes to return, in order; a sub-list merges classes into one channel "
    "(MedSegPy `CATEGORIES`), e.g. `[0,[1,2],3]`. A class is its index or its name (one of the "
    'scan\'s `class_names`), e.g. `["liver",["kidney",2]]`. Default: every class.'
)
BACKGROUND_DOC = "Prepend a channel that is 1 where none of the selected categories is set."
SCAN_ID_DOC = "Scan id, e.g. `0000001_V00-Aug00`."

NPY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}


def npy_response_doc(what: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": f"{what} as a `.npy` file (`numpy.load(io.BytesIO(body))`). Carries an ETag.",
            "content": {NPY_MEDIA_TYPE: NPY_SCHEMA},
        },
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 409, 413, 422, 503),
    }


def prediction_store(request: Request) -> PredictionStore | None:
    """The app's predictions store, or None when served without ``--predictions``."""
    return getattr(request.app.state, "predictions", None)


State = Annotated[ServerState, Depends(server_state)]
Predictions = Annotated[PredictionStore | None, Depends(prediction_store)]
ScanId = Annotated[str, Path(description=SCAN_ID_DOC)]
Roi = Annotated[str | None, Query(description=ROI_DOC, examples=["0:64,0:64,4:12"])]


class UnsupportedEncoding(InvalidParameter):
    """A request body sent with a Content-Encoding other than identity: 415 (app.py)."""

    status = 415


ENCODING_DOC: dict[int | str, dict[str, Any]] = {
    415: {
        "model": ErrorBody,
        "description": "The body was sent with a `Content-Encoding` other than identity: send plain JSON.",
    }
}


def refuse_encoded_body(request: Request) -> None:
    """Dependency of routes with a JSON body: a ``Content-Encoding`` other than identity is
    refused (415) even when the body happens to be plain JSON, rather than read as if it were
    not encoded. (A body that does not decode at all is refused alike, errors.py.)"""
    refused = unaccepted_encoding(request)
    if refused is not None:
        raise UnsupportedEncoding("body", refused)

"""Prediction routes: a scan's stored probabilities and label map as ``.npy`` (``--predictions``).

The predictions store (``store.predictions``, written by ``loaders.write_predictions``) is
served beside the scans: the same scan ids, the same ``roi`` syntax, byte limit, ETags, errors
and authentication as the image and mask routes. A scan without a prediction (or a server
started without ``--predictions``) answers 404.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Request
from starlette.responses import Response

from client.wire import NPY_MEDIA_TYPE, encode_npy_parts
from service.server.http_cache import REVALIDATE, make_etag
from service.server.params import Predictions, Roi, ScanId, State, npy_response_doc
from service.server.responses import Parts, budgeted_response
from service.server.state import ServerState
from store.errors import RequestTooLarge
from store.format import validate_scan_id
from store.predictions import LABEL_MAP, PROBABILITIES, PredictionStore, check_prediction
from store.roi import format_roi, parse_roi

router = APIRouter(tags=["predictions"])


async def prediction_response(
    request: Request,
    state: ServerState,
    store: PredictionStore | None,
    scan_id: str,
    array: str,
    roi: str | None,
) -> Response:
    validate_scan_id(scan_id)

    def plan() -> tuple[tuple[slice, ...], tuple[int, ...], str]:
        meta = state.source.metadata(scan_id)  # 404 for an unknown scan, as every scan route
        check_prediction(store, scan_id, meta.shape, array, meta.version)
        assert store is not None
        shape = store.shape(scan_id, array)
        region = parse_roi(roi, shape[:3])
        return region, shape, store.version(scan_id)

    region, shape, version = await to_thread.run_sync(plan)
    itemsize = 2 if array == PROBABILITIES else 1
    out_shape = tuple(s.stop - s.start for s in region) + shape[3:]
    nbytes = math.prod(out_shape) * itemsize
    if nbytes > state.settings.max_bytes:
        raise RequestTooLarge(
            f"the region needs {nbytes} bytes, over the server's limit of {state.settings.max_bytes} bytes"
            " (--max-bytes); request smaller regions"
        )
    etag = make_etag("prediction", scan_id, version, array, format_roi(region))

    def read() -> tuple[Parts, Mapping[str, str]]:
        assert store is not None
        data: np.ndarray = store.read(scan_id, array, region)
        return encode_npy_parts(data), {}

    # Held like a region's bytes (routes_regions): from before the read until the client has them.
    return await budgeted_response(
        request,
        state.inflight,
        etag=etag,
        cost=nbytes,
        produce=read,
        media_type=NPY_MEDIA_TYPE,
        headers={"ETag": etag, "Cache-Control": REVALIDATE},
    )


@router.get(
    "/scans/{scan_id}/prediction",
    summary="A region of the stored prediction's probabilities as float16 .npy, shape (h, w, d, C)",
    response_class=Response,
    responses=npy_response_doc(
        "The probabilities (h, w, d, C) as float16; 404 where the scan has no prediction"
    ),
)
async def get_prediction(
    request: Request, state: State, store: Predictions, scan_id: ScanId, roi: Roi = None
) -> Response:
    return await prediction_response(request, state, store, scan_id, PROBABILITIES, roi)


@router.get(
    "/scans/{scan_id}/prediction/label_map",
    summary="A region of the stored prediction's label map as uint8 .npy, shape (h, w, d)",
    response_class=Response,
    responses=npy_response_doc("The label map (h, w, d) as uint8: 0 = no class, k+1 = category k"),
)
async def get_prediction_label_map(
    request: Request, state: State, store: Predictions, scan_id: ScanId, roi: Roi = None
) -> Response:
    return await prediction_response(request, state, store, scan_id, LABEL_MAP, roi)

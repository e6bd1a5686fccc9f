"""Prediction routes: a scan's stored probabilities and label map as ``.npy`` (``--predictions``).

The predictions store (``store.predictions``, written by ``loaders.write_predictions``) is
served beside the scans: the same scan ids, the same ``roi`` syntax, byte limit, ETags, errors
and authentication as the image and mask routes. A scan without a prediction (or a server
started without ``--predictions``) answers 404.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeGuard

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from client.wire import NPY_MEDIA_TYPE, encode_npy_parts
from service.server.http_cache import REVALIDATE, etag_matches, make_etag
from service.server.responses import PartsResponse, not_modified
from service.server.routes_regions import ROI_DOC, SCAN_ID_DOC, npy_response_doc
from service.server.state import ServerState, server_state
from store.errors import PredictionMismatch, RequestTooLarge
from store.format import validate_scan_id
from store.predictions import LABEL_MAP, PROBABILITIES, PredictionStore, require_prediction
from store.roi import format_roi, parse_roi

router = APIRouter(tags=["predictions"])

State = Annotated[ServerState, Depends(server_state)]
ScanId = Annotated[str, Path(description=SCAN_ID_DOC)]
Roi = Annotated[str | None, Query(description=ROI_DOC, examples=["0:64,0:64,4:12"])]


def prediction_store(request: Request) -> PredictionStore | None:
    """The app's predictions store, or None when served without ``--predictions``."""
    return getattr(request.app.state, "predictions", None)


Predictions = Annotated[PredictionStore | None, Depends(prediction_store)]


def prediction_fields(
    store: PredictionStore | None, scan_id: str, scan_shape: Any, scan_version: str | None = None
) -> dict[str, Any]:
    """What a scan's metadata says of its prediction: ``has_prediction``, ``prediction_dice``
    (per category) and ``prediction_class_names`` (the categories' names, parallel to the Dice
    and to the label map's values 1, 2, ...; null for predictions written before names were
    recorded). A prediction that does not fit the scan (written for other data: the
    prediction routes answer 409) is not the scan's: no prediction, no Dice."""
    attrs = None if store is None else store.attrs(scan_id)
    if attrs is not None and prediction_mismatch(attrs, scan_id, tuple(scan_shape), scan_version) is not None:
        attrs = None
    names = None if attrs is None else attrs.get("class_names")
    dice = None if attrs is None else attrs.get("dice")
    return {
        "has_prediction": attrs is not None,
        # a list or null, as documented: the viewer maps over it (a hand-edited store may hold anything)
        "prediction_dice": dice if isinstance(dice, list) else None,
        "prediction_class_names": names if isinstance(names, list) else None,
    }


def _dims(shape: Any) -> str:
    return "x".join(str(n) for n in shape)


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def prediction_mismatch(
    attrs: dict[str, Any], scan_id: str, scan_shape: tuple[int, ...], scan_version: str | None = None
) -> str | None:
    """Why a prediction's attributes do not fit the scan (None: they do): its (H, W, D) must be
    the scan's, or (H, W, len(slices)) with every slice inside the scan, and where it records the
    scan version it was predicted from, that version must be the one served (another store's
    scan of the same id and shape, or a scan converted again since, is other data)."""
    shape, channels, slices = attrs.get("shape"), attrs.get("channels"), attrs.get("slices")
    if not (
        _ints(shape)
        and len(shape) == 3
        and min(shape) > 0
        and isinstance(channels, int)
        and channels > 0
        and (slices is None or _ints(slices))
    ):
        return (
            f"scan {scan_id!r}: the stored prediction's attributes (shape, channels, slices) are malformed;"
            " re-run write_predictions for it (overwrite=True)"
        )
    height, width, depth = (int(n) for n in scan_shape[:3])
    expected = [height, width, len(slices) if slices else depth]
    if shape != expected:
        what = f"{len(slices)} slices of " if slices else ""
        return (
            f"scan {scan_id!r}: the stored prediction is {_dims(shape)}, but the scan is {_dims(scan_shape[:3])}"
            f"{' (' + what + 'it)' if what else ''}; it was written for other data: re-run"
            " write_predictions for it (overwrite=True)"
        )
    if slices and (len(set(slices)) != len(slices) or not all(0 <= z < depth for z in slices)):
        return (
            f"scan {scan_id!r}: the stored prediction names slices that are not the scan's 0..{depth - 1}"
            " (or repeats one); re-run write_predictions for it (overwrite=True)"
        )
    predicted_from = attrs.get("scan_version")
    if isinstance(predicted_from, str) and scan_version is not None and predicted_from != scan_version:
        return (
            f"scan {scan_id!r}: the stored prediction was made from another version of the scan "
            "(another store's, or this scan before it was converted again); re-run write_predictions: "
            "it predicts such scans again"
        )
    return None


def check_prediction(
    store: PredictionStore | None,
    scan_id: str,
    scan_shape: tuple[int, ...],
    array: str,
    scan_version: str | None = None,
) -> dict[str, Any]:
    """The scan's prediction attributes, refused in one line (409) unless the prediction fits
    the scan: its (H, W, D) is the scan's, or (H, W, len(slices)) with every slice inside the
    scan, and the stored array has the shape the attributes say. A prediction written against
    another store with the same scan ids must not be overlaid, nor read past its bounds (500)."""
    attrs = require_prediction(store, scan_id)
    assert store is not None
    why = prediction_mismatch(attrs, scan_id, scan_shape, scan_version)
    if why is not None:
        raise PredictionMismatch(why)
    stored = store.stored_shape(scan_id, array)
    want = store.shape(scan_id, array)
    if stored != want:
        raise PredictionMismatch(
            f"scan {scan_id!r}: the stored prediction's {array} is {_dims(stored)}, but its attributes"
            f" say {_dims(want)}; re-run write_predictions for it (overwrite=True)"
        )
    return attrs


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
    if etag_matches(request.headers.get("if-none-match"), etag):
        return not_modified(etag)

    def read() -> list[bytes | memoryview]:
        assert store is not None
        data: np.ndarray = store.read(scan_id, array, region)
        return encode_npy_parts(data)

    # Held like a region's bytes (routes_regions): from before the read until the client has them.
    release = await state.inflight.acquire(nbytes)
    try:
        parts = await to_thread.run_sync(read)
    except BaseException:
        release()
        raise
    headers = {"ETag": etag, "Cache-Control": REVALIDATE}
    return PartsResponse(parts, NPY_MEDIA_TYPE, headers=headers, on_close=release)


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

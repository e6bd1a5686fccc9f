"""``GET /scans/{scan_id}/preview.png``: one slice rendered as a PNG, optionally with an overlay.

Reading goes through the app's ``LocalSource`` (image, mask) and predictions store (label map);
rendering is ``service.preview`` (pure). Same auth, errors, byte limit and ETags as the data
routes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service import preview
from service.server.errors import error_responses
from service.server.http_cache import REVALIDATE, make_etag
from service.server.params import Predictions, ScanId, State
from service.server.responses import Parts, budgeted_response
from store.errors import ArrayNotFound, RequestTooLarge
from store.format import validate_scan_id
from store.predictions import LABEL_MAP, PredictionStore, check_prediction

router = APIRouter(tags=["previews"])


def _prediction_plane(
    store: PredictionStore | None,
    scan_id: str,
    shape: tuple[int, int, int],
    axis: str,
    index: int,
    scan_version: str | None = None,
) -> tuple[np.ndarray, int]:
    """The prediction's label-map plane in the scan's geometry, and its number of categories.

    A prediction of some slices only (a per-slice dataset) stores those slices: other slices
    have no prediction (404 along z; empty columns along y and x)."""
    attrs = check_prediction(
        store, scan_id, shape, LABEL_MAP, scan_version
    )  # again: it may have been re-published
    assert store is not None
    categories = int(attrs["channels"]) - int(bool(attrs.get("include_background")))
    slices = attrs.get("slices")
    if not slices:
        region = preview.plane_region(shape, axis, index)
        return preview.take_plane(store.read(scan_id, LABEL_MAP, region), axis), categories
    if axis == "z":
        if index not in slices:
            raise ArrayNotFound(f"scan {scan_id!r} has no prediction for slice {index}")
        stored = (shape[0], shape[1], len(slices))
        region = preview.plane_region(stored, "z", slices.index(index))
        return preview.take_plane(store.read(scan_id, LABEL_MAP, region), "z"), categories
    stored = (shape[0], shape[1], len(slices))
    part = preview.take_plane(store.read(scan_id, LABEL_MAP, preview.plane_region(stored, axis, index)), axis)
    full = np.zeros((part.shape[0], shape[2]), np.uint8)
    full[:, slices] = part
    return full, categories


@router.get(
    "/scans/{scan_id}/preview.png",
    summary="Slice z along an axis as a PNG, with the mask or the prediction overlaid",
    response_class=Response,
    responses={
        200: {
            "description": (
                "A PNG of the plane, (rows, columns) = (y, x) for `axis=z`, (x, z) for `axis=y`, (y, z) for"
                " `axis=x`, times `scale`; class k drawn in colour k. Carries an ETag."
            ),
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 409, 413, 422, 503),
    },
)
async def get_preview(
    request: Request,
    state: State,
    store: Predictions,
    scan_id: ScanId,
    z: Annotated[int | None, Query(description="Slice index along `axis` (default: the middle one)")] = None,
    axis: Annotated[Literal["z", "y", "x"], Query(description="The axis the slice is taken across")] = "z",
    overlay: Annotated[
        Literal["none", "mask", "prediction"], Query(description="Draw the mask or the prediction's labels")
    ] = "none",
    scale: Annotated[int, Query(description="Whole magnification, 1..8", ge=1, le=preview.MAX_SCALE)] = 1,
    window: Annotated[
        str | None, Query(description="Intensity window `lo,hi`; default: the scan's stored mean +- 3 std")
    ] = None,
) -> Response:
    validate_scan_id(scan_id)
    window_given = preview.parse_window(window)
    meta = await to_thread.run_sync(state.source.metadata, scan_id)
    index = meta.shape[preview.AXES[axis]] // 2 if z is None else z
    region = preview.plane_region(meta.shape, axis, index)
    rows, cols = (n for i, n in enumerate(meta.shape) if i != preview.AXES[axis])
    if rows * cols * 3 * scale * scale > state.settings.max_bytes:
        raise RequestTooLarge(
            f"scale: a {scale}x preview is over the server's limit of {state.settings.max_bytes} bytes"
        )
    if scale > 1 and rows * cols * scale * scale > preview.MAX_PREVIEW_PIXELS:  # the raster on its own
        side = preview.MAX_PREVIEW_SIDE
        raise RequestTooLarge(
            f"scale: a {scale}x preview of this {rows}x{cols} slice is {rows * scale}x{cols * scale} pixels,"
            f" over the server's limit of {side}x{side} ({preview.MAX_PREVIEW_PIXELS}) pixels;"
            " ask a smaller scale"
        )
    if overlay == "mask" and not meta.has_mask:
        raise ArrayNotFound(f"scan {scan_id!r} has no mask")
    versions = [state.source.version(scan_id)]
    if overlay == "prediction":  # 404 without one, 409 if it does not fit this scan
        await to_thread.run_sync(check_prediction, store, scan_id, meta.shape, LABEL_MAP)
        assert store is not None
        versions.append(store.version(scan_id))
    etag = make_etag("preview", scan_id, *versions, axis, index, overlay, scale, window_given)

    def render() -> tuple[Parts, Mapping[str, str]]:
        plane = preview.take_plane(state.source.read_image(scan_id, region), axis)
        classes = None
        if overlay == "mask":
            classes = preview.take_plane(state.source.read_mask(scan_id, region), axis)
        elif overlay == "prediction":
            labels, categories = _prediction_plane(store, scan_id, meta.shape, axis, index, meta.version)
            classes = preview.labels_to_classes(labels, categories)
        chosen = window_given or preview.default_window(meta.attrs.get("intensity"), plane)
        return [preview.render_png(plane, chosen, classes, scale)], {}

    # The planes read (image; mask, or labels and their classes: counted twice over, for a copy
    # on reading) and the render's own peak (raster, PNG, one strip's work: measured, see
    # service.preview), held in the in-flight budget like a region's bytes until the PNG is sent.
    classes = 2 * meta.num_classes + 2 if overlay != "none" else 0
    cost = preview.render_peak_bytes(rows, cols, np.dtype(meta.dtype).itemsize, classes, scale)
    return await budgeted_response(
        request,
        state.inflight,
        etag=etag,
        cost=cost,
        produce=render,
        media_type="image/png",
        headers={"ETag": etag, "Cache-Control": REVALIDATE},
    )

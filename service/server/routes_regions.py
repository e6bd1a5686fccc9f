"""Region routes: one image or mask region as ``.npy``, or a whole batch as an ``.npy`` stream.

Each request is planned first (validated, sized, tagged from metadata only), then refused (413),
answered from the client's copy (304), or read. Metadata lookups, reads and compression run in
worker threads so the event loop only moves bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Annotated, Any

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from client.wire import (
    DECODED_BYTES_HEADER,
    NPY_MEDIA_TYPE,
    NPY_STREAM_MEDIA_TYPE,
    VERSIONS_HEADER,
    encode_npy_parts,
    versions_header,
)
from service.server.errors import error_responses
from service.server.http_cache import (
    MASK_GZIP_MIN_BYTES,
    REVALIDATE,
    accepts_gzip,
    gzip_etag,
    gzip_parts,
    make_etag,
)
from service.server.params import (
    BACKGROUND_DOC,
    CATEGORIES_DOC,
    ENCODING_DOC,
    NPY_SCHEMA,
    ROI_DOC,
    SCAN_ID_DOC,
    Roi,
    ScanId,
    State,
    npy_response_doc,
    refuse_encoded_body,
)
from service.server.regions import RegionPlan, check_budget, plan_region
from service.server.responses import Parts, budgeted_response
from service.server.state import ServerState
from store.errors import RequestTooLarge, ScanChanged
from store.format import IMAGE, MASK, channel_array, channel_of
from store.label_map import LabelRegion, merged

router = APIRouter(tags=["regions"])


async def _plan(state: ServerState, *args: Any, **kwargs: Any) -> RegionPlan:
    plan = await to_thread.run_sync(partial(plan_region, state.source, *args, **kwargs))
    check_budget([plan], state.settings.max_bytes)
    return plan


def _encode(arr: np.ndarray, gzip: bool) -> list[bytes | memoryview]:
    parts = encode_npy_parts(arr)
    return [gzip_parts(parts, 1)] if gzip else parts


async def region_response(request: Request, state: ServerState, plan: RegionPlan) -> Response:
    """The ``.npy`` of one planned region, or 304 if the client's ETag is current."""
    gzip = (
        plan.array == MASK
        and state.settings.compress_masks
        and plan.out_bytes >= MASK_GZIP_MIN_BYTES
        and accepts_gzip(request.headers.get("accept-encoding"))
    )
    # A 304 carries the ETag of the representation a 200 would have sent (RFC 9110 15.4.5).
    etag = gzip_etag(make_etag(plan.tag())) if gzip else make_etag(plan.tag())

    def read_and_encode() -> tuple[Parts, Mapping[str, str]]:
        # the version planned (shape checked, ETag): a re-publish since is the client's to see
        arrays, decoded, versions = state.source.read_versioned(
            [replace(plan.request(), version=plan.version)]
        )
        parts = _encode(merged(arrays[0]), gzip)
        state.metrics.region_bytes.labels(_metric_array(plan.array)).inc(plan.out_bytes)
        more = {DECODED_BYTES_HEADER: str(decoded), VERSIONS_HEADER: versions_header(versions) or ""}
        if gzip:
            more["Content-Encoding"] = "gzip"
        return parts, more

    return await budgeted_response(
        request,
        state.inflight,
        etag=etag,
        cost=plan.cost,
        produce=read_and_encode,
        media_type=NPY_MEDIA_TYPE,
        headers={"ETag": etag, "Cache-Control": REVALIDATE, "Vary": "Accept-Encoding"},
        vary="Accept-Encoding",
    )


def _metric_array(array: str) -> str:
    """The metrics' ``array`` label: every image channel counts as ``image`` (few series)."""
    return IMAGE if channel_of(array) is not None else array


@router.get(
    "/scans/{scan_id}/image",
    summary="An image region as .npy in the stored dtype, shape (h, w, d)",
    response_class=Response,
    responses=npy_response_doc("The image region (h, w, d) in the stored dtype"),
)
async def get_image(
    request: Request,
    state: State,
    scan_id: ScanId,
    roi: Roi = None,
    channel: Annotated[
        int,
        # le: the most image_c{k} arrays name (store.format); a larger one is a bad parameter (422),
        # not a missing array named `image_c10000`, a name the client never gave
        Query(
            ge=0,
            le=9999,
            description="Image channel of a multi-channel scan (its `channels` attribute); 0 first.",
        ),
    ] = 0,
) -> Response:
    plan = await _plan(state, scan_id, channel_array(channel), roi)
    return await region_response(request, state, plan)


@router.get(
    "/scans/{scan_id}/mask",
    summary="A mask region as uint8 .npy, shape (h, w, d, C')",
    response_class=Response,
    responses=npy_response_doc("The mask region (h, w, d, C') as uint8"),
)
async def get_mask(
    request: Request,
    state: State,
    scan_id: ScanId,
    roi: Roi = None,
    categories: Annotated[str | None, Query(description=CATEGORIES_DOC, examples=["[0,[1,2],3]"])] = None,
    background: Annotated[bool, Query(description=BACKGROUND_DOC)] = False,
) -> Response:
    plan = await _plan(state, scan_id, MASK, roi, categories, background)
    return await region_response(request, state, plan)


def _wire(arr: np.ndarray, slice_major: bool) -> np.ndarray:
    """What goes on the wire: a 3-D region asked ``slice_major`` as (d, h, w) (the read left it
    so in memory: no copy), anything else as it is."""
    return np.moveaxis(arr, 2, 0) if slice_major and arr.ndim == 3 else arr


class RegionSpec(BaseModel):
    """One region of a batch; the same parameters as the single-region routes."""

    model_config = ConfigDict(extra="forbid")

    scan_id: str = Field(description=SCAN_ID_DOC)
    array: str = Field(
        IMAGE,
        description=(
            "`image`, `mask`, or image channel k >= 1 of a multi-channel scan as `image_c{k}` "
            "(`image` is channel 0; the scan's `channels` attribute counts them)."
        ),
    )
    roi: str | None = Field(None, description=ROI_DOC)
    # a JSON list, or the same text the GET routes take (`"liver,kidney+2"`): one parser for both
    categories: list[Any] | str | None = Field(None, description=CATEGORIES_DOC + " Masks only.")
    background: bool = Field(False, description=BACKGROUND_DOC + " Masks only.")
    slice_major: bool = Field(
        False,
        description=(
            "Send an image or label-map payload as (d, h, w), each z slice contiguous, for a client "
            "that uses the region slice by slice (the server reads it so at no cost). Merged masks "
            "are sent as (h, w, d, C') regardless."
        ),
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    regions: list[RegionSpec] = Field(description="The regions, answered in this order.")
    label_maps: bool = Field(
        False,
        description=(
            "Send a mask region of a scan stored with a label map as two payloads: the label map "
            "(h, w, d) uint8 and the (C + 1, C') uint8 table whose row `label` is that voxel's "
            "output channels; the mask is `table[labels]`. A fifth of the bytes at 4 categories "
            "plus background, and the merge runs on the client. Other mask regions are sent merged."
        ),
    )


@router.post(
    "/batch",
    summary="Many regions in one round trip, as a stream of .npy payloads in request order",
    response_class=Response,
    responses={
        200: {
            "description": (
                "The regions' `.npy` payloads concatenated in request order (`client.wire.decode_npy_stream`); "
                "each header states its shape and dtype. Image regions are (h, w, d) in the stored dtype, "
                "mask regions (h, w, d, C') uint8."
            ),
            "content": {NPY_STREAM_MEDIA_TYPE: NPY_SCHEMA},
        },
        **error_responses(400, 401, 404, 409, 413, 422, 503),
        **ENCODING_DOC,
    },
    dependencies=[Depends(refuse_encoded_body)],
)
async def post_batch(request: Request, state: State, batch: BatchRequest) -> Response:
    limit = state.settings.max_batch_regions
    if len(batch.regions) > limit:
        raise RequestTooLarge(f"regions: {len(batch.regions)} regions, over the server's limit of {limit}")

    def plan_all() -> list[RegionPlan]:
        return [
            plan_region(
                state.source, r.scan_id, r.array, r.roi, r.categories, r.background, prefix=f"regions[{i}]."
            )
            for i, r in enumerate(batch.regions)
        ]

    plans = await to_thread.run_sync(plan_all)
    total = check_budget(plans, state.settings.max_bytes)

    def read_planned(plans: list[RegionPlan]) -> tuple[list[Any], int, dict[str, str]]:
        requests = [
            replace(p.request(), slice_major=r.slice_major, version=p.version)
            for p, r in zip(plans, batch.regions, strict=True)
        ]
        return state.source.read_versioned(requests)

    def read_all() -> tuple[Parts, Mapping[str, str]]:
        nonlocal plans
        try:
            arrays, decoded, versions = read_planned(plans)
        except ScanChanged:
            # re-published between this request's plan and its read: the batch names no version,
            # so it is read again at the current ones (what the versions header then says; a
            # client that planned with another checks it), within the budget already held
            plans = plan_all()
            if check_budget(plans, state.settings.max_bytes) > total:
                raise
            arrays, decoded, versions = read_planned(plans)
        parts: Parts = []
        for arr, spec in zip(arrays, batch.regions, strict=True):
            if isinstance(arr, LabelRegion) and batch.label_maps:
                parts += encode_npy_parts(_wire(arr.labels, spec.slice_major)) + encode_npy_parts(arr.table)
            else:
                parts += encode_npy_parts(_wire(merged(arr), spec.slice_major))
        for plan in plans:
            state.metrics.region_bytes.labels(_metric_array(plan.array)).inc(plan.out_bytes)
        more = {DECODED_BYTES_HEADER: str(decoded)}
        listed = versions_header(versions)  # past MAX_VERSIONED_SCANS scans: not sent
        if listed is not None:
            more[VERSIONS_HEADER] = listed
        return parts, more

    return await budgeted_response(
        request,
        state.inflight,
        etag=None,  # a stream of many regions: never cached
        cost=total,
        produce=read_all,
        media_type=NPY_STREAM_MEDIA_TYPE,
        headers={"Cache-Control": "no-store"},
    )

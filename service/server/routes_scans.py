"""Health, the scan listing and per-scan metadata (JSON)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from service.server.errors import error_response, error_responses
from service.server.params import Predictions, State
from service.server.responses import cached_json, finite_json
from service.server.state import ServerState
from store.errors import ScanNotFound, one_line
from store.format import ScanMeta
from store.lru import BoundedLRU
from store.predictions import prediction_fields
from store.scan_filters import has_class_values, matches
from store.source import LocalSource

log = logging.getLogger("scancache.server")
router = APIRouter()

PINNED_KEYS = (
    "scan_id",
    "shape",
    "dtype",
    "num_classes",
    "split",
    "subject_id",
    "time_point",
    "augmentation",
)
# Per-slice class counts grow with depth x classes: only in /scans/{id} (or /scans?full=true).
LISTING_OMITS = frozenset({"class_voxels_per_slice"})

SCAN_EXAMPLE = {
    "scan_id": "0000001_V00-Aug00",
    "shape": [512, 512, 160],
    "dtype": "float32",
    "num_classes": 4,
    "split": "train",
    "subject_id": 1,
    "time_point": 0,
    "augmentation": 0,
    "version": "01733340000123456789-1a2b3c4d",
}
STORE_ID_EXAMPLE = "5f0c3e0d9b7a4f3c8e1d2a6b7c8d9e0f"


# (scan_id, version) -> its listing document: a version never changes, and a listing of
# thousands of scans would build (and check for non-finite numbers) every one again
_DOCUMENTS: BoundedLRU[dict[str, Any]] = BoundedLRU(4096)
DOCUMENTS_MAX = 65536  # about 2 KiB each


def scan_document(meta: ScanMeta, full: bool) -> dict[str, Any]:
    """A scan's attributes, pinned keys first; per-slice counts only when ``full``; and the
    ``version`` they are of (clients check that what they read later is still that version).
    Shared between requests: callers copy it before adding to it."""
    if full or not meta.version:  # per-slice counts can be 100 KiB: only listing documents kept
        return _scan_document(meta, full)
    doc = _DOCUMENTS.get((meta.scan_id, meta.version))
    if doc is None:
        doc = _scan_document(meta, full)
        _DOCUMENTS.put((meta.scan_id, meta.version), doc)
    return doc


def _scan_document(meta: ScanMeta, full: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {key: meta.attrs.get(key) for key in PINNED_KEYS}
    doc["shape"] = list(meta.shape)
    doc["num_classes"] = meta.num_classes
    # geometry and names for every scan, defaults included for scans that record none
    doc["spacing"] = list(meta.spacing)
    doc["affine"] = meta.affine
    doc["class_names"] = meta.class_names
    for key, value in meta.attrs.items():
        if key not in doc and (full or key not in LISTING_OMITS):
            doc[key] = value
    doc["version"] = meta.version
    return finite_json(doc)  # type: ignore[no-any-return]


def listable_scans(source: LocalSource, filters: dict[str, Any]) -> tuple[list[ScanMeta], list[str]]:
    """Every scan whose metadata reads and matches, and the ids of those skipped: a damaged or
    unreadable scan is left out, logged with why, instead of failing the listing of the whole
    store; the client is told which (``"skipped"``), never why (paths stay in the log), so a
    loader does not silently train on fewer scans."""
    out, skipped = [], []
    names = source.scan_ids()
    source.expect_scans(names)  # every scan's metadata kept: the next listing reads none
    for scan_id in names:
        try:
            meta = source.metadata(scan_id)
        except ScanNotFound:
            if source.storage.current_version(scan_id) is None:
                continue  # unpublished meanwhile: simply not there
            log.warning("GET /scans: skipped scan %s: its current version is gone", scan_id)
            skipped.append(scan_id)  # a link to a version gone: damaged, said
            continue
        except Exception as err:  # unreadable, not JSON, missing keys
            log.warning(
                "GET /scans: skipped scan %s: %s: %s", scan_id, type(err).__name__, one_line(err, 200)
            )
            skipped.append(scan_id)
            continue
        if matches(meta, filters):
            out.append(meta)
    return out, skipped


@router.get(
    "/health",
    tags=["service"],
    summary="Liveness and store availability (no authentication)",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ok"}}}},
        503: {"description": "The store is unavailable."},
    },
)
async def health(request: Request) -> Response:
    state: ServerState = request.app.state.scancache
    available = await to_thread.run_sync(state.store_readable)
    if not available:
        return error_response(503, "store unavailable", "ServerError")
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


@router.get(
    "/scans",
    tags=["scans"],
    summary="Complete scans, sorted by id, filtered by attributes",
    responses={
        200: {
            "description": '`{"scans": [...]}`; repeat a filter to accept several values. Carries an ETag.',
            "content": {
                "application/json": {"example": {"scans": [SCAN_EXAMPLE], "store_id": STORE_ID_EXAMPLE}}
            },
        },
        304: {"description": "Not modified."},
        **error_responses(401, 422, 503),
    },
)
async def list_scans(
    request: Request,
    state: State,
    split: Annotated[list[str] | None, Query(description="e.g. `train`, `valid`, `test`")] = None,
    subject_id: Annotated[list[int] | None, Query(description="Subject number")] = None,
    time_point: Annotated[list[int] | None, Query(description="Visit number (`V01` -> 1)")] = None,
    augmentation: Annotated[list[int] | None, Query(description="Augmentation number (`Aug02` -> 2)")] = None,
    has_class: Annotated[
        list[str] | None,
        Query(
            description="Only scans where this class (an index or a class name) has voxels; repeat for any of several"
        ),
    ] = None,
    scan_id: Annotated[list[str] | None, Query(description="Only these scans (repeat for several)")] = None,
    full: Annotated[bool, Query(description="Include per-slice class counts (large)")] = False,
    has_prediction: Annotated[
        bool | None, Query(description="Only scans with (true) or without (false) a stored prediction")
    ] = None,
    predictions: Predictions = None,
) -> Response:
    if split is not None and not all(
        s.strip() for s in split
    ):  # `?split` or `?split=`: a typo, not "no scans"
        return error_response(
            422, "split: empty; give a split name such as train", "InvalidParameter", "split"
        )
    if has_class is not None:
        try:  # checked here, where it enters: the one parser of has_class
            has_class_values(has_class)
        except ValueError as err:
            return error_response(422, str(err), "InvalidParameter", "has_class")
    filters = {
        "split": split,
        "subject_id": subject_id,
        "time_point": time_point,
        "augmentation": augmentation,
        "has_class": has_class,
        "scan_id": scan_id,
    }
    metas, skipped = await to_thread.run_sync(listable_scans, state.source, filters)
    if not metas and not await to_thread.run_sync(state.store_readable):
        return error_response(503, "store unavailable", "ServerError")  # not "no scans"
    if not metas and has_class is not None:  # a class name no scan has: a typo, not "no scans"
        unknown = await to_thread.run_sync(_unknown_class_name, state.source, has_class)
        if unknown is not None:
            return error_response(422, unknown, "InvalidParameter", "has_class")
    fields = await to_thread.run_sync(
        lambda: [prediction_fields(predictions, m.scan_id, m.shape, m.version) for m in metas]
    )
    _DOCUMENTS.at_least(min(DOCUMENTS_MAX, len(metas) + 64))
    docs = [{**scan_document(m, full), **f} for m, f in zip(metas, fields, strict=True)]
    if has_prediction is not None:
        docs = [d for d in docs if d["has_prediction"] == has_prediction]
    body: dict[str, Any] = {"scans": docs, "store_id": state.source.store_id}
    if skipped:
        body["skipped"] = skipped
    return await cached_json(request, body, state.inflight, in_thread=len(docs) > 64)


def _unknown_class_name(source: LocalSource, has_class: list[str]) -> str | None:
    """``has_class: no scan has a class named 'x' (classes: ...)``, or None when every name is
    some scan's class."""
    names = sorted({n for meta in listable_scans(source, {})[0] for n in meta.class_names})
    unknown = [v for v in has_class_values(has_class) if isinstance(v, str) and v not in names]
    if not unknown:
        return None
    return f"has_class: no scan has a class named {unknown[0]!r} (classes: {', '.join(names) or 'none'})"


@router.get(
    "/scans/{scan_id}",
    tags=["scans"],
    summary="One scan's metadata: shape, dtype, classes, split, statistics, per-slice class counts",
    responses={
        200: {
            "content": {"application/json": {"example": {**SCAN_EXAMPLE, "store_id": STORE_ID_EXAMPLE}}},
            "description": "Carries an ETag.",
        },
        304: {"description": "Not modified."},
        **error_responses(400, 401, 404, 503),
    },
)
async def scan_metadata(
    request: Request,
    state: State,
    scan_id: Annotated[str, Path(description="Scan id, e.g. `0000001_V00-Aug00`")],
    predictions: Predictions = None,
) -> Response:
    meta = await to_thread.run_sync(state.source.metadata, scan_id)
    fields = await to_thread.run_sync(prediction_fields, predictions, scan_id, meta.shape, meta.version)
    doc = {**scan_document(meta, full=True), **fields, "store_id": state.source.store_id}
    return await cached_json(request, doc, state.inflight)

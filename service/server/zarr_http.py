"""``/zarr/{path}``: the store as a read-only Zarr v3 tree over HTTP, with Range requests.

Standard readers (tensorstore's http kvstore, zarr-python via fsspec, neuroglancer) read
``zarr.json`` documents and shard files; the sharding codec fetches a shard's index with a
suffix range (``bytes=-N``) and then single inner chunks with ``bytes=a-b``. Only the root
``zarr.json`` and files inside complete (published) scans are served: paths with ``..``, ``.``,
empty components or backslashes are refused (400), hidden names such as ``.staging``,
``.versions`` and ``.lock`` do not exist (404). In a format-2 store ``<scan_id>`` is a relative
symlink to ``.versions/<scan_id>/<version>``: it is followed, and a file is served only if its
resolved path lies inside that scan's own version folder (never elsewhere in the store, never
outside it). Each file is opened once at its resolved path, so a re-publish during a response
never mixes versions within a file (``service.server.zarr_files``); the ETag names the version.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from starlette.responses import Response

from service.server.errors import NotInStore, error_response, error_responses
from service.server.guards import HEAD_SCOPE_KEY
from service.server.http_cache import PINNED, REVALIDATE, etag_matches
from service.server.responses import COUNTED_BODY_BYTES, budgeted_response, not_modified
from service.server.state import ServerState, server_state
from service.server.zarr_files import (
    READ_AT_ONCE,
    STREAM_CHUNK,
    FileRangeResponse,
    OpenFile,
    RangeNotSatisfiable,
    StoredObject,
    open_store_file,
    open_stored_object,
    parse_range,
    scan_and_version,
    split_store_path,
)
from store.errors import ScanDamaged, VersionGone
from store.inventory import MANIFEST
from store.storage import open_storage

router = APIRouter(tags=["zarr"])

_READABLE_TTL_S = 1.0  # Zarr readers probe many absent keys: one look at the root a second
_readable: dict[str, tuple[float, bool]] = {}


def _tree_readable(root: Path | str) -> bool:
    """Is the tree's root there (after a 404 under it)? Remembered for a second."""
    key = str(root)
    seen = _readable.get(key)
    if seen is not None and time.monotonic() - seen[0] < _READABLE_TTL_S:
        return seen[1]
    try:
        readable = open_storage(root).read_size("zarr.json") is not None
    except Exception:  # unreachable, gone, refused: not readable, whatever the storage raised
        readable = False
    _readable[key] = (time.monotonic(), readable)
    return readable


def _listed_but_missing(root: Path | str, parts: tuple[str, ...]) -> str | None:
    """Why a scan file that is not in the store should be (its version's manifest lists it), or
    None: a key no manifest lists (a reader probing for a chunk never written, or for Zarr v2
    metadata) is simply absent."""
    if len(parts) < 2:
        return None
    storage = open_storage(root)
    scan_id, pinned = scan_and_version(parts[0])
    version = pinned or storage.current_version(scan_id)
    if version is None:
        return None
    if pinned is not None and storage.read_size(f"{storage.version_key(scan_id, pinned)}/zarr.json") is None:
        raise VersionGone(scan_id, pinned)  # removed (or the scan pruned): gone, never fill values
    listed = _manifest_keys(str(root), scan_id, version)
    rel = "/".join(parts[1:])
    return f"{rel} is missing" if rel in listed else None


@functools.lru_cache(maxsize=256)  # a version never changes; Zarr readers probe many absent keys
def _manifest_keys(root: str, scan_id: str, version: str) -> frozenset[str]:
    storage = open_storage(root)
    try:
        doc = storage.read_json(f"{storage.version_key(scan_id, version)}/zarr.json")
    except (ValueError, RecursionError):  # not JSON: damaged too, but said by the scan routes
        return frozenset()
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    manifest = attrs.get(MANIFEST) if isinstance(attrs, dict) else None
    return frozenset(manifest) if isinstance(manifest, dict) else frozenset()


def _read_range(file: OpenFile | StoredObject, start: int, end: int) -> bytes:
    try:
        return file.pread(end - start, start)
    finally:
        file.close()


@router.head(
    "/zarr/{path:path}",
    summary="Headers only (size, ETag) of a file in the Zarr tree",
    response_class=Response,
    responses={
        200: {"description": "As GET, without a body."},
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 410, 503),
    },
)
@router.get(
    "/zarr/{path:path}",
    summary="The store as read-only Zarr v3: zarr.json documents and shard files, with Range",
    response_class=Response,
    responses={
        200: {
            "description": "The whole file: `zarr.json` (JSON) or a shard (bytes). `Accept-Ranges: bytes`, ETag.",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        206: {
            "description": "One byte range (`Range: bytes=a-b`, `bytes=a-` or suffix `bytes=-N`), with Content-Range.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 410, 416, 503),
    },
)
async def zarr_file(
    request: Request,
    state: Annotated[ServerState, Depends(server_state)],
    path: Annotated[str, PathParam(description="`zarr.json`, or `<scan_id>/...` inside a complete scan")],
) -> Response:
    return await serve_tree_file(request, state, state.settings.store, path)


async def serve_tree_file(request: Request, state: ServerState, root: Path | str, path: str) -> Response:
    """One file of a store laid out by store/publish.py (the scans' or the predictions'), checked
    and answered the same way for both trees, on a local folder or on object storage."""
    parts = split_store_path(path)
    file: OpenFile | StoredObject
    try:
        if isinstance(root, Path):
            file = await to_thread.run_sync(open_store_file, root, parts)
        else:
            file = await to_thread.run_sync(open_stored_object, open_storage(root), parts)
    except NotInStore:
        # a tree that is gone (moved, unmounted, unreachable) is not "no such node": Zarr
        # readers take a 404 as an absent array or group and would not try again
        if not await to_thread.run_sync(_tree_readable, root):
            return error_response(503, "store unavailable", "ServerError")
        lost = await to_thread.run_sync(_listed_but_missing, root, parts)
        if lost is not None:  # a 404 would read as a chunk of fill values: zeros shown as data
            raise ScanDamaged(parts[0], lost) from None
        raise
    try:
        return await _respond(request, state, file)
    except BaseException:
        file.close()
        raise


async def _respond(request: Request, state: ServerState, file: OpenFile | StoredObject) -> Response:
    """Answer from an open file; the response (or this function on a bodiless answer) closes it."""
    headers = {
        "ETag": file.etag,
        "Cache-Control": PINNED if file.pinned else REVALIDATE,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/json" if file.name == "zarr.json" else "application/octet-stream",
    }
    if etag_matches(request.headers.get("if-none-match"), file.etag):
        file.close()
        return not_modified(file.etag, headers["Cache-Control"])  # as a 200 would carry them
    if_range = request.headers.get("if-range")
    # Range is defined for GET only: HEAD answers 200 with the whole file's headers (RFC 9110 14.2).
    head = request.method == "HEAD" or bool(request.scope.get(HEAD_SCOPE_KEY))
    use_range = not head and (if_range is None or if_range.strip() == file.etag)
    try:
        byte_range = parse_range(request.headers.get("range"), file.size) if use_range else None
    except RangeNotSatisfiable:
        file.close()
        return error_response(
            416,
            f"range: {request.headers.get('range')!r} selects no byte of a {file.size}-byte file",
            "InvalidParameter",
            "range",
            headers={"Content-Range": f"bytes */{file.size}", "Accept-Ranges": "bytes"},
        )
    start, end = byte_range if byte_range else (0, file.size)
    status = 206 if byte_range else 200
    if byte_range:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
    if head:
        return FileRangeResponse(file, start, end, status, headers)
    # What this response holds in memory at once (the range, or one chunk of a streamed one),
    # in the in-flight budget like every body (small ones never wait: responses.py).
    if end - start > READ_AT_ONCE:
        in_memory = min(end - start, STREAM_CHUNK)
        release = await state.inflight.acquire(in_memory) if in_memory >= COUNTED_BODY_BYTES else None
        return FileRangeResponse(file, start, end, status, headers, on_close=release)
    media_type = headers.pop("Content-Type")
    return await budgeted_response(
        request,
        state.inflight,
        etag=None,  # answered above, before the Range header is read
        cost=end - start,
        produce=lambda: ([_read_range(file, start, end)], {}),
        media_type=media_type,
        headers=headers,
        status_code=status,
        counted_from=COUNTED_BODY_BYTES,
    )


@router.head(
    "/predictions/zarr/{path:path}",
    summary="Headers only (size, ETag) of a file in the predictions' Zarr tree",
    response_class=Response,
    responses={
        200: {"description": "As GET, without a body."},
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 410, 503),
    },
)
@router.get(
    "/predictions/zarr/{path:path}",
    summary="The predictions store (`--predictions`) as read-only Zarr v3, as `/zarr/` serves the scans",
    response_class=Response,
    responses={
        200: {"description": "The whole file, `Accept-Ranges: bytes`, ETag."},
        206: {"description": "One byte range, with Content-Range."},
        304: {"description": "Not modified: the If-None-Match ETag is current."},
        **error_responses(400, 401, 404, 410, 416, 503),
    },
)
async def predictions_zarr_file(
    request: Request,
    state: Annotated[ServerState, Depends(server_state)],
    path: Annotated[
        str, PathParam(description="`zarr.json`, or `<scan_id>/...` inside a written prediction")
    ],
) -> Response:
    # The predictions store has the scan store's layout (store/publish.py): same checks, same
    # answers, so neuroglancer opens a prediction's label image like a scan's.
    root = state.settings.predictions
    if root is None:
        raise NotInStore("this server has no predictions (scancache serve --predictions PRED)")
    return await serve_tree_file(request, state, root, path)

"""The files behind ``/zarr/``: store paths checked, resolved and opened once (a local file or an
object of the storage), HTTP Range headers parsed, and a streamed range response.

A file is opened once at its resolved path, so a re-publish during a response never mixes
versions within a file; in a format-2 store ``<scan_id>`` is a relative symlink into
``.versions/<scan_id>/<version>`` and a file is served only if it resolves inside that scan's
own version folder.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.server.errors import NotInStore
from service.server.guards import HEAD_SCOPE_KEY
from service.server.http_cache import make_etag
from store.errors import InvalidPath, VersionGone
from store.format import validate_scan_id
from store.publish import VERSIONS_DIR
from store.storage import Storage

READ_AT_ONCE = 1 << 20  # ranges up to this size are read in one call; larger ones are streamed
STREAM_CHUNK = 1 << 20


# ASCII digits of bounded length (or nothing): str.isdigit() takes "²", and int() of 5000 digits
# raises; a header we cannot read is ignored (200), as RFC 9110 14.2 allows.
_RANGE_NUMBER = re.compile(r"[0-9]{0,18}", re.ASCII)
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", re.ASCII)  # what new_version_name makes


class RangeNotSatisfiable(Exception):
    pass


def split_store_path(path: str) -> tuple[str, ...]:
    """Validate a path below ``/zarr/`` into components (pure; no filesystem access)."""
    if path == "" or path.endswith("/"):
        # a folder, e.g. what zarr-python lists of a group opened at ".../zarr/": no listing
        # here (readers find arrays through zarr.json), and a folder is not a bad path
        raise NotInStore("path: not a file; try zarr.json")
    parts = tuple(path.split("/"))
    if len(parts) > 1:
        scan_id, pinned = scan_and_version(parts[0])
        if pinned is not None and not _VERSION.fullmatch(pinned):
            raise NotInStore(f"path: {path!r} not found")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidPath("path: empty, '.' and '..' components are not allowed")
        if "\\" in part or "\x00" in part:
            raise InvalidPath("path: backslashes and NUL bytes are not allowed")
        if part.startswith("."):
            raise NotInStore(f"path: {path!r} not found")
    if len(parts) == 1:
        if parts[0] != "zarr.json":
            raise NotInStore(f"path: {path!r} not found")
        return parts
    try:
        validate_scan_id(scan_id)
    except InvalidPath:
        raise NotInStore(f"path: {path!r} not found") from None
    return parts


def scan_and_version(component: str) -> tuple[str, str | None]:
    """``<scan_id>`` (its current version) or ``<scan_id>@<version>`` (that version, as long as
    the store keeps it), the first component of a path below ``/zarr/``; scan ids have no ``@``."""
    scan_id, at, version = component.partition("@")
    return scan_id, (version if at else None)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range ``[start, end)`` from a ``Range`` header, or None to send the whole file.

    Malformed headers, other units and multiple ranges are ignored (RFC 9110 14.2 allows it);
    a valid range that selects nothing raises :class:`RangeNotSatisfiable` (416).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _RANGE_NUMBER.fullmatch(first) or not _RANGE_NUMBER.fullmatch(last):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable()
        return (max(size - suffix, 0), size)
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # an invalid range-spec: ignore the header
    if start >= size:
        raise RangeNotSatisfiable()
    return (start, end)


@dataclass
class OpenFile:
    fd: int
    size: int
    etag: str
    name: str
    pinned: bool = False  # of a version named in the path: never changes
    closed: bool = False

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        """Idempotent: a second close must never close a descriptor number reused since."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


@dataclass
class StoredObject:
    """A file of a store on object storage, read by range requests as it is sent."""

    storage: Storage
    key: str
    size: int
    etag: str
    name: str
    pinned: bool = False  # of a version named in the path: never changes

    def pread(self, n: int, offset: int) -> bytes:
        data = self.storage.read_range(self.key, offset, offset + n)
        if data is None:  # removed after the grace period while being sent
            raise OSError("object removed while being sent")
        return data

    def close(self) -> None:
        pass


def open_stored_object(storage: Storage, parts: tuple[str, ...]) -> StoredObject:
    """``/zarr/`` on object storage: the root ``zarr.json``, or a file of a scan's current
    version (found through its pointer, so never staging, the lock or another scan)."""
    missing = NotInStore(f"path: {'/'.join(parts)!r} not found")
    pinned: str | None = None
    if len(parts) == 1:
        if parts[0] != "zarr.json":
            raise missing
        key = "zarr.json"
    else:
        scan_id, pinned = scan_and_version(parts[0])
        try:
            validate_scan_id(scan_id)
        except InvalidPath:
            raise missing from None
        version = pinned or storage.current_version(scan_id)
        if version is None:
            raise missing
        if (
            pinned is not None
            and storage.read_size(f"{storage.version_key(scan_id, pinned)}/zarr.json") is None
        ):
            raise VersionGone(scan_id, pinned)  # removed, or its scan pruned: never fill values
        key = f"{storage.version_key(scan_id, version)}/{'/'.join(parts[1:])}"
    size = storage.read_size(key)
    if size is None:
        raise missing
    return StoredObject(
        storage, key, size, make_etag("zarr-object", key, size), parts[-1], pinned is not None
    )


def _inside(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def resolve_store_file(root: Path, parts: tuple[str, ...]) -> str:
    """The resolved path of a validated ``/zarr/`` path, or NotInStore.

    The root ``zarr.json`` must be the root's own file; a scan's files must resolve inside the
    scan's published version folder ``.versions/<scan_id>/<version>`` (what its symlink points
    at), so no link can reach staging, the lock, another scan or anything outside the store.
    """
    missing = NotInStore(f"path: {'/'.join(parts)!r} not found")
    real_root = os.path.realpath(root)
    if len(parts) == 1:
        real = os.path.realpath(os.path.join(real_root, parts[0]))
        if real != os.path.join(real_root, "zarr.json"):
            raise missing
        return real
    scan_id, pinned = scan_and_version(parts[0])
    versions = os.path.join(real_root, VERSIONS_DIR, scan_id)
    # the scan's symlink followed, or the pinned version's own folder
    scan_dir = os.path.realpath(
        os.path.join(real_root, scan_id) if pinned is None else os.path.join(versions, pinned)
    )
    if os.path.dirname(scan_dir) != versions:
        raise missing  # not a published version of this scan (format 2)
    if not os.path.isfile(os.path.join(scan_dir, "zarr.json")):
        if pinned is not None:  # removed, or its scan pruned: gone, never fill values
            raise VersionGone(scan_id, pinned)
        raise missing
    real = os.path.realpath(os.path.join(scan_dir, *parts[1:]))
    if not _inside(scan_dir, real):
        raise missing
    return real


def open_store_file(root: Path, parts: tuple[str, ...]) -> OpenFile:
    """Open a validated path read-only if it is a regular file inside a published scan."""
    real = resolve_store_file(root, parts)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise  # a file the server's user may not read: a 503, not a 404 that a Zarr reader would take for fill values
    except OSError:  # missing, a folder, a name too long, a link loop: no such file in the tree
        raise NotInStore(f"path: {'/'.join(parts)!r} not found") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotInStore(f"path: {'/'.join(parts)!r} not found")
    # The resolved path names the scan's version: a re-published scan gets new ETags.
    etag = make_etag("zarr-file", real, st.st_mtime_ns, st.st_size, st.st_ino)
    return OpenFile(fd, st.st_size, etag, parts[-1], pinned=scan_and_version(parts[0])[1] is not None)


class FileRangeResponse(Response):
    """Streams ``[start, end)`` of an open file in worker threads, then closes it (and calls
    ``on_close``: the in-flight bytes of its one chunk in memory)."""

    def __init__(
        self,
        file: OpenFile | StoredObject,
        start: int,
        end: int,
        status_code: int,
        headers: dict[str, str],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.file, self.start, self.end = file, start, end
        self.on_close = on_close
        self.status_code = status_code
        self.media_type = headers.pop("Content-Type")
        self.background = None
        self.body = b""
        self.init_headers(headers)
        self.headers["content-length"] = str(end - start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            pos = self.start
            if scope.get("method") == "HEAD" or scope.get(HEAD_SCOPE_KEY) or pos >= self.end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            while pos < self.end:
                data = await to_thread.run_sync(self.file.pread, min(STREAM_CHUNK, self.end - pos), pos)
                if not data:
                    raise OSError("file shrank while being sent")
                pos += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": pos < self.end})
        finally:
            self.file.close()
            if self.on_close is not None:
                self.on_close()

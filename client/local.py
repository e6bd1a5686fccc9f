"""``LocalSource``: reads a scancache store on a local (or mounted) filesystem.

tensorstore is the read engine: it decodes shards' inner chunks concurrently in C++ threads
without holding the GIL and keeps an LRU of decoded chunks capped in bytes (``cache_bytes``).
zarr-python reads the same store without our code; tensorstore is simply faster (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from client.categories import merge_mask, normalize_categories
from client.errors import ArrayNotFound, ScanNotFound
from client.layout import IMAGE, MASK, ScanMeta, matches, validate_array_name, validate_scan_id
from client.protocol import RegionRequest, RoiLike
from client.roi import Region, as_region
from client.units import parse_bytes

DEFAULT_CACHE_BYTES = 512 * 2**20  # the server's default (``scancache serve --cache-bytes``)
LOCAL_CACHE_ENV = "SCANCACHE_LOCAL_CACHE_BYTES"
LOCAL_CACHE_MAX = 4 * 2**30


def default_cache_bytes() -> int:
    """Chunk cache of a ``LocalSource`` opened without ``cache_bytes`` (training, scripts).

    ``$SCANCACHE_LOCAL_CACHE_BYTES`` if set, else an eighth of physical memory within
    [512 MiB, 4 GiB]: a training epoch touches every chunk again, and a cache that holds the
    decoded dataset turns later epochs into copies (docs/tuning.md). The cache only grows as
    chunks are read; several training processes on one machine each have their own.
    """
    text = os.environ.get(LOCAL_CACHE_ENV, "").strip()
    if text:
        return parse_bytes(text, LOCAL_CACHE_ENV)  # 512M works as on the command line
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep the server's default
        return DEFAULT_CACHE_BYTES
    return int(min(max(memory // 8, DEFAULT_CACHE_BYTES), LOCAL_CACHE_MAX))


class LocalSource:
    """A store on disk. Thread-safe; cheap to create; ``close`` is optional.

    ``cache_bytes``: the decoded-chunk LRU (default :func:`default_cache_bytes`).
    """

    def __init__(self, path: str | os.PathLike[str], cache_bytes: int | None = None) -> None:
        self.root = Path(path)
        if not (self.root / "zarr.json").is_file():
            raise FileNotFoundError(f"{path}: not a scancache store (no zarr.json)")
        if cache_bytes is None:
            cache_bytes = default_cache_bytes()
        self.cache_bytes = int(cache_bytes)
        self._context = ts.Context(
            {
                "cache_pool": {"total_bytes_limit": int(cache_bytes)},
                "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)},
            }
        )
        self._lock = threading.Lock()
        # scan_id -> (stat signature of its zarr.json, metadata); a re-published scan has a new one
        self._meta: dict[str, tuple[tuple[int, int], ScanMeta]] = {}
        self._arrays: dict[tuple[str, str, tuple[int, int]], Any] = {}
        self._versions: dict[str, tuple[tuple[int, int], str]] = {}

    def __repr__(self) -> str:
        return f"LocalSource({str(self.root)!r})"

    # -- metadata ---------------------------------------------------------------------------
    def _signature(self, scan_id: str) -> tuple[int, int]:
        try:
            st = os.stat(self.root / scan_id / "zarr.json")
        except (FileNotFoundError, NotADirectoryError):  # e.g. the id of a file in the store root
            raise ScanNotFound(f"scan {scan_id!r} not found") from None
        return (st.st_ino, st.st_mtime_ns)

    def metadata(self, scan_id: str) -> ScanMeta:
        validate_scan_id(scan_id)
        sig = self._signature(scan_id)
        cached = self._meta.get(scan_id)
        if cached and cached[0] == sig:
            return cached[1]
        try:
            doc = json.loads((self.root / scan_id / "zarr.json").read_bytes())
            meta = ScanMeta.from_attrs(doc["attributes"])
        except (FileNotFoundError, NotADirectoryError):  # e.g. the id of a file in the store root
            raise ScanNotFound(f"scan {scan_id!r} not found") from None
        except (KeyError, ValueError, TypeError):
            raise ScanNotFound(f"{scan_id!r} is not a scancache scan") from None
        with self._lock:
            self._meta[scan_id] = (sig, meta)
        return meta

    def version(self, scan_id: str) -> str:
        """An opaque tag of the scan's published version; it changes whenever the scan is
        re-published (the server derives HTTP ETags from it). Content and file identity both
        count, so a coarse filesystem clock cannot hide a re-publish."""
        validate_scan_id(scan_id)
        sig = self._signature(scan_id)
        cached = self._versions.get(scan_id)
        if cached and cached[0] == sig:
            return cached[1]
        attrs = json.dumps(self.metadata(scan_id).attrs, sort_keys=True, default=str)
        tag = hashlib.blake2b(f"{sig[0]}:{sig[1]}:{attrs}".encode(), digest_size=10).hexdigest()
        with self._lock:
            self._versions[scan_id] = (sig, tag)
        return tag

    def scan_ids(self) -> list[str]:
        ids = []
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                if os.path.isfile(os.path.join(entry.path, "zarr.json")):
                    ids.append(entry.name)
        return sorted(ids)

    def list_scans(self, **filters: Any) -> list[ScanMeta]:
        out = []
        for scan_id in self.scan_ids():
            try:
                meta = self.metadata(scan_id)
            except (KeyError, ValueError):  # vanished or foreign group: not ours to list
                continue
            if matches(meta, filters):
                out.append(meta)
        return out

    # -- arrays -----------------------------------------------------------------------------
    def _array(self, scan_id: str, name: str, state: tuple[tuple[int, int], ScanMeta] | None = None) -> Any:
        validate_array_name(name)
        sig, meta = state or self._state(scan_id)
        if name == MASK and not meta.has_mask:
            raise ArrayNotFound(f"scan {scan_id!r} has no mask")
        key = (scan_id, name, sig)
        arr = self._arrays.get(key)
        if arr is None:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.root / scan_id / name)}}
            try:
                arr = ts.open(spec, context=self._context, read=True, open=True).result()
            except ValueError:
                raise ArrayNotFound(f"scan {scan_id!r} has no array {name!r}") from None
            with self._lock:
                for old in [k for k in self._arrays if k[:2] == key[:2]]:
                    del self._arrays[old]
                self._arrays[key] = arr
        return arr

    def _state(self, scan_id: str) -> tuple[tuple[int, int], ScanMeta]:
        """(signature, metadata) of a scan: one ``stat`` of its zarr.json."""
        meta = self.metadata(scan_id)
        cached = self._meta.get(scan_id)
        return cached if cached is not None and cached[1] is meta else (self._signature(scan_id), meta)

    def region(self, scan_id: str, roi: RoiLike) -> Region:
        return as_region(roi, self.metadata(scan_id).shape)

    def _start(self, req: RegionRequest, state: tuple[tuple[int, int], ScanMeta]) -> Any:
        region = as_region(req.roi, state[1].shape)
        return self._array(req.scan_id, req.array, state)[region].read()

    def _finish(self, req: RegionRequest, data: np.ndarray, meta: ScanMeta) -> np.ndarray:
        if req.array == IMAGE:
            return data
        if req.categories is None and not req.background:
            return data
        cats = None if req.categories is None else normalize_categories(req.categories, meta.num_classes)
        return merge_mask(data, cats, req.background)

    def read_regions(self, requests: Sequence[RegionRequest]) -> list[np.ndarray]:
        # Each scan's zarr.json is checked once per call (not once per region), then every read
        # is started before waiting on any: tensorstore runs them concurrently.
        states: dict[str, tuple[tuple[int, int], ScanMeta]] = {}
        for r in requests:
            if r.scan_id not in states:
                states[r.scan_id] = self._state(r.scan_id)
        futures = [self._start(r, states[r.scan_id]) for r in requests]
        return [
            self._finish(r, f.result(), states[r.scan_id][1]) for r, f in zip(requests, futures, strict=True)
        ]

    def read_image(self, scan_id: str, roi: RoiLike = None) -> np.ndarray:
        return self.read_regions([RegionRequest(scan_id, IMAGE, roi)])[0]

    def read_mask(
        self,
        scan_id: str,
        roi: RoiLike = None,
        categories: Any = None,
        background: bool = False,
    ) -> np.ndarray:
        meta = self.metadata(scan_id)
        cats = None if categories is None else normalize_categories(categories, meta.num_classes)
        return self.read_regions([RegionRequest(scan_id, MASK, roi, cats, background)])[0]

    def close(self) -> None:
        with self._lock:
            self._arrays.clear()
            self._meta.clear()

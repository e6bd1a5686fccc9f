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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from client.categories import merge_mask, normalize_categories
from client.errors import ArrayNotFound, ScanNotFound
from client.label_map import LABEL_MAP, LOCATIONS, apply_table, category_table, has_label_map
from client.layout import IMAGE, MASK, ScanMeta, matches, validate_array_name, validate_scan_id
from client.protocol import RegionRequest, RoiLike
from client.roi import Region, as_region

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
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{LOCAL_CACHE_ENV}={text!r} is not a whole number of bytes") from None
        if value < 0:
            raise ValueError(f"{LOCAL_CACHE_ENV}={text!r} must not be negative")
        return value
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
        self._chunk_bytes: dict[int, tuple[tuple[int, ...], int]] = {}  # id(array) -> (inner chunk, itemsize)
        self._counters = {"bytes_decoded": 0, "bytes_returned": 0, "read_s": 0.0, "regions": 0}
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
        if name not in (LABEL_MAP, LOCATIONS):  # derived arrays are opened only from here
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
            inner = tuple(int(n or 1) for n in arr.chunk_layout.read_chunk.shape or arr.shape)
            with self._lock:
                for old in [k for k in self._arrays if k[:2] == key[:2]]:
                    self._chunk_bytes.pop(id(self._arrays.pop(old)), None)
                self._chunk_bytes[id(arr)] = (inner, int(arr.dtype.numpy_dtype.itemsize))
                self._arrays[key] = arr
        return arr

    def _state(self, scan_id: str) -> tuple[tuple[int, int], ScanMeta]:
        """(signature, metadata) of a scan: one ``stat`` of its zarr.json."""
        meta = self.metadata(scan_id)
        cached = self._meta.get(scan_id)
        return cached if cached is not None and cached[1] is meta else (self._signature(scan_id), meta)

    def region(self, scan_id: str, roi: RoiLike) -> Region:
        return as_region(roi, self.metadata(scan_id).shape)

    def _uses_label_map(self, req: RegionRequest, meta: ScanMeta) -> bool:
        return req.array == MASK and has_label_map(meta.attrs)

    def _start(self, req: RegionRequest, state: tuple[tuple[int, int], ScanMeta]) -> tuple[Any, int]:
        """The read's future and the decoded chunk bytes it needs (``io_counters``)."""
        region = as_region(req.roi, state[1].shape)
        name = LABEL_MAP if self._uses_label_map(req, state[1]) else req.array
        arr = self._array(req.scan_id, name, state)
        inner, itemsize = self._chunk_bytes[id(arr)]
        return arr[region].read(), chunk_bytes_touched(region, inner, itemsize)

    def _finish(self, req: RegionRequest, data: np.ndarray, meta: ScanMeta) -> np.ndarray:
        if req.array == IMAGE:
            return data
        cats = None if req.categories is None else normalize_categories(req.categories, meta.num_classes)
        if self._uses_label_map(req, meta):  # data is the label map: merge through a table
            return apply_table(data, category_table(cats, req.background, meta.num_classes))
        if req.categories is None and not req.background:
            return data
        return merge_mask(data, cats, req.background)

    def read_regions(self, requests: Sequence[RegionRequest]) -> list[np.ndarray]:
        # Each scan's zarr.json is checked once per call (not once per region), then every read
        # is started before waiting on any: tensorstore runs them concurrently.
        started = time.perf_counter()
        states: dict[str, tuple[tuple[int, int], ScanMeta]] = {}
        for r in requests:
            if r.scan_id not in states:
                states[r.scan_id] = self._state(r.scan_id)
        reads = [self._start(r, states[r.scan_id]) for r in requests]
        out = [
            self._finish(r, f.result(), states[r.scan_id][1])
            for r, (f, _) in zip(requests, reads, strict=True)
        ]
        with self._lock:
            counters = self._counters
            counters["bytes_decoded"] += sum(n for _, n in reads)
            counters["bytes_returned"] += sum(a.nbytes for a in out)
            counters["read_s"] += time.perf_counter() - started
            counters["regions"] += len(out)
        return out

    def decoded_bytes(self, requests: Sequence[RegionRequest]) -> int:
        """Decoded chunk bytes that reading ``requests`` needs (the server's
        ``X-Scancache-Decoded-Bytes``); no data is read."""
        total = 0
        for r in requests:
            state = self._state(r.scan_id)
            name = LABEL_MAP if self._uses_label_map(r, state[1]) else r.array
            inner, itemsize = self._chunk_bytes[id(self._array(r.scan_id, name, state))]
            total += chunk_bytes_touched(as_region(r.roi, state[1].shape), inner, itemsize)
        return total

    def io_counters(self) -> dict[str, Any]:
        """Cumulative since the source was opened: ``bytes_decoded`` (decoded bytes of the
        inner chunks the reads touched, whether the chunk cache held them or not),
        ``bytes_returned`` (bytes of the arrays returned), ``read_s``, ``regions``."""
        with self._lock:
            return dict(self._counters)

    def read_locations(self, scan_id: str) -> np.ndarray | None:
        """(N, 3) int32 foreground locations (class-sorted, ``location_counts``), or None for a
        scan written without them."""
        meta = self.metadata(scan_id)
        if meta.attrs.get("location_counts") is None:
            return None
        return np.asarray(self._array(scan_id, LOCATIONS).read().result(), dtype=np.int32)

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
            self._chunk_bytes.clear()
            self._meta.clear()


def chunk_bytes_touched(region: Sequence[slice], inner: Sequence[int], itemsize: int) -> int:
    """Decoded bytes of the inner chunks a region touches (an edge chunk counts whole: it is
    decoded whole). Axes past the region's (a mask's class axis) are read whole."""
    chunks = 1
    for axis, size in enumerate(inner):
        if axis < len(region):
            lo, hi = region[axis].start, region[axis].stop
            chunks *= 0 if hi <= lo else (hi - 1) // size - lo // size + 1
    return chunks * int(np.prod(inner)) * itemsize

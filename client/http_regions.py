"""What ``HttpSource`` sends and counts: regions as ``POST /batch`` takes them, batches cut so
that a response names at most ``MAX_VERSIONED_SCANS`` scans' versions, and the I/O counters
(``io_counters()``; the server reports the bytes it decoded per response).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from client.wire import DECODED_BYTES_HEADER
from store.categories import categories_json_value, parse_categories
from store.format import validate_array_name, validate_scan_id
from store.label_map import Decoded
from store.protocol import RegionRequest, RoiLike
from store.roi import slices_text


def roi_text(roi: RoiLike) -> str | None:
    """A roi as the query text; slices need no shape (the server validates bounds)."""
    if roi is None or isinstance(roi, str):
        return roi
    return slices_text(roi)


def categories_json(categories: Any) -> list[Any] | None:
    """Categories as JSON values: ``[0, [1, 2], 3]``, parsed and checked here (the range of the
    indices is the server's to check: it knows the scan)."""
    if categories is None:
        return None
    return categories_json_value(parse_categories(categories))


def region_json(req: RegionRequest) -> dict[str, Any]:
    """A region as ``POST /batch`` takes it (ids checked here, bounds by the server)."""
    validate_scan_id(req.scan_id)
    validate_array_name(req.array)
    region = {
        "scan_id": req.scan_id,
        "array": req.array,
        "roi": roi_text(req.roi),
        "categories": categories_json(req.categories),
        "background": bool(req.background),
    }
    if req.slice_major:  # only when asked: the body stays what older servers accept
        region["slice_major"] = True
    return region


def by_scans(regions: list[dict[str, Any]], limit: int) -> list[list[dict[str, Any]]]:
    """Regions in consecutive parts of at most ``limit`` distinct scans each: the server names
    the version of every scan a response read (up to MAX_VERSIONED_SCANS of them)."""
    parts: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    seen: set[str] = set()
    for region in regions:
        if region["scan_id"] not in seen and len(seen) == limit:
            parts.append(current)
            current, seen = [], set()
        current.append(region)
        seen.add(region["scan_id"])
    if current:
        parts.append(current)
    return parts


class IoCounters:
    """Bytes the server decoded and this client received, read time and regions; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {"bytes_decoded": 0, "bytes_returned": 0, "read_s": 0.0, "regions": 0}

    def count_decoded(self, headers: Any) -> None:
        try:
            decoded = int(headers.get(DECODED_BYTES_HEADER.lower()) or 0)
        except ValueError:  # an older server or a proxy's header: count nothing
            decoded = 0
        with self._lock:
            self._values["bytes_decoded"] += decoded

    def count_returned(self, arrays: Sequence[Decoded], started: float) -> None:
        with self._lock:
            self._values["bytes_returned"] += sum(a.nbytes for a in arrays)
            self._values["read_s"] += time.perf_counter() - started
            self._values["regions"] += len(arrays)

    def counted(self, array: np.ndarray, headers: Any, started: float) -> np.ndarray:
        self.count_decoded(headers)
        self.count_returned([array], started)
        return array

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

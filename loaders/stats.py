"""``loader.stats()``: where a loader's time and bytes go ("why is my GPU idle?").

The loader counts what it does itself (batches, time reading, time converting into the
batch, time a caller waited); bytes come from the sources' ``io_counters()`` (cumulative since
a source was opened), as the difference from a snapshot taken at ``reset``. A source without
``io_counters`` (a user's own) gives ``None`` for the byte figures. Sources are shared per
path/URL in a process, so bytes include other loaders' reads from the same source meanwhile
(e.g. a validation loader): profile one loader at a time for exact figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

IO_FIELDS = ("bytes_decoded", "bytes_returned", "read_s", "regions")


def _io_totals(sources: Iterable[Any]) -> dict[str, float] | None:
    totals = dict.fromkeys(IO_FIELDS, 0.0)
    for source in sources:
        counters = getattr(source, "io_counters", None)
        if counters is None:
            return None
        values = counters()
        for key in IO_FIELDS:
            totals[key] += float(values.get(key, 0) or 0)
    return totals


class LoaderStats:
    """Thread-safe counters of one loader since the last ``reset``."""

    def __init__(self, sources: Iterable[Any]) -> None:
        # one entry per open source object (several scans share one)
        self._sources = list({id(s): s for s in sources}.values())
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._started = time.perf_counter()
            self._io_start = _io_totals(self._sources)
            self.batches = 0
            self.read_s = 0.0
            self.copy_s = 0.0

    def add_batch(self, read_s: float, copy_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.read_s += read_s
            self.copy_s += copy_s

    def report(self, wait_s: float) -> dict[str, Any]:
        with self._lock:
            io_now = _io_totals(self._sources)
            start = self._io_start
            out: dict[str, Any] = {
                "batches": self.batches,
                "seconds": time.perf_counter() - self._started,
                "read_s": self.read_s,  # wall time in reads, summed over read-ahead threads
                "copy_s": self.copy_s,  # converting windows into the float32 / uint8 batch
                "wait_s": wait_s,
                "merge_s": None,  # categories are merged inside the source; not measured apart
                "bytes_read": None,
                "bytes_delivered": None,
                "read_amplification": None,
                "source_read_s": None,
                "regions": None,
            }
        if io_now is not None and start is not None:
            read = int(io_now["bytes_decoded"] - start["bytes_decoded"])
            delivered = int(io_now["bytes_returned"] - start["bytes_returned"])
            out["bytes_read"] = read
            out["bytes_delivered"] = delivered
            out["read_amplification"] = read / delivered if delivered else None
            out["source_read_s"] = io_now["read_s"] - start["read_s"]
            out["regions"] = int(io_now["regions"] - start["regions"])
        return out

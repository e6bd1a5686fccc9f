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


# -- reader processes (torch DataLoader workers) ----------------------------------------------------
WORKER_FIELDS = (
    "batches",
    "seconds",  # wall time the process spent inside its passes (reading and waiting to hand out)
    "cpu_s",  # the process's CPU time over those passes (all its threads)
    "read_s",
    "copy_s",
    "wait_s",
    "bytes_read",
    "bytes_delivered",
    "source_read_s",
    "regions",
)
MAX_WORKERS = 256  # slots in the shared table; workers beyond it go uncounted


class WorkerCounters:
    """Per-worker counters in shared memory, written by reader processes, read by the parent.

    Created in the training process before its workers start (a ``RawArray`` reaches forked,
    spawned and forkserver workers alike, pickled while they start). Each worker adds its own
    deltas to its slot (one writer per slot), so slots add up over non-persistent workers that
    are started again every epoch.
    """

    def __init__(self) -> None:
        import multiprocessing

        self._table = multiprocessing.RawArray("d", MAX_WORKERS * len(WORKER_FIELDS))

    def add(self, worker: int, deltas: dict[str, float]) -> None:
        if not 0 <= worker < MAX_WORKERS:
            return
        base = worker * len(WORKER_FIELDS)
        for i, key in enumerate(WORKER_FIELDS):
            self._table[base + i] += float(deltas.get(key) or 0.0)

    def reset(self) -> None:
        for i in range(len(self._table)):
            self._table[i] = 0.0

    def per_worker(self) -> list[dict[str, Any]]:
        """One dict per worker slot that has read anything, with its rate (batches/s)."""
        out = []
        width = len(WORKER_FIELDS)
        for w in range(MAX_WORKERS):
            row = dict(zip(WORKER_FIELDS, self._table[w * width : (w + 1) * width], strict=True))
            if not row["batches"] and not row["seconds"]:
                continue
            row["worker"] = w
            row["batches_per_s"] = row["batches"] / row["seconds"] if row["seconds"] else None
            row["batches"] = int(row["batches"])
            out.append(row)
        return out


def snapshot(report: dict[str, Any], cpu_s: float, seconds: float) -> dict[str, float]:
    """The cumulative figures of one worker's loader that :class:`WorkerCounters` adds up."""
    return {
        "batches": report["batches"],
        "seconds": seconds,
        "cpu_s": cpu_s,
        "read_s": report["read_s"],
        "copy_s": report["copy_s"],
        "wait_s": report["wait_s"],
        "bytes_read": report["bytes_read"] or 0,
        "bytes_delivered": report["bytes_delivered"] or 0,
        "source_read_s": report["source_read_s"] or 0,
        "regions": report["regions"] or 0,
    }


def with_workers(report: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The training process's report with its reader processes' figures added in: totals over
    every process, and ``workers``, one entry each (``batches_per_s``, ``cpu_s``, ...)."""
    if not workers:
        return report
    out = dict(report)
    for key in ("batches", "read_s", "copy_s", "bytes_read", "bytes_delivered", "source_read_s", "regions"):
        out[key] = (out[key] or 0) + sum(w[key] for w in workers)
    out["worker_wait_s"] = sum(w["wait_s"] for w in workers)
    out["regions"] = int(out["regions"])
    delivered = out["bytes_delivered"]
    out["read_amplification"] = out["bytes_read"] / delivered if delivered else None
    out["workers"] = workers
    out["worker_cpu_s"] = sum(w["cpu_s"] for w in workers)
    return out

"""One real-scale measurement in a fresh process (``benchmarks/child.py`` runs it).

The loader reads one pass of ``batches`` batches with a chunk cache capped below the data set
(``SCANCACHE_LOCAL_CACHE_BYTES`` set by the parent; the server's ``--cache-bytes`` over HTTP),
and reports its rate, the sources' I/O counters over the pass (read amplification = bytes
decoded / bytes delivered), the loader's own time split where it has ``stats()``, and how well
the epoch order is shuffled, next to a uniform permutation of the same examples.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.timing import cpu_usage

SHUFFLE_BATCH = 16  # distinct scans are counted per 16 consecutive examples, whatever the batch


def _counters(sources: Sequence[Any]) -> dict[str, float]:
    total: dict[str, float] = {}
    for source in sources:
        for key, value in source.io_counters().items():
            total[key] = total.get(key, 0) + value
    return total


def disk_read_bytes() -> int:
    """Bytes this process has read from the block device (not the page cache): Linux's
    ``/proc/self/io`` ``read_bytes``; 0 where it is not available."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("read_bytes", "0"))
    except (OSError, ValueError):
        return 0


def _chunk_key(element: Any, chunks: Sequence[int]) -> tuple[int, ...]:
    starts = [max(0, int(lo)) for lo, _ in element.window]
    return (int(element.scan), *(a // c for a, c in zip(starts, chunks, strict=True)))


def shuffle_quality(elements: Sequence[Any], chunks: Sequence[int]) -> dict[str, float]:
    """Mean/min distinct scans per 16 consecutive examples, and the share of consecutive
    examples that fall in the same chunk of the same scan."""
    scans = [int(e.scan) for e in elements]
    groups = [scans[i : i + SHUFFLE_BATCH] for i in range(0, len(scans) - SHUFFLE_BATCH + 1, SHUFFLE_BATCH)]
    distinct = [len(set(g)) for g in groups] or [len(set(scans))]
    keys = [_chunk_key(e, chunks) for e in elements]
    same = sum(a == b for a, b in itertools.pairwise(keys))
    return {
        "distinct_mean": float(np.mean(distinct)),
        "distinct_min": float(min(distinct)),
        "same_chunk": same / max(1, len(keys) - 1),
    }


def realscale_measure(spec: dict[str, Any]) -> dict[str, Any]:
    from loaders import Config, DatasetCatalog, build_loader

    cfg = Config(
        TAG=spec["tag"],
        CATEGORIES=[c if isinstance(c, int) else tuple(c) for c in spec["categories"]],
        INCLUDE_BACKGROUND=True,
        IMG_SIZE=tuple(spec["img_size"]),
        SEED=0,
        PATCHES_PER_SCAN=int(spec.get("patches_per_scan", 8)),
    )
    DatasetCatalog.remove("bench")
    DatasetCatalog.register("bench", spec["source"])
    loader = build_loader(
        cfg, "bench", batch_size=int(spec["batch_size"]), is_test=False, shuffle=True, drop_last=True
    )
    sources = list({id(s.source): s.source for s in loader.scans}.values())
    n = min(int(spec["batches"]), len(loader))
    epoch = [e for i in range(len(loader)) for e in loader.batch_elements(i)]
    chunks = [int(c) for c in loader.scans[0].meta.attrs.get("layout", {}).get("chunks", (64, 64, 8))]
    uniform = [epoch[i] for i in np.random.default_rng(1).permutation(len(epoch))]
    if hasattr(loader, "reset_stats"):
        loader.reset_stats()
    before = _counters(sources)
    disk_before = disk_read_bytes()
    cpu_before = cpu_usage()
    t0 = time.perf_counter()
    shapes: list[list[int]] = []
    for i in range(n):
        x, y = loader[i][:2]
        assert x.shape[0] == int(spec["batch_size"])
        shapes = [list(x.shape), list(y.shape)]
    wall = time.perf_counter() - t0
    cpu = {k: v - cpu_before[k] for k, v in cpu_usage().items()}
    disk = disk_read_bytes() - disk_before
    after = _counters(sources)
    stats = dict(loader.stats()) if hasattr(loader, "stats") else {}
    next_rate = None
    if spec.get("next_epoch") and hasattr(loader, "set_epoch"):
        # the same process's next epoch: caches still capped (the data does not fit), but the
        # arrays are open and the memory the first epoch touched is reused
        loader.set_epoch(1)
        m = min(int(spec["batches"]), len(loader))
        t1 = time.perf_counter()
        for i in range(m):
            loader[i]
        next_rate = m * int(spec["batch_size"]) / (time.perf_counter() - t1)
    loader.close()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    return {
        "rate": n * int(spec["batch_size"]) / wall,
        "next_epoch_rate": next_rate,
        "wall_s": wall,
        "batches": n,
        "bytes_decoded": delta.get("bytes_decoded", 0),
        "bytes_returned": delta.get("bytes_returned", 0),
        "read_s": delta.get("read_s", 0.0),
        "disk_bytes": disk,
        "cpu": cpu,
        "batch_shapes": shapes,  # x and y of a batch (float32), for the copy ceiling
        "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float)) or v is None},
        "shuffle": shuffle_quality(epoch, chunks),
        "shuffle_uniform": shuffle_quality(uniform, chunks),
    }

"""Small timing helpers shared by the benchmarks."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(fn: Callable[[int], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn(i)`` in milliseconds; ``i`` lets callers vary the input."""
    for i in range(warmup):
        fn(-1 - i)
    samples = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def total_s(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def copy_ceiling(shapes: list[list[int]], batches: int = 12, repeats: int = 3) -> float:
    """Examples a second that writing the batches alone allows on this machine: x and y of
    ``shapes`` (float32) filled with ``np.copyto`` from arrays already in memory, into arrays
    reused from batch to batch (no fresh pages), one example at a time, best of ``repeats``.
    No loader can deliver these batches faster; the bytes, not the reads, bound it."""
    arrays = [np.empty(shape, np.float32) for shape in shapes]
    sources = [np.random.default_rng(0).random(shape[1:], dtype=np.float32) for shape in shapes]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batches):
            for out, src in zip(arrays, sources, strict=True):
                for i in range(out.shape[0]):
                    np.copyto(out[i], src)
        best = min(best, time.perf_counter() - t0)
    return batches * shapes[0][0] / best


def cpu_usage() -> dict[str, float]:
    """This process's CPU seconds in user space and in the kernel, and its minor page faults
    (first touches of fresh memory), from ``getrusage``: subtract two readings."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": usage.ru_utime, "sys_s": usage.ru_stime, "faults": float(usage.ru_minflt)}


def describe_cpu(cpu: dict[str, float]) -> str:
    """Two :func:`cpu_usage` readings' difference, as the report words it."""
    return (
        f"CPU {cpu['user_s']:.2f} s in user space and {cpu['sys_s']:.2f} s in the kernel "
        f"({cpu['faults'] / 1e3:.0f}k page faults: first touches of fresh memory)"
    )

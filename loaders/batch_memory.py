"""Batch arrays that are used again once nobody holds them, and the threads that fill them.

A batch of 16 slices of 384x384 with 5 float32 channels is a 47 MB ``y``. A fresh array of that
size is a fresh ``mmap`` from the C library, and the kernel zero-fills every page on first
touch: measured ~10 ms a batch on the 2-core VM, a quarter of a whole 2D batch read from
blocks. So the loader keeps the arrays it handed out and gives one out again once the only
reference left is its own (CPython's reference count: a caller's variable, a view of it, a
torch tensor sharing its memory or a TensorFlow tensor aliasing it all hold one), never while
anything can still see its contents.

Filling a batch is mostly memory traffic (the y gather writes 2.9 MB of float32 a 384x384
example at 5 channels), and numpy releases the GIL while it copies and gathers. ``CopyThreads``
splits a batch's examples over the process's share of the cores (``store.reader_share.reader_cores``:
every core in one process, ``cores // k`` in each of k torch workers), the calling thread
included, so one read-ahead thread no longer fills every batch on one core while the others wait.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from store.reader_share import reader_cores

_OWN_REFERENCES = 3  # the pool's list, the loop variable, getrefcount's argument


class BatchArrays:
    """``empty(shape, dtype)``: like ``np.empty``, reusing an array of that shape nobody holds.

    ``keep``: arrays kept per loader (the batches in flight: read ahead plus being trained on).
    """

    def __init__(self, keep: int) -> None:
        self.keep = max(0, int(keep))
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.reused = 0  # tests and stats

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        with self._lock:
            for array in self._arrays:
                if (
                    array.shape == shape
                    and array.dtype == dtype
                    and sys.getrefcount(array) <= _OWN_REFERENCES
                ):
                    self.reused += 1
                    return array
            fresh = np.empty(shape, dtype)
            if self.keep:
                if len(self._arrays) >= self.keep:  # all held (or other shapes): forget the oldest
                    self._arrays.pop(0)
                self._arrays.append(fresh)
            return fresh


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``np.copyto(dst, src, casting="unsafe")``, channel by channel when ``src``'s last axis
    is its slowest (a 2.5D window cut from a slice-major block: its k slices lie a whole slice
    apart). numpy would otherwise run its inner loop over the k channels, ~3x slower."""
    if src.ndim >= 3 and src.shape[-1] > 1 and src.strides[-1] > max(src.strides[:-1]):
        for c in range(src.shape[-1]):
            np.copyto(dst[..., c], src[..., c], casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")


COPY_THREADS_MAX = 4  # past this, a batch's copies contend for memory bandwidth, not cores


class CopyThreads:
    """``run(tasks)``: the tasks (independent copies into one batch) on up to the process's
    share of the cores, this thread included; returns when all are done, raising the first
    error. The helper threads start when first needed and end with their owner."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    @staticmethod
    def threads(tasks: int) -> int:
        return max(1, min(COPY_THREADS_MAX, reader_cores(), tasks))

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        n = self.threads(len(tasks))
        if n == 1:
            for task in tasks:
                task()
            return
        parts = [tasks[i::n] for i in range(n)]
        pool = self._pool()
        helpers: list[Future[None]] = [pool.submit(_run_all, part) for part in parts[1:]]
        try:
            _run_all(parts[0])
        finally:
            errors = [f.exception() for f in helpers]  # waits for every helper
        for error in errors:
            if error is not None:
                raise error

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(COPY_THREADS_MAX - 1, thread_name_prefix="scancache-copy")
                self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False)
            return self._executor

    def close(self) -> None:
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._executor = self._finalizer = None


def _run_all(tasks: Sequence[Callable[[], None]]) -> None:
    for task in tasks:
        task()

"""Per-thread reusable buffers for the conversion's hot loops.

Why: fresh memory is expensive. A Dask worker runs with ``MALLOC_TRIM_THRESHOLD_=65536``
(distributed's default ``nanny.pre-spawn-environ``), which also turns off glibc's adaptive mmap
threshold, so every allocation above 128 KiB is a new ``mmap`` whose pages fault in on first
touch, and every free returns them. On the VMs we measured on, faulting in 75 MB cost about
0.2 s of CPU and as much again of wall time (docs/tuning.md, "Conversion") - as much as reading
a whole scan. Slab buffers, chunk buffers and compression output are therefore taken from
here and reused from slice to slice and from scan to scan.

Buffers are per thread (a worker with several threads runs several scans at once) and hold
the largest size asked for under each name: for a 384x384x160 knee scan some 100 MB per
thread, under half of one scan. Their contents are undefined when handed out. The job frees
them on every worker when its graph is done (``release_all``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import weakref
from functools import cache
from typing import Any

import numpy as np


class _Buffers:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.buffers = _Buffers()
        _EVERY_THREAD.add(self.buffers)


_EVERY_THREAD: weakref.WeakSet[_Buffers] = weakref.WeakSet()  # a thread's entry goes with it
_LOCAL = _PerThread()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A C-contiguous array of ``shape`` and ``dtype`` backed by this thread's buffer ``name``.

    The same name hands out the same memory again, so one caller must not use an array from a
    previous call under the same name after asking again.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    arrays = _LOCAL.buffers.arrays
    buffer = arrays.get(name)
    if buffer is None or buffer.size < nbytes:
        # round up a little so that a slightly larger scan does not reallocate
        buffer = np.empty(max(nbytes, 1) + nbytes // 16 + 4096, np.uint8)
        arrays[name] = buffer
    # align the view to the dtype (np.empty is 16-byte aligned; views start at 0)
    return buffer[:nbytes].view(dtype).reshape(shape)


def release_all() -> int:
    """Drop every thread's buffers; returns the bytes freed. Call only when no conversion runs
    in this process (the job calls it on each worker once its graph is done)."""
    freed = 0
    for buffers in list(_EVERY_THREAD):
        freed += sum(int(a.nbytes) for a in buffers.arrays.values())
        buffers.arrays.clear()
    return freed


# -- glibc: keep freed memory for reuse while a scan converts ----------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's <malloc.h>
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


@cache
def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None


def tune_malloc_for_conversion(keep_bytes: int = 64 << 20) -> bool:
    """Serve allocations up to 4 MiB from the heap and keep what is freed, in this process.

    The libraries called per file allocate and free large blocks each time: HDF5 some 1 MB of
    per-file metadata structures on every open, c-blosc a 260 KB work area per call. With
    Dask's ``MALLOC_TRIM_THRESHOLD_`` each of these is a fresh ``mmap`` (page faults, zeroing)
    and an ``munmap``: measured, some 40,000 page faults per knee scan and a third of the
    conversion's CPU time. The setting is process-wide, so the job calls this once per worker
    process before its graph runs (``client.run``), never from inside a task, where several
    threads would race to set and reset it; ``restore_malloc`` undoes it after the graph.
    Returns whether the C library could be tuned.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes)
    return True


def restore_malloc() -> bool:
    """Back to the environment's (or glibc's) thresholds, and the heap trimmed."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, _env_bytes("MALLOC_TRIM_THRESHOLD_"))
    libc.mallopt(_M_MMAP_THRESHOLD, _env_bytes("MALLOC_MMAP_THRESHOLD_"))
    libc.malloc_trim(0)
    return True


def _env_bytes(name: str) -> int:
    try:
        return int(os.environ.get(name, _GLIBC_DEFAULT_THRESHOLD))
    except ValueError:
        return _GLIBC_DEFAULT_THRESHOLD

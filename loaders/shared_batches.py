"""Batch memory a torch worker uses again once the training process has let go of it.

A worker's batch reaches the training process through shared memory. A fresh segment per
batch costs the worker a page fault for every 4 KiB it writes (the kernel zero-fills each new
page): measured ~1 ms of CPU per MB on the 2-core VM, about 3 ms per 384x384 slice with
float32 one-hot y, more than reading and decoding it. So each worker keeps a few segments
(``memfd``) and writes every batch into one the training process no longer uses:

* The worker leases a slot of a small shared table (one ``int64`` per worker and slot, created
  by the training process before its workers start) by writing a lease id into it.
* The batch travels as the segment's file descriptor; the training process maps it and wraps
  it in a numpy array that only the torch storage holds. When the storage dies (every tensor
  and view of it gone), a ``weakref.finalize`` on that array clears the slot, if it still
  holds the same lease (an older worker's release can never free a newer lease).
* A slot is written again only after that, so no reader ever sees its batch change.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import os
import threading
import weakref
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np

SLOTS = 32  # segments per worker: batches read ahead and queued by torch, times their arrays
MAX_WORKERS = 256

_tables: dict[int, Any] = {}  # token -> slot table, in the training process
_token_counter = itertools.count(1)
_lock = threading.Lock()


class SlotTable:
    """The lease table of one dataset, shared with its workers (``RawArray``)."""

    def __init__(self) -> None:
        self.cells = multiprocessing.RawArray("q", MAX_WORKERS * SLOTS)
        self.token = (os.getpid() << 20) | next(_token_counter)
        with _lock:
            _tables[self.token] = self.cells
        # releases after the dataset is gone have nothing left to free
        weakref.finalize(self, _tables.pop, self.token, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"cells": self.cells, "token": self.token}


def _release(token: int, cell: int, lease: int) -> None:
    cells = _tables.get(token)
    if cells is not None and cells[cell] == lease:
        cells[cell] = 0


class SharedBatch:
    """An array in a leased segment, on its way to the training process (pickles as a tensor)."""

    def __init__(self, pool: WorkerBatchPool, cell: int, lease: int, fd: int, array: np.ndarray) -> None:
        self.pool, self.cell, self.lease, self.fd, self.array = pool, cell, lease, fd, array
        self.channels_first = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        self.pool.sent(self.cell, self.lease)
        a = self.array
        args = (self.pool.token, self.cell, self.lease, DupFd(self.fd), a.nbytes, a.dtype.str, a.shape)
        return _rebuild, (*args, self.channels_first)


def _rebuild(
    token: int,
    cell: int,
    lease: int,
    dup: Any,
    nbytes: int,
    dtype: str,
    shape: tuple[int, ...],
    channels_first: bool,
) -> Any:
    import torch

    fd = dup.detach()
    try:
        segment = mmap.mmap(fd, max(1, nbytes))
    finally:
        os.close(fd)
    array = np.frombuffer(segment, dtype=np.dtype(dtype), count=int(np.prod(shape))).reshape(shape)
    # the storage alone holds ``array``: it dies when the last tensor or view of the batch does
    weakref.finalize(array, _release, token, cell, lease)
    tensor = torch.from_numpy(array)
    del array
    return tensor.movedim(-1, 1) if channels_first and tensor.ndim >= 3 else tensor


class WorkerBatchPool:
    """``empty(shape, dtype)`` in a worker: an array in a segment no reader holds any more."""

    def __init__(self, table: SlotTable, worker: int) -> None:
        self.cells, self.token, self.worker = table.cells, table.token, int(worker)
        self._segments: list[tuple[int, mmap.mmap, int]] = []  # (fd, mapping, bytes) per slot
        self._handed: dict[int, tuple[int, int]] = {}  # array address -> (cell, lease)
        self._unsent: set[int] = set()  # leases handed out but not (yet) sent
        self._leases = itertools.count(1)
        self._lock = threading.Lock()
        self.reused = 0

    def _cell(self, slot: int) -> int:
        return self.worker * SLOTS + slot

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if not 0 <= self.worker < MAX_WORKERS:
            return np.empty(shape, dtype)
        with self._lock:
            slot = next((s for s, seg in enumerate(self._segments)
                         if seg[2] == nbytes and self.cells[self._cell(s)] == 0), None)  # fmt: skip
            if slot is None:
                if len(self._segments) >= SLOTS:  # every slot held: a plain array (copied by torch)
                    return np.empty(shape, dtype)
                fd = os.memfd_create("scancache-batch", os.MFD_CLOEXEC)
                os.ftruncate(fd, max(1, nbytes))
                self._segments.append((fd, mmap.mmap(fd, max(1, nbytes)), nbytes))
                slot = len(self._segments) - 1
            else:
                self.reused += 1
            lease = (os.getpid() << 24) | next(self._leases)
            cell = self._cell(slot)
            self.cells[cell] = lease
            self._unsent.add(lease)
        array = np.frombuffer(self._segments[slot][1], dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self._handed[array.__array_interface__["data"][0]] = (slot, lease)
        # an array dropped in this process without being sent frees its slot at once
        weakref.finalize(array, self._dropped, cell, lease, array.__array_interface__["data"][0])
        return array

    def _dropped(self, cell: int, lease: int, address: int) -> None:
        with self._lock:
            if lease in self._unsent:
                self._unsent.discard(lease)
                if self._handed.get(address, (None, None))[1] == lease:
                    del self._handed[address]
                if self.cells[cell] == lease:
                    self.cells[cell] = 0

    def sent(self, cell: int, lease: int) -> None:
        with self._lock:
            self._unsent.discard(lease)

    def batch_of(self, array: np.ndarray) -> SharedBatch | None:
        """The array as it travels (handed out once), or None for an array not from this pool."""
        found = self._handed.pop(array.__array_interface__["data"][0], None)
        if found is None or not array.flags.c_contiguous:
            return None
        slot, lease = found
        if self.cells[self._cell(slot)] != lease:
            return None
        return SharedBatch(self, self._cell(slot), lease, self._segments[slot][0], array)

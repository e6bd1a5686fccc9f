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
* The training process keeps its mapping of each slot's segment and maps it again only when the
  slot's segment changes. A fresh mapping of a 47 MB batch costs the process that reads it
  (torch's pin-memory thread, or the model) ~720 page faults and 2-4 ms of CPU a batch on the
  2-core VM; a kept one costs none. Mappings of worker processes that have ended are dropped at
  ``set_epoch`` and when a new worker process first sends, and all of a dataset's when its
  table goes.
"""

from __future__ import annotations

import functools
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
# token -> cell -> ((device, inode, bytes), mapping): the segments the training process has mapped
_mappings: dict[int, dict[int, tuple[tuple[int, int, int], mmap.mmap]]] = {}
_senders: dict[tuple[int, int], int] = {}  # (token, worker) -> pid of the worker process that sent last
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
        weakref.finalize(self, _forget, self.token)

    def __getstate__(self) -> dict[str, Any]:
        return {"cells": self.cells, "token": self.token}


def _forget(token: int) -> None:
    with _lock:
        _tables.pop(token, None)
        _mappings.pop(token, None)
        for key in [k for k in _senders if k[0] == token]:
            del _senders[key]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours has ended
        return False
    return True


def _drop_worker(token: int, worker: int) -> None:
    """Forget the kept mappings of one worker (under ``_lock``); each is unmapped once the
    last tensor using it is gone."""
    kept = _mappings.get(token, {})
    for c in [c for c in kept if c // SLOTS == worker]:
        del kept[c]
    _senders.pop((token, worker), None)


def forget_ended_workers(token: int) -> None:
    """Drop the mappings of worker processes that have ended (a ``DataLoader`` without
    persistent workers ends them with every pass), so their memory goes now, not when their
    successors first send: called at ``set_epoch`` and whenever a new worker process sends."""
    with _lock:
        for (t, worker), pid in list(_senders.items()):
            if t == token and not _alive(pid):
                _drop_worker(token, worker)


def _mapping(token: int, cell: int, lease: int, fd: int, nbytes: int) -> mmap.mmap:
    """The training process's mapping of the segment behind ``fd``: the one kept for ``cell``
    when it is the same segment (device, inode, size), else a new one, kept in its place."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino, nbytes)
    worker, pid = cell // SLOTS, lease >> 24
    if _senders.get((token, worker)) != pid:  # a new process for this worker: its segments are new
        forget_ended_workers(token)
    with _lock:
        kept = _mappings.setdefault(token, {})
        if _senders.get((token, worker)) != pid:
            _drop_worker(token, worker)
            _senders[(token, worker)] = pid
        found = kept.get(cell)
        if found is not None and found[0] == ident:
            return found[1]
        segment = mmap.mmap(fd, nbytes)
        if token in _tables:  # only while the dataset lives, so that its end drops them
            kept[cell] = (ident, segment)
        return segment


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

    def tensor(self, channels_first: bool) -> Any:
        """The batch as the worker's code sees it: a tensor (``torch.flip`` on it, a
        ``collate_fn`` unpacking it work as on any tensor) that, sent to the training process
        as it is, travels as its segment; a tensor made from it travels as torch sends any."""
        import torch

        self.channels_first = channels_first
        tensor = torch.from_numpy(self.array)
        if channels_first:
            tensor = tensor.movedim(-1, 1)
        travelling: Any = tensor.as_subclass(_shared_tensor_class())
        travelling._scancache_batch = self
        travelling._scancache_view = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        return travelling


@functools.cache
def _shared_tensor_class() -> type:
    import torch

    class WorkerBatchTensor(torch.Tensor):
        """A worker's batch tensor in a leased segment. torch's operations on it give plain
        tensors (its ``__torch_function__`` is torch's disabled one), so only this object,
        unchanged in shape and place, travels as the segment; changed in place it still does
        (the segment holds the change)."""

        __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

        def __deepcopy__(self, memo: dict[int, Any]) -> Any:
            # a copy is the user's own tensor (torch's default would need new_empty of this type)
            copied = self.as_subclass(torch.Tensor).clone()
            memo[id(self)] = copied
            return copied

        def __copy__(self) -> Any:  # not through __reduce_ex__, which sends the segment
            return self.as_subclass(torch.Tensor)

        def __reduce_ex__(self, protocol: Any) -> Any:
            batch = self.__dict__.get("_scancache_batch")
            view = (self.data_ptr(), tuple(self.shape), tuple(self.stride()))
            if batch is not None and view == self.__dict__.get("_scancache_view"):
                return batch.__reduce__()
            return _plain_tensor, (self.as_subclass(torch.Tensor),)  # torch's own way (a copy)

    return WorkerBatchTensor


def _plain_tensor(tensor: Any) -> Any:
    return tensor


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
        segment = _mapping(token, cell, lease, fd, max(1, nbytes))
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
        self.pid = os.getpid()  # created in the worker process; its leases carry its pid
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
            lease = (self.pid << 24) | next(self._leases)
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

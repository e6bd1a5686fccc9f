"""Read-ahead of batches in background threads, bounded to a few batches.

Keras asks for batch ``i``; while the model trains on it, batches ``i+1 .. i+depth`` are read
in threads. Both sources release the GIL while reading (tensorstore decodes in C++ threads,
httpx waits on sockets), so the reads overlap the training step. A request for a batch that was
not read ahead is simply read at once, so any access order stays correct.

When batches come out of order (``model.fit`` shuffles batch order by default), reading
``i+1..`` ahead would be wasted work: the prefetcher then stops reading ahead until the next
``reset`` (epoch end), and Keras' own thread enqueuer, which reads ahead in the order it chose,
does the overlapping instead (``DataLoader`` turns it on).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(i, length)`` returns ``load(i)`` and schedules the next ``depth`` batches."""

    def __init__(self, load: Callable[[int], T], workers: int = 1, depth: int = 4) -> None:
        self._load = load
        self.workers = max(1, int(workers))
        self.depth = max(0, int(depth))
        self._futures: dict[int, Future[T]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self._last = -1
        self._out_of_order = 0
        self._sequential = True

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="scancache-prefetch")
            # Threads must not outlive the loader (they hold its source).
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def get(self, index: int, length: int) -> T:
        with self._lock:
            self._note_order(index)
            future = self._futures.pop(index, None)
            if self.depth and self._sequential:
                window = range(index + 1, min(length, index + 1 + self.depth))
                for stale in [i for i in self._futures if i not in window]:
                    self._futures.pop(stale).cancel()
                pool = self._pool()
                for ahead in window:
                    if ahead not in self._futures:
                        self._futures[ahead] = pool.submit(self._load, ahead)
        if future is not None and not future.cancelled():
            return future.result()
        return self._load(index)

    def _note_order(self, index: int) -> None:
        # A few stray requests (threads racing) are tolerated; a shuffled order is not followed.
        if index not in (0, self._last + 1):
            self._out_of_order += 1
            if self._out_of_order >= 3 and self._sequential:
                self._sequential = False
                for future in self._futures.values():
                    future.cancel()
                self._futures.clear()
        self._last = index

    def reset(self) -> None:
        """Forget read-ahead batches (the order changed, e.g. a new epoch's shuffle)."""
        with self._lock:
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()
            self._out_of_order = 0
            self._sequential = True
            self._last = -1

    def close(self) -> None:
        self.reset()
        if self._finalizer is not None:
            self._finalizer()
        self._executor = None

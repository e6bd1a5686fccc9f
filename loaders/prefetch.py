"""The loader's one read-ahead layer: batches read in background threads, a few ahead.

The caller says which batch it wants now and which it will want next (``get(key, ahead)``);
while the model trains on this one, the next ``depth`` are read in threads. Both sources
release the GIL while reading (tensorstore decodes in C++ threads, httpx waits on sockets), so
the reads overlap the training step. A batch that was not read ahead is read at once, and
read-ahead work that is no longer wanted is cancelled, so any access order stays correct.

The loader always knows what comes next: Keras' ``fit`` is served in the loader's own epoch
order (``DataLoader.__getitem__``), and iterators, tf.data and torch workers walk known lists of
batches. Keras' own worker threads are therefore off (``workers=1``): there is one layer.
"""

from __future__ import annotations

import inspect
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from store.interrupts import result_of

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def _weakly(load: Callable[[K], T]) -> Callable[[K], T]:
    """A bound method held by a weak reference to its object: the object (a loader) keeps its
    prefetcher, and the prefetcher must not keep it, or a loader dropped without ``close()``
    would wait for Python's full collection of cycles, its threads and batches alive meanwhile."""
    if not inspect.ismethod(load):
        return load
    method = weakref.WeakMethod(load)

    def call(key: K) -> T:
        bound = method()
        if bound is None:
            raise ReferenceError("the loader of this read-ahead was garbage-collected")
        return bound(key)

    return call


class Prefetcher(Generic[K, T]):
    """``get(key, ahead)`` returns ``load(key)`` and reads the first ``depth`` of ``ahead`` in threads."""

    def __init__(self, load: Callable[[K], T], workers: int = 1, depth: int = 4) -> None:
        self._load = _weakly(load)
        self.workers = max(1, int(workers))
        self.depth = max(0, int(depth))
        self._futures: dict[K, Future[T]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self.wait_s = 0.0  # time callers spent waiting for a batch that was not ready

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="scancache-prefetch")
            # Threads must not outlive the loader (they hold its source).
            self._finalizer = weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def get(self, key: K, ahead: Sequence[K] = ()) -> T:
        with self._lock:
            future = self._futures.pop(key, None)
            wanted = list(ahead[: self.depth])
            for stale in [k for k in self._futures if k not in wanted]:
                self._futures.pop(stale).cancel()
            if wanted:
                pool = self._pool()
                for k in wanted:
                    if k not in self._futures:
                        self._futures[k] = pool.submit(self._load, k)
        start = time.perf_counter()
        try:
            if future is not None and not future.cancelled():
                return result_of(future)  # a Ctrl-C waits for the wait's end (store.interrupts)
            return self._load(key)
        except BaseException:
            # the reads queued ahead would likely fail the same way, each after its own
            # retries; a caller that gives up must not wait for them (nor its exit: the pool's
            # threads run every queued read before they end)
            self.reset()
            raise
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.wait_s += elapsed

    def pending(self) -> set[K]:
        """Keys being read ahead (for tests and stats)."""
        with self._lock:
            return set(self._futures)

    def reset(self) -> None:
        """Forget read-ahead batches (e.g. the loader's state was replaced)."""
        with self._lock:
            for future in self._futures.values():
                future.cancel()
            self._futures.clear()

    def close(self) -> None:
        self.reset()
        if self._finalizer is not None:
            self._finalizer()
        self._executor = None

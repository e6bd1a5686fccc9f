"""One bounded, thread-safe LRU mapping for the project's caches: bounded in entries, in bytes
(``sizeof`` gives an entry's size), or both. ``LocalSource`` keeps metadata and open arrays
in it; any other cache of decoded things should too."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedLRU(Generic[V]):
    """``get`` refreshes an entry; ``put`` evicts the least recently used ones past a bound.

    An entry larger than ``max_bytes`` on its own is not kept.
    """

    def __init__(
        self,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        sizeof: Callable[[V], int] | None = None,
    ) -> None:
        if max_bytes is not None and sizeof is None:
            raise ValueError("max_bytes needs sizeof")
        self.max_entries, self.max_bytes, self._sizeof = max_entries, max_bytes, sizeof
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._sizeof(value) if self._sizeof is not None else 0
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            if self.max_bytes is not None and size > self.max_bytes:
                return
            self._items[key] = (value, size)
            self.nbytes += size
            while (self.max_entries is not None and len(self._items) > self.max_entries) or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped

    def at_least(self, entries: int) -> None:
        """Raise the entry bound to ``entries`` (never lower it): a cache sized for a working set
        that turned out larger (an LRU smaller than a cycle it serves misses every time)."""
        with self._lock:
            if self.max_entries is not None and entries > self.max_entries:
                self.max_entries = int(entries)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

"""A server-wide budget for bytes in flight: what all requests of one worker hold at once.

``--max-bytes`` bounds one response; without a bound on their sum, three concurrent requests
just under it take three times the memory. Each request that builds a body in memory holds its
cost (regions, batches, predictions: the bytes read or returned, whichever is larger; previews:
planes and raster; ``/zarr/`` files and JSON: the body, from 64 KiB) from before it reads until
its response has been sent, or until its client, having stopped reading, is cut off
(``--send-timeout``, service.server.http_protocol).
Requests past the budget queue in arrival order; one that waits longer than ``wait_s`` gets 503
with ``Retry-After`` (the HTTP client retries those). A request larger than the whole budget
(but within ``--max-bytes``) runs alone. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from service.server.errors import ServerBusy

RETRY_AFTER_S = 1


class InflightBudget:
    def __init__(self, limit: int, wait_s: float = 5.0) -> None:
        self.limit = int(limit)
        self.wait_s = float(wait_s)
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, cost: int) -> Callable[[], None]:
        """Wait for ``cost`` bytes of the budget; returns the (idempotent) release."""
        cost = max(0, min(int(cost), self.limit))
        if not self._waiters and self.used + cost <= self.limit:
            self.used += cost
            return self._releaser(cost)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.wait_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if future.done() and not future.cancelled():  # granted just as we gave up
                if isinstance(exc, asyncio.CancelledError):
                    self._release(cost)
                    raise
                return self._releaser(cost)
            future.cancel()
            self._waiters.remove(entry)
            self._grant()  # we may have been the head of the queue
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ServerBusy(
                f"the server is busy: {self.used} of {self.limit} bytes in flight"
                f" (--max-inflight-bytes); retry in {RETRY_AFTER_S} s",
                RETRY_AFTER_S,
            ) from None
        return self._releaser(cost)

    def _releaser(self, cost: int) -> Callable[[], None]:
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self._release(cost)

        return release

    def _release(self, cost: int) -> None:
        self.used -= cost
        self._grant()

    def _grant(self) -> None:
        """Admit waiters in arrival order while the head fits (a big one is not overtaken)."""
        while self._waiters:
            cost, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.used + cost > self.limit and self.used > 0:
                return
            self._waiters.popleft()
            self.used += cost
            future.set_result(None)

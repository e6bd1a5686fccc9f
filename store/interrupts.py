"""Ctrl-C and SIGTERM while the main thread waits on another thread: acted on between waits,
never inside one.

A signal handler that raises (Python's KeyboardInterrupt, the CLI's ``Terminated``) runs at
whatever bytecode the main thread is at, including inside ``threading.Condition.__enter__``
just after its lock was taken and before the ``with`` block that would release it. A thread
that takes the same lock later (a read-ahead thread finishing its future, Dask's event loop
notifying ``as_completed``) then blocks for ever, and the process hangs on its way out: seen
in CI, a preprocessing job sent SIGTERM did not exit in 60 s, its store still locked; a
read-ahead loader interrupted there raised "cannot release un-acquired lock".

Inside ``deferred()`` those signals are only recorded; ``check()``, called where the thread
waits, acts on them as the handlers in place before would have. A second signal of a kind acts
at once, so a process stuck in one long call still stops when asked again. ``result_of``,
``map_in_threads`` and ``wait_event`` are the waits of the main thread on other threads, done
that way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")
A = TypeVar("A")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.05  # how soon a deferred signal is acted on while a wait goes on


class _Deferral:
    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []

    def record(self, signum: int, frame: FrameType | None) -> None:
        if _active is not self or signum in self.pending:
            # the block has ended (a signal between two restores) or the user asked again:
            # act at once, whatever is running
            if signum in self.pending:
                self.pending.remove(signum)
            self.act(signum, frame)
        else:
            self.pending.append(signum)

    def act(self, signum: int, frame: FrameType | None) -> None:
        self.previous[signum](signum, frame)


_active: _Deferral | None = None  # one at most: a block inside another is plain


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait for ``check()`` (or the block's end). Only
    handlers written in Python are deferred: with the default action, an ignored signal or a
    handler set from C (torch's SIGTERM in its workers, which ``getsignal`` shows as the
    default) no Python code runs in the main thread, so nothing is left locked, and they are left
    alone. Outside the main thread (where handlers cannot be set), and inside another block
    (whose ``check()`` then acts), a plain block."""
    global _active
    if threading.current_thread() is not threading.main_thread() or _active is not None:
        yield
        return
    deferral = _active = _Deferral()
    try:
        for stop in STOP_SIGNALS:
            if callable(signal.getsignal(stop)):
                deferral.previous[stop] = signal.signal(stop, deferral.record)
        yield
    finally:
        _active = None
        for signum, handler in deferral.previous.items():
            signal.signal(signum, handler)
        if deferral.pending:
            deferral.act(deferral.pending.pop(0), None)


def check() -> None:
    """Act on a signal recorded by the active ``deferred()`` block (raises, as its handler
    does); nothing outside one."""
    if _active is not None and _active.pending:
        _active.act(_active.pending.pop(0), None)


def result_of(future: Future[T]) -> T:
    """``future.result()``, Ctrl-C and SIGTERM acted on between waits of ``POLL_S`` (a
    ``concurrent.futures`` future, or any with the same ``result(timeout)`` and ``done()``,
    such as Dask's)."""
    if threading.current_thread() is not threading.main_thread():
        return future.result()
    with deferred():
        while True:
            try:
                return future.result(timeout=POLL_S)
            except TimeoutError:
                if future.done():  # it ended meanwhile, or the work itself timed out
                    return future.result()
            check()


def results_of(futures: list[Future[T]]) -> list[T]:
    """Each future's result in order, as ``Executor.map`` gives them (those not started are
    cancelled when one fails), Ctrl-C and SIGTERM acted on between waits."""
    try:
        return [result_of(future) for future in futures]
    finally:
        for future in futures:
            future.cancel()


def map_in_threads(function: Callable[[A], T], items: Iterable[A], threads: int, name: str) -> Iterator[T]:
    """``function`` of each item on ``threads`` threads, the results in the items' order as
    each is ready, Ctrl-C and SIGTERM acted on between waits; on the way out (done, a failure,
    a signal, or the caller stopping early) the items not started are dropped, not waited for."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)
    try:
        futures = [pool.submit(function, item) for item in items]
        for future in futures:
            yield result_of(future)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def wait_event(event: threading.Event) -> None:
    """``event.wait()``, Ctrl-C and SIGTERM acted on between waits of ``POLL_S``."""
    if event.is_set():  # a plain read of its flag: no lock to leave taken
        return
    if threading.current_thread() is not threading.main_thread():
        event.wait()
        return
    with deferred():
        while not event.wait(POLL_S):
            check()


def interrupt_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that ``err`` was raised while handling, if any: a C extension
    interrupted while it loads raises ``ImportError`` from it, which is no failure of the
    work (nor damage in what was being read)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None

"""Ctrl-C and SIGTERM while the job talks to Dask: acted on between waits, never inside one.

A signal handler that raises (Python's KeyboardInterrupt, the CLI's ``Terminated``) runs at
whatever bytecode the main thread is at, including inside ``threading.Condition.__enter__``
just after its lock was taken and before the ``with`` block that would release it. Dask's
event-loop thread takes the same locks (``as_completed`` notifies its waiter under them, every
blocking call sets an Event), so it then blocks for ever: the job hangs on its way out, its
cluster never closes and the store's lock is never released (seen in CI: a job sent SIGTERM in
the middle of a run did not exit in 60 s).

Inside ``deferred()`` those signals are only recorded; ``check()``, called where the job waits,
acts on them as the handlers in place before would have. A second signal of a kind acts at once,
so a job stuck in one long call still stops when asked again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Deferral:
    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []

    def record(self, signum: int, frame: FrameType | None) -> None:
        if signum in self.pending:  # asked again: the user means it, whatever is running
            self.pending.remove(signum)
            self.act(signum, frame)
        else:
            self.pending.append(signum)

    def act(self, signum: int, frame: FrameType | None) -> None:
        handler = self.previous.get(signum, signal.SIG_DFL)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # what the signal would have done: stop the process
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


_active: list[_Deferral] = []


@contextmanager
def deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait for ``check()`` (or the block's end). Outside
    the main thread (where handlers cannot be set) a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deferral = _Deferral()
    for signum in STOP_SIGNALS:
        deferral.previous[signum] = signal.signal(signum, deferral.record)
    _active.append(deferral)
    try:
        yield
    finally:
        _active.remove(deferral)
        for signum, handler in deferral.previous.items():
            signal.signal(signum, handler)
        if deferral.pending:
            deferral.act(deferral.pending.pop(0), None)


def check() -> None:
    """Act on a signal recorded by the innermost ``deferred()`` block (raises, as its handler
    does); nothing outside one."""
    if _active and _active[-1].pending:
        deferral = _active[-1]
        deferral.act(deferral.pending.pop(0), None)

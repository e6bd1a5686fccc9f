"""The Dask cluster a job runs on, watched: a job that no worker can run says so, and a lost
scheduler ends the job in one line.

Dask itself waits without a word for a worker to appear (the job looks hung, holding the
store's lock), and on losing the scheduler cancels every future: each would be a failure line
of its own, blaming a worker, after the connect timeout.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from store.errors import ScanCacheError
from store.units import count_of

WATCH_EVERY_S = 2.0  # how often the number of workers is asked
NO_WORKER_WARNING_S = 10.0  # how long without any worker before saying so


class SchedulerLost(ScanCacheError, ConnectionError):
    """The job's connection to its Dask scheduler is gone."""


def is_scheduler_lost(err: BaseException, client: Any) -> bool:
    """Whether a task's error says the client lost its scheduler (not that a task failed): the
    reason says so, or the task was cancelled (reason "unknown") by a client that has given up
    reconnecting."""
    name = type(err).__name__
    if "scheduler-connection-lost" in str(err) or name == "CommClosedError":
        return True
    return (
        name in ("FutureCancelledError", "CancelledError")
        and getattr(client, "status", "running") != "running"
    )


def scheduler_lost(scheduler: str, converted: int, left: int) -> SchedulerLost:
    return SchedulerLost(
        f"lost the Dask scheduler {scheduler}: {count_of(left, 'scan')} not converted ({converted} done and kept); "
        "run the job again when the scheduler is back (done scans are skipped)"
    )


@contextlib.contextmanager
def warn_without_workers(
    client: Any,
    scheduler: str,
    warn: Callable[[str], None],
    every: float = WATCH_EVERY_S,
    after: float = NO_WORKER_WARNING_S,
) -> Iterator[None]:
    """While the block runs, say once (per spell) when the cluster has had no worker for
    ``after`` seconds, and again when workers are back."""
    stop = threading.Event()

    def watch() -> None:
        idle = 0.0
        warned = False
        while not stop.wait(every):
            try:
                workers = len(client.nthreads())
            except Exception:  # the scheduler is gone: the job's own loop reports it
                return
            if workers:
                if warned:
                    warn(f"{workers} Dask worker{'s' if workers != 1 else ''} connected: going on")
                idle, warned = 0.0, False
                continue
            idle += every
            if idle >= after and not warned:
                warn(
                    f"no Dask worker is connected to {scheduler} (for {idle:.0f} s): the job waits for one; "
                    f"start workers with `dask worker {scheduler}`"
                )
                warned = True

    thread = threading.Thread(target=watch, name="scancache-cluster-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 5)

"""The Dask client a preprocessing job runs on: a running cluster's scheduler (``--scheduler``),
or a quiet local cluster of worker processes sized to the cores this process may use."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from store.reader_share import usable_cores


@contextmanager
def dask_client(
    scheduler: str | None, workers: int | None, tasks: int | None = None, dashboard: str | None = None
) -> Iterator[Any]:
    """A ``distributed.Client`` on the given scheduler, or on a quiet LocalCluster: no dashboard
    unless ``dashboard`` (an address such as ``127.0.0.1:8787``) asks for one."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:  # connect timeout: distributed.comm.timeouts.connect
            yield client
        return
    n_workers = max(1, int(workers or usable_cores()))  # the cores this process may use
    if tasks is not None:  # no idle processes to start for a handful of scans
        n_workers = max(1, min(n_workers, tasks))
    # Even with dashboard_address=None the scheduler opens its HTTP routes (health, metrics) on
    # port 8787 and warns "Port 8787 is already in use" when another cluster holds it: give
    # those routes a free loopback port instead.
    quiet: dict[str, Any] = {"scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}
    # A SIGTERM to the whole process group (``timeout``, a batch scheduler) kills the workers
    # before they free their semaphores, and multiprocessing's resource tracker, started with
    # this interpreter's -W options, then warns of "leaked semaphore objects" after the job's
    # one line: nothing leaks once the tracker has cleaned up, so it is told to keep quiet.
    added = _QUIET_TRACKER not in sys.warnoptions
    if added:  # only while the cluster (and so the tracker) starts: pytest reads these too
        sys.warnoptions.append(_QUIET_TRACKER)
    try:
        with _workers_ignore_sigint():  # only while the worker processes start
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard,
                silence_logs=logging.ERROR,
                **({} if dashboard else quiet),
            )
    finally:
        if added and _QUIET_TRACKER in sys.warnoptions:
            sys.warnoptions.remove(_QUIET_TRACKER)
    with cluster, Client(cluster) as client:
        yield client


_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Ctrl-C reaches every process of the terminal's group: the local cluster's worker
    processes would each print a KeyboardInterrupt traceback. They start with SIGINT ignored
    (an ignored signal is inherited across exec; a blocked one is not: multiprocessing's spawn
    starts its children with an empty mask), and this process, which stops them, takes it again
    at once. A Ctrl-C while they start is lost: the next one stops the job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

"""The preprocessing job: every scan of a source into the store, as one Dask graph.

Each scan is one task (``service.scan_task.convert_scan``): it skips a scan the store already
holds, converts and publishes the others, and never raises for bad input (a failure is a
one-line ``ScanResult``), so one bad scan never stops the others.

By default the graph runs on a ``LocalCluster`` (processes, one thread each); with
``scheduler="tcp://host:port"`` it runs on an existing cluster whose workers see the same
filesystem paths (source and store), e.g. dask-jobqueue on SLURM.

One job per store: the job holds ``STORE/.lock`` (``store.lock``) while it runs, stages
in a folder of its own, and afterwards lists (or with ``prune`` removes) scans whose sources
are gone and deletes versions superseded more than ``grace_s`` seconds ago.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from service.cluster_watch import SchedulerLost, is_scheduler_lost, scheduler_lost, warn_without_workers
from service.job_summary import CONVERTED, FAILED, SKIPPED, ScanResult, Summary
from service.local_cluster import dask_client
from service.nnunet_dataset import NIFTI_KIND
from service.scan_task import convert_scan, up_to_date
from service.sources import ScanOptions, ScanSpec, discover
from store import interrupts, publish
from store.errors import LockLost, one_line
from store.format import ChunkLayout
from store.inventory import ensure_store
from store.progress import Progress
from store.scratch import release_all, restore_malloc, tune_malloc_for_conversion
from store.storage import is_s3_url
from store.units import count_of

# Re-exported: scripts and the benchmarks import them from here.
__all__ = [
    "CONVERTED",
    "FAILED",
    "SKIPPED",
    "ScanResult",
    "Summary",
    "convert_scan",
    "dask_client",
    "run_preprocess",
    "with_user_options",
]


T = TypeVar("T")


# -- running the graph ------------------------------------------------------------------------
def _upkeep(summary: Summary, what: str, work: Callable[..., T], *args: Any) -> T | None:
    """The store's upkeep after the scans: a failure (the store made read-only meanwhile, a
    folder whose permissions changed) is a line of the summary, which is still reported, not an
    error in its place that hides which scans converted and which failed."""
    try:
        return work(*args)
    except publish.LeftInStore as err:  # another user's leftovers: room taken, nothing wrong read
        summary.upkeep_left.append(f"{what}: {one_line(err)}")
        return getattr(err, "done", None)  # type: ignore[return-value]  # what was removed all the same
    except OSError as err:  # a StoreUnavailable (S3) too
        summary.upkeep_failures.append(f"{what}: {one_line(err)}")
        return None


def _warner(stream: IO[str]) -> Callable[[str], None]:
    """The job's one way to warn: a line on ``stream``, however quiet the progress is."""

    def warn(message: str) -> None:
        print(f"preprocess: warning: {message}", file=stream, flush=True)

    return warn


def run_preprocess(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    scheduler: str | None = None,
    workers: int | None = None,
    layout: ChunkLayout | None = None,
    progress: bool = True,
    stream: IO[str] | None = None,
    on_result: Callable[[ScanResult], None] | None = None,
    wait: bool = False,
    prune: bool = False,
    grace_s: float = publish.DEFAULT_GRACE_S,
    dashboard: str | None = None,
    class_names: tuple[str, ...] = (),
    spacing: tuple[float, float, float] | None = None,
    rebuild: tuple[str, ...] = (),
) -> Summary:
    """Convert every scan of ``source`` into ``store``; returns the summary.

    Raises ``EmptySource`` for a missing or empty source, ``ValueError`` if ``store`` is a
    directory that is not a scancache store (or one of another format), and ``StoreLocked``
    if another job holds the store (``wait=True``: wait for it). Per-scan problems never
    raise: they are failures in the summary. ``prune`` removes scans whose sources are gone;
    versions superseded more than ``grace_s`` seconds ago are deleted at the end.
    ``layout``: every scan's (None: a new scan gets the default, a stored one keeps its own, so
    a re-run after an upgrade that changed the default skips what is done).
    ``dashboard``: serve the local cluster's Dask dashboard at this address (none by default).
    ``class_names`` and ``spacing`` (MedSegPy sources only; ``ValueError`` for an nnU-Net
    dataset, which has its own): every scan's class names, and its spacing in mm where the
    source has none. ``rebuild``: scan ids converted again even where the store holds them from
    unchanged sources (a copy damaged after it was written); ``ValueError`` for an id the source
    does not have.
    """
    started = time.monotonic()
    stream = stream or sys.stderr
    found = discover(source)
    found.scans = with_user_options(found.scans, class_names, spacing)
    found.scans = marked_for_rebuild(found.scans, rebuild)
    location = str(store) if is_s3_url(str(store)) else Path(store).resolve()
    if scheduler and found.scans:
        check_scheduler_reachable(scheduler)  # before the store is made: no empty store left
    storage = ensure_store(location)
    summary = Summary()
    for err in found.failures:
        summary.add(ScanResult(err.scan, FAILED, str(err)))

    warn = _warner(stream)
    for note in found.notes:
        warn(note)
    lock = storage.lock(wait=wait, warn=warn)

    def still_held() -> None:
        """A lock on object storage taken over by another job (this one judged gone): stop
        before publishing or removing anything more."""
        if getattr(lock, "lost", False):
            raise LockLost(storage.url)

    with lock:
        _upkeep(summary, "removing what killed jobs left", storage.clean_stale_staging)
        # Local: one staging folder beside the store (publishing is a rename). Object storage:
        # each scan is staged on the disk of the worker converting it, then uploaded.
        staging = storage.new_staging("job") if storage.is_local else None
        try:
            todo = _skip_done(found.scans, storage.url, layout, summary, on_result, progress, stream)
            if todo:
                _convert_all(
                    todo,
                    storage.url,
                    staging,
                    layout,
                    summary,
                    scheduler,
                    workers,
                    progress,
                    stream,
                    on_result,
                    dashboard,
                    still_held,
                )
        finally:
            if staging is not None:
                _upkeep(summary, "removing the job's staging folder", storage.remove_staging, staging)
        still_held()
        known = {spec.scan_id for spec in found.scans} | {err.scan for err in found.failures}
        summary.orphans = _upkeep(summary, "listing the store's scans", storage.published_names) or []
        summary.orphans = [s for s in summary.orphans if s not in known]
        # a source folder not read (unlistable, a link out of the source, a name that is no
        # text): none of the store's scans is known to be gone
        summary.prune_withheld = prune and bool(found.unread_folders)
        if prune and not summary.prune_withheld:
            removed: list[str] = []
            for scan_id in summary.orphans:
                failures = len(summary.upkeep_failures)
                _upkeep(summary, f"removing {scan_id}", storage.unpublish, scan_id)
                (removed if len(summary.upkeep_failures) == failures else summary.prune_kept).append(scan_id)
            summary.orphans, summary.pruned = removed, True
        still_held()
        old = _upkeep(summary, "removing old versions", storage.remove_old_versions, grace_s)
        summary.removed_versions = len(old or [])
    if getattr(lock, "release_error", None):
        summary.upkeep_failures.append(f"removing the job's lock: {lock.release_error}")  # type: ignore[attr-defined]
    summary.seconds = time.monotonic() - started
    return summary


# scans checked at once on object storage (a round trip or two each); a local store's checks
# are page-cache reads, and threads only fight over the GIL (2000 scans: 1.9 s in one, 3.0 in 2)
UP_TO_DATE_CHECKS = 8


def _skip_done(
    specs: list[ScanSpec],
    store_url: str,
    layout: ChunkLayout | None,
    summary: Summary,
    on_result: Callable[[ScanResult], None] | None,
    progress: bool,
    stream: IO[str],
) -> list[ScanSpec]:
    """The scans still to convert: those the store holds as their sources are now are skipped
    here, before any worker starts (a task each would cost milliseconds of scheduling, and a
    cluster's start seconds, for nothing to do)."""
    if not specs:
        return []
    if not is_s3_url(store_url):
        done = [up_to_date(spec, store_url, layout) for spec in specs]
    else:  # each check mostly waits on requests
        check = partial(up_to_date, store=store_url, layout=layout)
        done = list(interrupts.map_in_threads(check, specs, UP_TO_DATE_CHECKS, "scancache-check"))
    for spec, skip in zip(specs, done, strict=True):
        if skip:
            result = ScanResult(spec.scan_id, SKIPPED)
            summary.add(result)
            if on_result is not None:
                on_result(result)
    if progress and any(done):
        print(f"preprocess: {count_of(sum(done), 'scan')} already in the store", file=stream, flush=True)
    return [spec for spec, skip in zip(specs, done, strict=True) if not skip]


def check_scheduler_reachable(address: str, timeout: float = 10.0) -> None:
    """One line, at once, for a ``tcp://host:port`` scheduler nothing listens on (Dask itself
    retries for its connect timeout, 30 s by default, then raises its own traceback-ish error)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme != "tcp" or not parts.hostname:
        return  # tls://, inproc:// or a form Dask parses itself: left to Dask
    try:
        port = parts.port
    except ValueError:  # "tcp://host:99999", "tcp://host:x"
        port = -1
    if port is None or port <= 0:
        raise ValueError(
            f"--scheduler {address}: give the scheduler's tcp://HOST:PORT (it listens on 8786 unless "
            "started with another --port)"
        )
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(
            f"--scheduler {address}: cannot reach the Dask scheduler ({err.strerror or type(err).__name__}); "
            "is it running, and is the address the one it printed?"
        ) from None


def marked_for_rebuild(specs: list[ScanSpec], rebuild: tuple[str, ...]) -> list[ScanSpec]:
    """The scans with those named by ``--rebuild`` marked to be converted whatever the store holds."""
    wanted = set(rebuild)
    unknown = sorted(wanted - {spec.scan_id for spec in specs})
    if unknown:
        raise ValueError(f"--rebuild {unknown[0]}: the source has no scan of that id")
    return [replace(spec, rebuild=True) if spec.scan_id in wanted else spec for spec in specs]


def with_user_options(
    specs: list[ScanSpec], class_names: tuple[str, ...], spacing: tuple[float, float, float] | None
) -> list[ScanSpec]:
    """The scans with ``--class-names``/``--spacing`` in their options (and so in their
    fingerprints: changing them re-converts)."""
    if not class_names and spacing is None:
        return specs
    if any(spec.kind == NIFTI_KIND for spec in specs):
        raise ValueError(
            "--class-names and --spacing are for MedSegPy sources; an nnU-Net dataset names its classes "
            "in dataset.json and each NIfTI file has its own spacing"
        )
    options = ScanOptions(class_names=tuple(class_names), spacing=spacing)
    return [replace(spec, options=options) for spec in specs]


def _convert_all(
    specs: list[ScanSpec],
    store_url: str,
    staging: Path | None,
    layout: ChunkLayout | None,
    summary: Summary,
    scheduler: str | None,
    workers: int | None,
    progress: bool,
    stream: IO[str],
    on_result: Callable[[ScanResult], None] | None,
    dashboard: str | None = None,
    still_held: Callable[[], None] = lambda: None,
) -> None:
    # Ctrl-C and SIGTERM are acted on where the job waits (store.interrupts says why)
    with interrupts.deferred(), dask_client(scheduler, workers, len(specs), dashboard) as client:
        if progress:
            n = len(client.scheduler_info()["workers"])
            where = scheduler or f"a local cluster of {n} worker{'s' if n != 1 else ''}"
            early = f" ({summary.failed} more failed before converting)" if summary.failed else ""
            print(
                f"preprocess: {count_of(len(specs), 'scan')} to check and convert on {where}{early}",
                file=stream,
                flush=True,
            )
        warn = _warner(stream)
        if dashboard and not scheduler:
            wanted = int(dashboard.rsplit(":", 1)[-1])
            serving = client.scheduler_info().get("services", {}).get("dashboard")
            moved = wanted != 0 and serving is not None and int(serving) != wanted
            taken = f" (port {wanted} was in use)" if moved else ""
            print(f"preprocess: dashboard at {client.dashboard_link}{taken}", file=stream, flush=True)
            if importlib.util.find_spec("bokeh") is None:  # Dask serves the page only with it
                warn("the dashboard needs bokeh: pip install bokeh")
        bar = Progress(
            summary.total + len(specs),
            label="preprocess",
            done=summary.total,
            enabled=progress,
            stream=stream,
        )
        _run_on_workers(client, tune_malloc_for_conversion)
        watching = warn_without_workers(client, scheduler, warn) if scheduler else contextlib.nullcontext()
        try:
            with watching:
                _run_graph(
                    client,
                    specs,
                    store_url,
                    None if staging is None else str(staging),
                    layout,
                    summary,
                    bar,
                    on_result,
                    scheduler or "of the local cluster",
                    still_held,
                )
        except BaseException as err:
            bar.close()
            # not on Ctrl-C or SIGTERM (the workers may be gone), nor without a scheduler (each
            # call would wait for the client to give up reconnecting)
            if isinstance(err, Exception) and not isinstance(err, SchedulerLost):
                _after_job_on_workers(client)
            raise
        bar.close()
        _after_job_on_workers(client)


def _after_job_on_workers(client: Any) -> None:
    """What a job leaves undone on a long-lived cluster's workers: its buffers and malloc tuning."""
    _run_on_workers(client, release_all)
    _run_on_workers(client, restore_malloc)


def _run_on_workers(client: Any, function: Callable[[], object]) -> None:
    """Once per worker process, between tasks (not from inside one): malloc tuning and
    returning the conversion buffers (some 100 MB each) that would otherwise stay with the
    workers' threads on a long-lived cluster."""
    try:
        client.run(function)
    except Exception:  # a worker gone or unreachable: its memory went with it
        pass


def _completed(
    futures: Any, poll_s: float = interrupts.POLL_S, still_held: Callable[[], None] = lambda: None
) -> Iterator[Any]:
    """The futures of a ``distributed.as_completed`` as they finish, a deferred Ctrl-C or
    SIGTERM acted on while none is ready (``store.interrupts``), and the job's lock checked
    (``still_held`` raises once another job took it over)."""
    while True:
        still_held()
        batch = futures.next_batch(block=False)
        if batch:
            yield from batch
        elif futures.is_empty():
            return
        else:
            interrupts.check()
            time.sleep(poll_s)


def _run_graph(
    client: Any,
    specs: list[ScanSpec],
    store: str,
    staging: str | None,
    layout: ChunkLayout | None,
    summary: Summary,
    bar: Progress,
    on_result: Callable[[ScanResult], None] | None,
    scheduler: str = "",
    still_held: Callable[[], None] = lambda: None,
) -> None:

    # One graph: a task per scan, keyed by scan id so the dashboard shows which scan runs.
    job = uuid.uuid4().hex[:8]  # two jobs on one cluster must not share keys
    keys = [f"convert-{spec.scan_id}-{job}" for spec in specs]
    futures = client.map(
        convert_scan, specs, store=store, layout=layout, staging=staging, key=keys, pure=False, retries=1
    )
    scan_of = {future.key: spec.scan_id for future, spec in zip(futures, specs, strict=True)}
    try:
        _collect(client, futures, scan_of, summary, bar, on_result, scheduler, still_held)
    except LockLost:  # tasks not yet started never start (those running finish their scan)
        with contextlib.suppress(Exception):  # a client cut off with its node: LockLost is the news
            client.cancel(futures)
        raise


def _collect(
    client: Any,
    futures: list[Any],
    scan_of: dict[str, str],
    summary: Summary,
    bar: Progress,
    on_result: Callable[[ScanResult], None] | None,
    scheduler: str,
    still_held: Callable[[], None],
) -> None:
    """Each scan's result as its task ends (``finished``: results before it), counted and shown."""
    from distributed import as_completed

    for finished, future in enumerate(_completed(as_completed(futures), still_held=still_held)):
        try:
            # done, but Dask may compute it again (its worker died after): Ctrl-C acted on meanwhile
            result = interrupts.result_of(future)
        except Exception as err:  # the worker died (e.g. killed by the OOM killer) twice
            if is_scheduler_lost(err, client):  # every future is cancelled: one line, not one per scan
                raise scheduler_lost(scheduler, finished, len(futures) - finished) from None
            why = one_line(err, 200)
            scan = scan_of[future.key]
            result = ScanResult(scan, FAILED, f"{scan}: (worker): {type(err).__name__}: {why}")
        summary.add(result)
        bar.advance(summary.progress_note())
        if on_result is not None:
            on_result(result)
        future.release()

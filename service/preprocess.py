"""The preprocessing job: every scan of a source into the store, as one Dask graph.

Each scan is one task (``convert_scan``) that stats its sources, skips the scan if the store
already holds it with the same fingerprint and every file of its manifest, and otherwise reads
it, checks it and publishes it as a new version (``store.writer.StagedScan``). Tasks never raise for bad input: they return a
``ScanResult`` with a one-line message, so one bad scan never stops the others.

By default the graph runs on a ``LocalCluster`` (processes, one thread each); with
``scheduler="tcp://host:port"`` it runs on an existing cluster whose workers see the same
filesystem paths (source and store), e.g. dask-jobqueue on SLURM.

One job per store: the job holds ``STORE/.lock`` (``store.lock``) while it runs, stages
in a folder of its own, and afterwards lists (or with ``prune`` removes) scans whose sources
are gone and deletes versions superseded more than ``grace_s`` seconds ago.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.nifti_source import load_case
from service.nnunet_dataset import NIFTI_KIND
from service.slice_files import SliceReader, load_scan
from service.sources import ScanOptions, ScanSpec, discover, fingerprint
from store import publish
from store import writer as store_mod
from store.errors import SourceError, one_line
from store.format import ChunkLayout
from store.scratch import release_all, restore_malloc, scratch, tune_malloc_for_conversion
from store.storage import is_s3_url
from store.units import format_bytes

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


@dataclass(frozen=True)
class ScanResult:
    """What one task reports back (small: it travels from the worker to the client)."""

    scan_id: str
    status: str  # converted / skipped / failed
    message: str = ""  # for failures: "scan: file: why"
    bytes_in: int = 0
    bytes_out: int = 0
    worker: str = ""
    warning: str = ""  # e.g. non-finite voxels: converted exactly, but worth knowing


@dataclass
class Summary:
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    results: list[ScanResult] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)  # scans in the store whose sources are gone
    pruned: bool = False  # whether the orphans were removed
    removed_versions: int = 0

    def add(self, result: ScanResult) -> None:
        self.results.append(result)
        setattr(self, result.status, getattr(self, result.status) + 1)
        self.bytes_in += result.bytes_in
        self.bytes_out += result.bytes_out

    @property
    def total(self) -> int:
        return self.converted + self.skipped + self.failed

    def warnings(self) -> list[str]:
        return sorted(r.warning for r in self.results if r.warning)

    def failures(self) -> list[str]:
        """The failure lines (``scan: file: why``), sorted."""
        return sorted(r.message for r in self.results if r.status == FAILED)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def __str__(self) -> str:
        return (
            f"{self.converted} converted, {self.skipped} skipped, {self.failed} failed; "
            f"{format_bytes(self.bytes_in)} read, {format_bytes(self.bytes_out)} written in {self.seconds:.1f} s"
        )

    def report(self) -> str:
        lines = [
            f"scans: {self.converted} converted, {self.skipped} skipped, {self.failed} failed "
            f"in {self.seconds:.1f} s",
            f"bytes: {format_bytes(self.bytes_in)} read, {format_bytes(self.bytes_out)} written",
        ]
        if self.warnings():
            lines.append(f"warnings ({len(self.warnings())}):")
            lines.extend(f"  {message}" for message in self.warnings())
        if self.orphans:
            if self.pruned:
                lines.append(f"removed {len(self.orphans)} scans whose sources are gone:")
            else:
                lines.append(
                    f"{len(self.orphans)} scans in the store have no source any more "
                    "(kept; --prune removes them):"
                )
            lines.extend(f"  {scan_id}" for scan_id in self.orphans)
        if self.failed:
            lines.append(f"failures ({self.failed}):")
            lines.extend(f"  {message}" for message in self.failures())
        return "\n".join(lines)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return ""


def convert_scan(spec: ScanSpec, store: str, layout: ChunkLayout, staging: str | None = None) -> ScanResult:
    """One task: skip, convert or fail one scan. Never raises, never warns on stderr."""
    # numpy's floating-point warnings (NaN/Inf in a source) would go to a worker's stderr; the
    # result reports them instead. errstate is per thread (a context variable), unlike warnings
    with np.errstate(all="ignore"):
        return _convert_scan(spec, store, layout, staging)


def _convert_scan(spec: ScanSpec, store: str, layout: ChunkLayout, staging: str | None) -> ScanResult:
    worker = _worker_name()
    try:
        fp, source_bytes = fingerprint(spec, layout)
        published = store_mod.read_scan_attrs(store, spec.scan_id)
        if (
            published is not None
            and published.get("fingerprint") == fp
            and store_mod.manifest_problem(store, spec.scan_id, published) is None
        ):
            return ScanResult(spec.scan_id, SKIPPED, worker=worker)
        attrs: dict[str, Any] = {
            **spec.attrs(),
            "fingerprint": fp,
            "sources": {"files": len(spec.files), "bytes": source_bytes},
        }
        with store_mod.StagedScan(store, spec.scan_id, layout, staging) as staged:
            if spec.kind == NIFTI_KIND:
                case = load_case(spec)
                attrs.update(case.attrs)
                stats = store_mod.write_arrays(staged, case.image, case.mask, case.extra_channels)
            elif spec.kind == "2d":
                reader = SliceReader(spec)
                attrs.update(user_geometry(spec, reader.spacing, reader.num_classes))
                stats = _stream_slices(reader, staged, attrs)
            else:
                scan = load_scan(spec)
                if scan.spacing is not None:
                    attrs["spacing"] = scan.spacing
                num_classes = 0 if scan.mask is None else int(scan.mask.shape[3])
                attrs.update(user_geometry(spec, scan.spacing, num_classes))
                stats = store_mod.write_arrays(staged, scan.image, scan.mask)
            staged.publish(attrs, stats)
        warning = ""
        if stats.non_finite:
            warning = (
                f"{spec.scan_id}: {stats.non_finite} non-finite image voxels (NaN/Inf), stored as they "
                "are and left out of the intensity statistics"
            )
        return ScanResult(
            spec.scan_id,
            CONVERTED,
            bytes_in=source_bytes,
            bytes_out=staged.bytes_written,
            worker=worker,
            warning=warning,
        )
    except SourceError as err:
        return ScanResult(spec.scan_id, FAILED, str(err), worker=worker)
    except Exception as err:  # a write error, a full disk: still one line, still not fatal
        why = one_line(err, 200)
        return ScanResult(
            spec.scan_id, FAILED, f"{spec.scan_id}: (store): {type(err).__name__}: {why}", worker=worker
        )


def user_geometry(spec: ScanSpec, source_spacing: list[float] | None, num_classes: int) -> dict[str, Any]:
    """The attributes ``--spacing`` and ``--class-names`` give a MedSegPy scan: the spacing
    (and ``affine`` = diag(spacing, 1)) only where the source has none; the class names, whose
    count must be the scan's number of classes (an image-only scan records them as given: the
    classes a prediction of it names, ``ScanMeta.class_names``)."""
    out: dict[str, Any] = {}
    options = spec.options
    if options.spacing is not None and source_spacing is None:
        out["spacing"] = list(options.spacing)
        out["affine"] = np.diag([*options.spacing, 1.0]).tolist()
    if options.class_names:  # an image-only scan records them too: the dataset's classes
        if num_classes and len(options.class_names) != num_classes:
            raise SourceError(
                spec.scan_id,
                spec.files[-1],
                f"--class-names gives {len(options.class_names)} names, the scan has {num_classes} classes",
            )
        out["class_names"] = list(options.class_names)
    return out


def _stream_slices(
    reader: SliceReader, staged: store_mod.StagedScan, attrs: dict[str, Any]
) -> store_mod.ScanStatistics:
    """Read a 2D scan one shard-deep slab of slices at a time and write each slab's shards.

    Every slice file is read once, straight into a slab buffer, and its statistics taken while
    it is in the CPU cache; the buffers (one shard deep, some 50 MB for a knee scan) are reused
    from slab to slab, so memory stays far below one scan's size.
    """
    if reader.spacing is not None:
        attrs["spacing"] = reader.spacing
    height, width, depth = reader.shape
    image_out = staged.create_image(reader.shape, reader.dtype)
    mask_out = staged.create_mask((*reader.shape, reader.num_classes)) if reader.num_classes else None
    slab = min(image_out.slab_depth, depth)
    images = scratch("slab-image", (slab, height, width), reader.dtype)
    masks = scratch("slab-mask", (slab, height, width, reader.num_classes), np.uint8) if mask_out else None
    stats = store_mod.ScanStatistics(scratch=scratch("statistics", (height * width,), np.float64))
    for z0 in range(0, depth, slab):
        count = min(slab, depth - z0)
        for i in range(count):
            reader.read_image(z0 + i, images[i])
            stats.add_image(images[i])
        image_slab = images[:count].transpose(1, 2, 0)
        image_out.write_slab(z0, image_slab)
        mask_slab = None
        if mask_out is not None and masks is not None:
            for i in range(count):
                reader.read_mask(z0 + i, masks[i])
                stats.add_class_counts(store_mod.binary_class_counts(masks[i]))
            mask_slab = masks[:count].transpose(1, 2, 0, 3)
            mask_out.write_slab(z0, mask_slab)
        staged.slab_written(z0, image_slab, mask_slab)
    return stats


# -- running the graph ------------------------------------------------------------------------
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
    n_workers = max(1, int(workers or os.cpu_count() or 1))
    if tasks is not None:  # no idle processes to start for a handful of scans
        n_workers = max(1, min(n_workers, tasks))
    # Even with dashboard_address=None the scheduler opens its HTTP routes (health, metrics) on
    # port 8787 and warns "Port 8787 is already in use" when another cluster holds it: give
    # those routes a free loopback port instead.
    quiet: dict[str, Any] = {"scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            silence_logs=logging.ERROR,
            **({} if dashboard else quiet),
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


class Progress:
    """A tqdm bar on a terminal; otherwise a plain line every few seconds and at the end."""

    def __init__(self, total: int, done: int, enabled: bool, stream: IO[str], every: float = 5.0) -> None:
        self.total, self.enabled, self.stream, self.every = total, enabled, stream, every
        self.bar: Any = None
        self.last = time.monotonic()
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="scan", file=stream, dynamic_ncols=True)

    def update(self, summary: Summary) -> None:
        if not self.enabled:
            return
        text = f"converted {summary.converted}, skipped {summary.skipped}, failed {summary.failed}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if summary.total == self.total or now - self.last >= self.every:
            self.last = now
            print(f"preprocess: {summary.total}/{self.total} scans ({text})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
) -> Summary:
    """Convert every scan of ``source`` into ``store``; returns the summary.

    Raises ``EmptySource`` for a missing or empty source, ``ValueError`` if ``store`` is a
    directory that is not a scancache store (or one of another format), and ``StoreLocked``
    if another job holds the store (``wait=True``: wait for it). Per-scan problems never
    raise: they are failures in the summary. ``prune`` removes scans whose sources are gone;
    versions superseded more than ``grace_s`` seconds ago are deleted at the end.
    ``dashboard``: serve the local cluster's Dask dashboard at this address (none by default).
    ``class_names`` and ``spacing`` (MedSegPy sources only; ``ValueError`` for an nnU-Net
    dataset, which has its own): every scan's class names, and its spacing in mm where the
    source has none.
    """
    started = time.monotonic()
    stream = stream or sys.stderr
    layout = layout or ChunkLayout()
    found = discover(source)
    found.scans = with_user_options(found.scans, class_names, spacing)
    location = str(store) if is_s3_url(str(store)) else Path(store).resolve()
    storage = store_mod.ensure_store(location)
    summary = Summary()
    for err in found.failures:
        summary.add(ScanResult(err.scan, FAILED, str(err)))

    def warn(message: str) -> None:
        print(f"preprocess: warning: {message}", file=stream, flush=True)

    with storage.lock(wait=wait, warn=warn):
        storage.clean_stale_staging()  # what killed jobs left behind
        # Local: one staging folder beside the store (publishing is a rename). Object storage:
        # each scan is staged on the disk of the worker converting it, then uploaded.
        staging = storage.new_staging("job") if storage.is_local else None
        try:
            if found.scans:
                _convert_all(
                    found.scans,
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
                )
        finally:
            if staging is not None:
                storage.remove_staging(staging)
        known = {spec.scan_id for spec in found.scans} | {err.scan for err in found.failures}
        summary.orphans = [s for s in storage.published_names() if s not in known]
        if prune:
            for scan_id in summary.orphans:
                storage.unpublish(scan_id)
            summary.pruned = True
        summary.removed_versions = len(storage.remove_old_versions(grace_s))
    summary.seconds = time.monotonic() - started
    return summary


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
    layout: ChunkLayout,
    summary: Summary,
    scheduler: str | None,
    workers: int | None,
    progress: bool,
    stream: IO[str],
    on_result: Callable[[ScanResult], None] | None,
    dashboard: str | None = None,
) -> None:
    with dask_client(scheduler, workers, len(specs), dashboard) as client:
        if progress:
            where = scheduler or f"a local cluster of {len(client.scheduler_info()['workers'])} workers"
            print(f"preprocess: {len(specs)} scans on {where}", file=stream, flush=True)
        if dashboard and not scheduler:
            print(f"preprocess: dashboard at {client.dashboard_link}", file=stream, flush=True)
        bar = Progress(summary.total + len(specs), summary.total, progress, stream)
        _run_on_workers(client, tune_malloc_for_conversion)
        try:
            _run_graph(
                client,
                specs,
                store_url,
                None if staging is None else str(staging),
                layout,
                summary,
                bar,
                on_result,
            )
        finally:
            bar.close()
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


def _run_graph(
    client: Any,
    specs: list[ScanSpec],
    store: str,
    staging: str | None,
    layout: ChunkLayout,
    summary: Summary,
    bar: Progress,
    on_result: Callable[[ScanResult], None] | None,
) -> None:
    from distributed import as_completed

    # One graph: a task per scan, keyed by scan id so the dashboard shows which scan runs.
    job = uuid.uuid4().hex[:8]  # two jobs on one cluster must not share keys
    keys = [f"convert-{spec.scan_id}-{job}" for spec in specs]
    futures = client.map(
        convert_scan, specs, store=store, layout=layout, staging=staging, key=keys, pure=False, retries=1
    )
    scan_of = {future.key: spec.scan_id for future, spec in zip(futures, specs, strict=True)}
    for future in as_completed(futures):
        try:
            result = future.result()
        except Exception as err:  # the worker died (e.g. killed by the OOM killer) twice
            why = one_line(err, 200)
            scan = scan_of[future.key]
            result = ScanResult(scan, FAILED, f"{scan}: (worker): {type(err).__name__}: {why}")
        summary.add(result)
        bar.update(summary)
        if on_result is not None:
            on_result(result)
        future.release()

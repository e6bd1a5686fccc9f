"""One task of the preprocessing job: skip, convert or fail one scan (``convert_scan``).

The task stats the scan's sources, skips the scan if the store already holds it with the same
fingerprint and every file of its manifest, and otherwise reads it, checks it and publishes it
as a new version (``store.writer.StagedScan``). It never raises for bad input: it returns a
``ScanResult`` with a one-line message, so one bad scan never stops the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.job_summary import CONVERTED, FAILED, SKIPPED, ScanResult
from service.nifti_source import load_case
from service.nnunet_dataset import NIFTI_KIND
from service.slice_files import SliceReader, load_scan
from service.sources import ScanSpec, fingerprint
from store import writer as store_mod
from store.errors import SourceError, one_line
from store.format import ChunkLayout
from store.inventory import manifest_problem, read_scan_attrs
from store.scratch import scratch


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return ""


def convert_scan(
    spec: ScanSpec, store: str, layout: ChunkLayout | None, staging: str | None = None
) -> ScanResult:
    """One task: skip, convert or fail one scan. Never raises, never warns on stderr.

    ``layout`` None (none asked for): a new scan gets the default layout, and a scan already
    in the store keeps the layout it records (converted again in it only if its sources
    changed), so a re-run after the default changed (an upgrade) skips what is done instead of
    converting the whole store again. A layout given is every scan's."""
    # numpy's floating-point warnings (NaN/Inf in a source) would go to a worker's stderr; the
    # result reports them instead. errstate is per thread (a context variable), unlike warnings
    with np.errstate(all="ignore"):
        return _convert_scan(spec, store, layout, staging)


def _skip_check(spec: ScanSpec, store: str, asked: ChunkLayout | None) -> tuple[bool, ChunkLayout, str, int]:
    """(whether the store holds the scan as its sources are now, the layout to convert it in,
    the sources' fingerprint and bytes)."""
    published = read_scan_attrs(store, spec.scan_id)
    stored = ChunkLayout.from_json(published.get("layout")) if published is not None else None
    layout = asked or stored or ChunkLayout()
    fp, source_bytes = fingerprint(spec, layout)
    done = (
        not spec.rebuild
        and published is not None
        and published.get("fingerprint") == fp
        and manifest_problem(store, spec.scan_id, published) is None
    )
    return done, layout, fp, source_bytes


def up_to_date(spec: ScanSpec, store: str, layout: ChunkLayout | None) -> bool:
    """Would ``convert_scan`` skip this scan? Asked by the job before it starts any worker, so
    that a re-run over thousands of done scans sends no task for them (and starts no cluster
    when all are done). Never raises: where it cannot tell, the scan's task decides."""
    if spec.rebuild:
        return False
    try:
        with np.errstate(all="ignore"):
            return _skip_check(spec, store, layout)[0]
    except Exception:
        return False


def _convert_scan(spec: ScanSpec, store: str, asked: ChunkLayout | None, staging: str | None) -> ScanResult:
    worker = _worker_name()
    try:
        done, layout, fp, source_bytes = _skip_check(spec, store, asked)
        if done:
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
        # an OS error names its file (and, refused, whose it is): its class adds nothing
        named = isinstance(err, OSError) and err.filename is not None and err.strerror
        why = one_line(err, 300) if named else f"{type(err).__name__}: {one_line(err, 200)}"
        return ScanResult(spec.scan_id, FAILED, f"{spec.scan_id}: (store): {why}", worker=worker)


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

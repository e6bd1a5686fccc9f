"""Writing a scancache store: scans are written aside and published by an atomic rename.

A scan is staged under ``STORE/.staging/<scan_id>.<random>/``, its arrays and then its group
``zarr.json`` written there, and the directory renamed to ``STORE/<scan_id>``. Readers list
only top-level directories, so they never see a partial scan. Replacing an existing scan moves
the old one into staging first (a reader may briefly find the scan missing, never half-written).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from client.label_map import LABEL_MAP, LOCATIONS
from client.layout import (
    FORMAT_VERSION,
    IMAGE,
    MASK,
    STAGING_DIR,
    ChunkLayout,
    group_metadata,
    validate_scan_id,
)
from service.derived import LocationSampler, label_map_block, scan_seed
from service.shards import ShardedArrayWriter


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False))
    os.replace(tmp, path)


def ensure_store(root: str | os.PathLike[str]) -> Path:
    """Create the root group if needed; refuse a directory that is something else."""
    path = Path(root)
    meta = path / "zarr.json"
    if meta.exists():
        doc = json.loads(meta.read_text())
        if doc.get("node_type") != "group" or "scancache" not in doc.get("attributes", {}):
            raise ValueError(f"{root}: exists and is not a scancache store")
        return path
    if path.exists() and any(p for p in path.iterdir() if p.name != STAGING_DIR):
        raise ValueError(f"{root}: exists, is not empty and is not a scancache store")
    path.mkdir(parents=True, exist_ok=True)
    _write_json(meta, group_metadata({"scancache": {"format": FORMAT_VERSION}}))
    return path


def read_scan_attrs(root: str | os.PathLike[str], scan_id: str) -> dict[str, Any] | None:
    """The attributes of a published scan, or None if there is none (or it is unreadable)."""
    try:
        doc = json.loads((Path(root) / scan_id / "zarr.json").read_text())
        attrs = doc["attributes"]
        return attrs if isinstance(attrs, dict) else None
    except (OSError, ValueError, KeyError):
        return None


_STATISTICS_BLOCK = 1 << 20  # voxels per float64 scratch block (8 MB)


class ScanStatistics:
    """Intensity statistics and per-class voxel counts of a scan, accumulated block by block.

    Min and max are exact (taken in the source dtype). Mean and standard deviation are
    accumulated in float64 per block (a block's sum, then its squared deviations from the
    block mean in a reused float64 scratch buffer) and the blocks are merged with the
    parallel-variance formula of Chan et al., so a streaming pass over slices needs no float64
    copy of the volume and stays as accurate as a two-pass computation over the whole array.
    """

    def __init__(self, scratch: np.ndarray | None = None) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the running mean
        self.low, self.high = math.inf, -math.inf
        self.per_slice: list[list[int]] = []  # [z][class]
        self._scratch = np.empty(0, np.float64) if scratch is None else scratch.reshape(-1)

    def add_image(self, block: np.ndarray) -> None:
        """Any block of voxels (a slice, a slab); blocks may come in any order."""
        k = int(block.size)
        if k == 0:
            return
        if block.ndim == 3 and block.shape[2] > 1 and k > _STATISTICS_BLOCK:
            # a slab of a whole volume: slices at a time keep the float64 scratch small
            step = max(1, _STATISTICS_BLOCK // (block.shape[0] * block.shape[1]))
            for z0 in range(0, block.shape[2], step):
                self.add_image(block[:, :, z0 : z0 + step])
            return
        self.low = min(self.low, float(block.min()))
        self.high = max(self.high, float(block.max()))
        block_mean = float(block.sum(dtype=np.float64)) / k
        if self._scratch.size < k:
            self._scratch = np.empty(k, np.float64)
        deviation = self._scratch[:k].reshape(block.shape)
        np.subtract(block, block_mean, out=deviation, dtype=np.float64)
        np.multiply(deviation, deviation, out=deviation)
        block_m2 = float(deviation.sum())
        total = self.count + k
        delta = block_mean - self.mean
        self.mean += delta * k / total
        self.m2 += block_m2 + delta * delta * self.count * k / total
        self.count = total

    def add_class_counts(self, counts: np.ndarray) -> None:
        """Voxels per class of consecutive slices: (C,) for one slice or (dz, C)."""
        rows = np.asarray(counts, dtype=np.int64).reshape(-1, np.shape(counts)[-1])
        self.per_slice.extend(rows.tolist())

    def to_attrs(self) -> dict[str, Any]:
        std = math.sqrt(self.m2 / self.count) if self.count else 0.0
        totals = [sum(column) for column in zip(*self.per_slice, strict=True)]
        return {
            "intensity": {"min": self.low, "max": self.high, "mean": self.mean, "std": std},
            "class_voxels": totals,
            "class_voxels_per_slice": self.per_slice,
        }


def binary_class_counts(plane: np.ndarray) -> np.ndarray:
    """Voxels per class of one (H, W, C) slice holding only 0 and 1, as int64 (C,).

    numpy sums a strided class axis slowly (about 2.5 ms for a 384x384x6 slice). Here rows of
    whole voxels are added as uint8 vectors, at most 255 rows at a time (0/1 values cannot
    overflow), and the partial sums folded per class: about 0.05 ms.
    """
    classes = plane.shape[-1]
    flat = plane.reshape(-1)
    per_row = max(1, 4096 // classes)
    width = per_row * classes
    rows = flat.size // width
    counts = flat[rows * width :].reshape(-1, classes).sum(axis=0, dtype=np.int64)
    if rows:
        table = flat[: rows * width].reshape(rows, width)
        partial = np.zeros(width, np.int64)
        for start in range(0, rows, 255):
            partial += np.add.reduce(table[start : start + 255], axis=0, dtype=np.uint8)
        counts += partial.reshape(per_row, classes).sum(axis=0)
    return counts


def scan_statistics(image: np.ndarray, mask: np.ndarray | None, block_slices: int = 16) -> dict[str, Any]:
    """Intensity statistics and per-class voxel counts (total and per slice) of whole arrays."""
    stats = ScanStatistics()
    for z0 in range(0, image.shape[2], block_slices):
        stats.add_image(image[:, :, z0 : z0 + block_slices])
        if mask is not None:
            stats.add_class_counts(mask[:, :, z0 : z0 + block_slices].sum(axis=(0, 1), dtype=np.int64))
    return stats.to_attrs()


class StagedScan:
    """A scan being written under ``STORE/.staging/``: its arrays, then ``publish``.

    Used as a context manager: leaving it without ``publish`` (an error, a bad slice found
    half-way) removes everything written, so a store never holds part of a scan.
    """

    def __init__(self, root: str | os.PathLike[str], scan_id: str, layout: ChunkLayout) -> None:
        self.scan_id = validate_scan_id(scan_id)
        self.layout = layout
        self.store = ensure_store(root)
        staging = self.store / STAGING_DIR
        staging.mkdir(exist_ok=True)
        self.work = staging / f"{scan_id}.{uuid.uuid4().hex}"
        self.work.mkdir()
        self.image: ShardedArrayWriter | None = None
        self.mask: ShardedArrayWriter | None = None
        self.derived: DerivedArrays | None = None
        self.bytes_written = 0
        self.published = False

    def __enter__(self) -> StagedScan:
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in (self.image, self.mask):
            if writer is not None:
                writer.close()
        if self.derived is not None:
            self.derived.close()
        if not self.published:
            shutil.rmtree(self.work, ignore_errors=True)

    def create_image(self, shape: tuple[int, int, int], dtype: np.dtype) -> ShardedArrayWriter:
        native = np.dtype(dtype).newbyteorder("=")  # the store keeps values, not byte orders
        self.image = ShardedArrayWriter(self.work / IMAGE, shape, native, self.layout)
        return self.image

    def create_mask(self, shape: tuple[int, ...]) -> ShardedArrayWriter:
        self.mask = ShardedArrayWriter(self.work / MASK, shape, np.dtype(np.uint8), self.layout)
        self.derived = DerivedArrays(self.work, self.scan_id, shape, self.layout)
        return MaskWithDerived(self.mask, self.derived)  # type: ignore[return-value]

    def publish(self, attrs: dict[str, Any], stats: ScanStatistics) -> dict[str, Any]:
        """Write the group's attributes and move the scan into place; returns the attributes."""
        if self.image is None:
            raise ValueError(f"{self.scan_id}: no image array written")
        for writer in (self.image, self.mask):
            if writer is not None and writer.pending:
                raise ValueError(f"{self.scan_id}: {writer.path.name} has slices not written yet")
        full = {
            **attrs,
            "scan_id": self.scan_id,
            "shape": list(self.image.shape),
            "dtype": self.image.dtype.name,
            "num_classes": 0 if self.mask is None else self.mask.shape[3],
            "layout": self.layout.to_json(),
            "scancache_format": FORMAT_VERSION,
            **stats.to_attrs(),
            **(self.derived.finish() if self.derived is not None else {}),
        }
        group = self.work / "zarr.json"
        _write_json(group, group_metadata(full))
        self.bytes_written = sum(w.bytes_written for w in (self.image, self.mask) if w is not None)
        self.bytes_written += self.derived.bytes_written if self.derived is not None else 0
        self.bytes_written += group.stat().st_size
        publish(self.store, self.scan_id, self.work)
        self.published = True
        return full


def write_scan(
    root: str | os.PathLike[str],
    scan_id: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    attrs: dict[str, Any],
    layout: ChunkLayout | None = None,
) -> dict[str, Any]:
    """Write one scan and publish it atomically. Returns the scan's attributes.

    ``image`` is (H, W, D); ``mask`` is (H, W, D, C) binary or None. ``attrs`` holds the
    caller's attributes (split, subject_id, ..., fingerprint); shape, dtype, classes and
    statistics are computed here.
    """
    validate_scan_id(scan_id)
    layout = layout or ChunkLayout()
    if image.ndim != 3:
        raise ValueError(f"{scan_id}: image must be (H, W, D), got shape {image.shape}")
    if mask is not None and (mask.ndim != 4 or mask.shape[:3] != image.shape):
        raise ValueError(f"{scan_id}: mask shape {mask.shape} does not match image {image.shape}")
    with StagedScan(root, scan_id, layout) as staged:
        return staged.publish(attrs, write_arrays(staged, image, mask))


def write_arrays(staged: StagedScan, image: np.ndarray, mask: np.ndarray | None) -> ScanStatistics:
    """Write whole in-memory arrays into a staged scan, slab by slab; returns their statistics."""
    image_out = staged.create_image((image.shape[0], image.shape[1], image.shape[2]), image.dtype)
    mask_out = None if mask is None else staged.create_mask(mask.shape)
    stats = ScanStatistics()
    depth = image_out.slab_depth
    for z0 in range(0, image.shape[2], depth):
        block = image[:, :, z0 : z0 + depth]
        image_out.write_slab(z0, block)
        stats.add_image(block)
        if mask is not None and mask_out is not None:
            mask_block = mask[:, :, z0 : z0 + depth]
            mask_out.write_slab(z0, mask_block)
            stats.add_class_counts(mask_block.sum(axis=(0, 1), dtype=np.int64))
    return stats


def publish(store: Path, scan_id: str, work: Path) -> None:
    """Move a finished scan into place; an older version is moved aside and deleted."""
    target = store / scan_id
    old = None
    if target.exists():
        old = store / STAGING_DIR / f"{scan_id}.{uuid.uuid4().hex}.old"
        os.rename(target, old)
    os.rename(work, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(store)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_staging(root: str | os.PathLike[str]) -> int:
    """Remove what killed jobs left in staging; returns how many entries were removed."""
    staging = Path(root) / STAGING_DIR
    if not staging.is_dir():
        return 0
    count = 0
    for entry in staging.iterdir():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        count += 1
    try:
        staging.rmdir()
    except OSError:
        pass
    return count


class DerivedArrays:
    """Writes ``label_map`` and ``locations`` (store format 2, ``service/derived.py``) from the
    mask slabs as they are written. The label map is dropped at the first slab where two
    classes overlap; ``finish`` returns the scan attributes that describe what was written."""

    def __init__(self, work: Path, scan_id: str, shape: tuple[int, ...], layout: ChunkLayout) -> None:
        self.work = work
        volume = (int(shape[0]), int(shape[1]), int(shape[2]))
        self.labels: ShardedArrayWriter | None = ShardedArrayWriter(
            work / LABEL_MAP, volume, np.dtype(np.uint8), layout
        )
        self.sampler = LocationSampler(volume, int(shape[3]), scan_seed(scan_id))
        self.bytes_written = 0

    def add(self, z0: int, slab: np.ndarray) -> None:
        labels = label_map_block(slab) if self.labels is not None else None
        if labels is None and self.labels is not None:  # classes overlap: mask only
            self.labels.close()
            shutil.rmtree(self.labels.path, ignore_errors=True)
            self.labels = None
        if self.labels is not None and labels is not None:
            self.labels.write_slab(z0, labels)
        self.sampler.add(z0, slab, labels)

    def finish(self) -> dict[str, Any]:
        import zarr  # the core dependency every reader has; a small single-chunk array

        rows, counts = self.sampler.result()
        array = zarr.create_array(
            store=str(self.work / LOCATIONS),
            shape=rows.shape,
            chunks=(max(1, len(rows)), 3),
            dtype="int32",
            fill_value=0,
            dimension_names=["row", "yxz"],
            compressors=None,  # raw little-endian int32: HttpSource reads it from /zarr/ as is
        )
        if len(rows):
            array[:] = rows
        self.bytes_written = sum(f.stat().st_size for f in (self.work / LOCATIONS).rglob("*") if f.is_file())
        if self.labels is not None:
            self.bytes_written += self.labels.bytes_written
        return {"label_map": self.labels is not None, "location_counts": counts}

    def close(self) -> None:
        if self.labels is not None:
            self.labels.close()


class MaskWithDerived:
    """The mask writer as callers see it: each slab also feeds the derived arrays."""

    def __init__(self, mask: ShardedArrayWriter, derived: DerivedArrays) -> None:
        self._mask, self._derived = mask, derived

    def write_slab(self, z0: int, slab: np.ndarray) -> None:
        self._mask.write_slab(z0, slab)
        self._derived.add(z0, slab)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mask, name)

"""Writing a scancache store: scans are written aside and published by an atomic rename.

A scan is staged under ``STORE/.staging/<scan_id>.<random>/``, its arrays and then its group
``zarr.json`` written there, and the directory renamed to ``STORE/<scan_id>``. Readers list
only top-level directories, so they never see a partial scan. Replacing an existing scan moves
the old one into staging first (a reader may briefly find the scan missing, never half-written).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from client.layout import (
    FORMAT_VERSION,
    IMAGE,
    MASK,
    STAGING_DIR,
    ChunkLayout,
    array_metadata,
    group_metadata,
    validate_scan_id,
)


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


def scan_statistics(image: np.ndarray, mask: np.ndarray | None, block_slices: int = 16) -> dict[str, Any]:
    """Intensity statistics and per-class voxel counts (total and per slice).

    Computed over blocks of slices in float64 (two passes: mean, then squared deviations), so a
    full knee scan needs a few MB of temporaries rather than two float64 copies of the volume.
    """
    depth = image.shape[2]
    blocks = [slice(z, min(z + block_slices, depth)) for z in range(0, depth, block_slices)]
    total = 0.0
    low, high = np.inf, -np.inf
    for block in blocks:
        part = image[:, :, block].astype(np.float64)
        total += float(part.sum())
        low, high = min(low, float(part.min())), max(high, float(part.max()))
    mean = total / image.size
    squares = sum(float(np.square(image[:, :, block].astype(np.float64) - mean).sum()) for block in blocks)
    stats: dict[str, Any] = {
        "intensity": {"min": low, "max": high, "mean": mean, "std": float(np.sqrt(squares / image.size))}
    }
    if mask is not None:
        per_slice = mask.sum(axis=(0, 1), dtype=np.int64)  # (D, C)
        stats["class_voxels"] = [int(v) for v in per_slice.sum(axis=0)]
        stats["class_voxels_per_slice"] = per_slice.tolist()
    else:
        stats["class_voxels"] = []
        stats["class_voxels_per_slice"] = []
    return stats


def _write_array(path: Path, data: np.ndarray, layout: ChunkLayout) -> None:
    meta = array_metadata(data.shape, data.dtype.name, data.dtype.itemsize, layout)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "metadata": meta}
    arr = ts.open(spec, create=True, open=False).result()
    arr.write(np.ascontiguousarray(data)).result()


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
    store = ensure_store(root)
    staging = store / STAGING_DIR
    staging.mkdir(exist_ok=True)
    work = staging / f"{scan_id}.{uuid.uuid4().hex}"
    work.mkdir()
    try:
        _write_array(work / IMAGE, image, layout)
        if mask is not None:
            _write_array(work / MASK, mask.astype(np.uint8, copy=False), layout)
        full = {
            **attrs,
            "scan_id": scan_id,
            "shape": [int(n) for n in image.shape],
            "dtype": image.dtype.name,
            "num_classes": 0 if mask is None else int(mask.shape[3]),
            "layout": layout.to_json(),
            "scancache_format": FORMAT_VERSION,
            **scan_statistics(image, mask),
        }
        _write_json(work / "zarr.json", group_metadata(full))
        publish(store, scan_id, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return full


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

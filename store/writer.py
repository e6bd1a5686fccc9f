"""Writing a scancache store: scans are staged aside and published as a new version.

A scan is written under the job's staging folder ``STORE/.staging/<job>-<random>/``: its
arrays, then every extra array step (``ARRAY_STEPS``), then its group ``zarr.json`` carrying
the scan's attributes and a manifest (every file of the scan and its size). ``publish`` hands
the folder to ``store.publish.publish_version``: fsync, rename into
``STORE/.versions/<scan_id>/<version>``, atomic symlink switch of ``STORE/<scan_id>``. A
published version is never modified or moved; old ones are removed after a grace period.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from store import ome, ome_views
from store import publish as publish_mod
from store.derived import LocationSampler, label_map_block, scan_seed
from store.format import (
    FORMAT_VERSION,
    IMAGE,
    MASK,
    ChunkLayout,
    ScanMeta,
    channel_array,
    channel_dtype,
    group_metadata,
    validate_scan_id,
)
from store.inventory import MANIFEST, ensure_store, manifest_mismatch
from store.label_map import LABEL_MAP, LOCATIONS
from store.shards import ShardedArrayWriter
from store.statistics import ScanStatistics as ScanStatistics
from store.statistics import binary_class_counts as binary_class_counts
from store.statistics import scan_statistics as scan_statistics
from store.storage import LocalStorage, Storage


class ArrayStep:
    """An extra array (or other files) of every scan, written into the staged version folder.

    Subclass it and append the class to ``ARRAY_STEPS``: each ``StagedScan`` makes one
    instance. ``on_slab`` sees every slab of slices as it is written, image (H, W, dz) and
    mask (H, W, dz, C) or None, in increasing ``z0``, so a derived array needs no second pass
    over the data; ``finish`` runs once image and mask are complete, writes under
    ``self.staged.work`` and returns attributes to add to the scan. Files it writes go into
    the manifest. A step that raises fails the scan: nothing is published.
    """

    name = "step"

    def __init__(self, staged: StagedScan) -> None:
        self.staged = staged

    def on_slab(self, z0: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        return {}


ARRAY_STEPS: list[type[ArrayStep]] = []


class StagedScan:
    """A scan being written under a staging folder: its arrays, then ``publish``.

    ``staging``: the job's staging folder (``store.publish.new_staging``); without it the
    scan gets one of its own, removed on exit. Used as a context manager: leaving it without
    ``publish`` (an error, a bad slice found half-way) removes everything written, so a store
    never holds part of a scan.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | Storage,
        scan_id: str,
        layout: ChunkLayout,
        staging: str | os.PathLike[str] | None = None,
    ) -> None:
        self.scan_id = validate_scan_id(scan_id)
        self.layout = layout
        self.store = ensure_store(root)
        self._own_staging = None if staging is not None else self.store.new_staging("scan")
        parent = Path(staging) if staging is not None else self._own_staging
        assert parent is not None
        self.work = parent / f"{scan_id}.{uuid.uuid4().hex}"
        self.work.mkdir()
        self.image: ShardedArrayWriter | None = None
        self.mask: ShardedArrayWriter | None = None
        self.extra_channels: list[ShardedArrayWriter] = []  # image_c1, image_c2, ...
        self.steps: list[ArrayStep] = [step(self) for step in ARRAY_STEPS]
        self.bytes_written = 0
        self.published = False
        self.version: str | None = None
        self.stats: ScanStatistics | None = None

    def __enter__(self) -> StagedScan:
        return self

    def __exit__(self, *exc: object) -> None:
        for writer in self._writers():
            writer.close()
        for step in self.steps:  # an aborted scan: steps close what they hold open
            getattr(step, "close", lambda: None)()
        # unpublished: nothing of it is kept; published to object storage: the upload's source
        # (a local publish renamed the folder away)
        shutil.rmtree(self.work, ignore_errors=True)
        if self._own_staging is not None:
            self.store.remove_staging(self._own_staging)

    def create_image(self, shape: tuple[int, int, int], dtype: np.dtype) -> ShardedArrayWriter:
        native = np.dtype(dtype).newbyteorder("=")  # the store keeps values, not byte orders
        self.image = ShardedArrayWriter(self.work / IMAGE, shape, native, self.layout)
        return self.image

    def create_channel(self, shape: tuple[int, int, int], dtype: np.dtype) -> ShardedArrayWriter:
        """The next image channel's array (``image_c1``, then ``image_c2``, ...): the same
        layout as ``image``, so a loader reads all channels of a window with the same chunks."""
        name = channel_array(len(self.extra_channels) + 1)
        native = np.dtype(dtype).newbyteorder("=")
        writer = ShardedArrayWriter(self.work / name, shape, native, self.layout)
        self.extra_channels.append(writer)
        return writer

    def _writers(self) -> list[ShardedArrayWriter]:
        return [w for w in (self.image, self.mask, *self.extra_channels) if w is not None]

    def create_mask(self, shape: tuple[int, ...]) -> ShardedArrayWriter:
        self.mask = ShardedArrayWriter(self.work / MASK, shape, np.dtype(np.uint8), self.layout)
        return self.mask

    def slab_written(self, z0: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Called by the writers of slabs (``write_arrays``, the job's slice streaming)."""
        for step in self.steps:
            step.on_slab(z0, image, mask)

    def publish(self, attrs: dict[str, Any], stats: ScanStatistics) -> dict[str, Any]:
        """Run the extra array steps, write the group's attributes and manifest, and publish
        the folder as the scan's new version; returns the attributes."""
        if self.image is None:
            raise ValueError(f"{self.scan_id}: no image array written")
        for writer in self._writers():
            if writer.pending:
                raise ValueError(f"{self.scan_id}: {writer.path.name} has slices not written yet")
        for writer in self._writers():
            writer.close()  # every shard index written before the manifest counts bytes
        self.stats = stats
        extra: dict[str, Any] = {}
        for step in self.steps:
            extra.update(step.finish())
        num_classes = 0 if self.mask is None else self.mask.shape[3]
        full = {
            **attrs,
            "scan_id": self.scan_id,
            "shape": list(self.image.shape),
            "dtype": self.image.dtype.name,
            "num_classes": num_classes,
            "channels": 1 + len(self.extra_channels),
            "layout": self.layout.to_json(),
            "scancache_format": FORMAT_VERSION,
            **stats.to_attrs(),
            **extra,
        }
        ScanMeta.from_attrs(full)  # what readers will parse (the geometry too) parses: else not published
        # NGFF 0.5 for napari and neuroglancer: (z, y, x) views of the image and the label map
        # made of their stored chunks (store/ome_views.py), in mm from the scan's spacing
        full["ome"] = ome_views.write_scan_views(
            self.work,
            self.scan_id,
            IMAGE,
            LABEL_MAP if full.get("label_map") else None,
            ome.spacing_of(full),
            ome.class_names_of(full, num_classes),
            full.get("channel_names") or (),
            full.get("intensity"),
        )
        full[MANIFEST] = _manifest(self.work)
        problem = manifest_mismatch(LocalStorage(self.work).sizes(""), full)
        if problem is not None:  # never publish a scan whose arrays are not all there
            raise ValueError(f"{self.scan_id}: not published, {problem}")
        group = self.work / "zarr.json"
        publish_mod.write_json_durably(group, group_metadata(full))
        self.bytes_written = _stored_bytes(self.work)  # a hard-linked view's files count once
        self.version = self.store.publish(self.scan_id, self.work)
        self.published = True
        return full


def _stored_bytes(folder: Path) -> int:
    """Bytes of the files under a staged scan, a file with several names (hard links: the
    OME views, store/ome_views.py) counted once."""
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            st = (Path(dirpath) / name).stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _manifest(folder: Path) -> dict[str, int]:
    """Every file under a staged scan (relative posix path -> size), the group's own zarr.json
    excepted; sorted, so the same scan gives the same document."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(folder).as_posix()
            if rel != "zarr.json":
                out[rel] = full.stat().st_size
    return dict(sorted(out.items()))


def write_scan(
    root: str | os.PathLike[str],
    scan_id: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    attrs: dict[str, Any],
    layout: ChunkLayout | None = None,
    extra_channels: Sequence[np.ndarray] = (),
) -> dict[str, Any]:
    """Write one scan and publish it atomically. Returns the scan's attributes.

    ``image`` is (H, W, D); ``mask`` is (H, W, D, C) binary or None; ``extra_channels`` the
    image's channels 1, 2, ... (each (H, W, D), stored as ``image_c1``, ...). ``attrs`` holds
    the caller's attributes (split, subject_id, ..., fingerprint); shape, dtype, classes,
    channels and statistics are computed here.
    """
    validate_scan_id(scan_id)
    layout = layout or ChunkLayout()
    if image.ndim != 3:
        raise ValueError(f"{scan_id}: image must be (H, W, D), got shape {image.shape}")
    if mask is not None and (mask.ndim != 4 or mask.shape[:3] != image.shape):
        raise ValueError(f"{scan_id}: mask shape {mask.shape} does not match image {image.shape}")
    with StagedScan(root, scan_id, layout) as staged:
        return staged.publish(attrs, write_arrays(staged, image, mask, extra_channels))


class MaskSlabs(Protocol):
    """A mask given slab by slab (``mask[:, :, z0:z1]``), such as a NIfTI case's one-hot view
    of its label map, which is never made whole (``service.nifti_source.OneHotMask``)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray: ...


def write_arrays(
    staged: StagedScan,
    image: np.ndarray,
    mask: np.ndarray | MaskSlabs | None,
    extra_channels: Sequence[np.ndarray] = (),
) -> ScanStatistics:
    """Write whole in-memory arrays into a staged scan, slab by slab; returns their statistics
    (the intensity statistics are channel 0's)."""
    shape = (image.shape[0], image.shape[1], image.shape[2])
    for k, channel in enumerate(extra_channels, start=1):
        if channel.shape != shape:
            raise ValueError(f"{staged.scan_id}: channel {k} has shape {channel.shape}, channel 0 {shape}")
    dtype = channel_dtype(image.dtype, *(c.dtype for c in extra_channels))
    if dtype != image.dtype:
        image = image.astype(dtype)
    extra_channels = [c if c.dtype == dtype else c.astype(dtype) for c in extra_channels]
    image_out = staged.create_image(shape, image.dtype)
    channel_outs = [staged.create_channel(shape, channel.dtype) for channel in extra_channels]
    mask_out = None if mask is None else staged.create_mask(mask.shape)
    stats = ScanStatistics()
    depth = image_out.slab_depth
    for z0 in range(0, image.shape[2], depth):
        block = image[:, :, z0 : z0 + depth]
        image_out.write_slab(z0, block)
        for channel, out in zip(extra_channels, channel_outs, strict=True):
            out.write_slab(z0, channel[:, :, z0 : z0 + depth])
        stats.add_image(block)
        mask_block = None
        if mask is not None and mask_out is not None:
            mask_block = mask[:, :, z0 : z0 + depth]
            mask_out.write_slab(z0, mask_block)
            stats.add_class_counts(mask_block.sum(axis=(0, 1), dtype=np.int64))
        staged.slab_written(z0, block, mask_block)
    return stats


class DerivedArrays(ArrayStep):
    """``label_map`` and ``locations`` (store format 2, ``store/derived.py``), computed from
    the mask slabs as they are written. The label map is dropped at the first slab where two
    classes overlap; ``finish`` returns the attributes that say what was written."""

    name = "derived"

    def __init__(self, staged: StagedScan) -> None:
        super().__init__(staged)
        self.labels: ShardedArrayWriter | None = None
        self.sampler: LocationSampler | None = None
        self.overlap = False

    def on_slab(self, z0: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is None:
            return
        if self.sampler is None:  # the first slab: the mask's shape is known now
            assert self.staged.mask is not None, "mask slabs come from the staged mask writer"
            shape = self.staged.mask.shape
            volume = (int(shape[0]), int(shape[1]), int(shape[2]))
            self.sampler = LocationSampler(volume, int(mask.shape[3]), scan_seed(self.staged.scan_id))
            self.labels = ShardedArrayWriter(
                self.staged.work / LABEL_MAP, volume, np.dtype(np.uint8), self.staged.layout
            )
        labels = label_map_block(mask) if self.labels is not None else None
        if labels is None and self.labels is not None:  # classes overlap: mask only
            self.labels.close()
            shutil.rmtree(self.labels.path, ignore_errors=True)
            self.labels = None
            self.overlap = True
        if self.labels is not None and labels is not None:
            self.labels.write_slab(z0, labels)
        self.sampler.add(z0, mask, labels)

    def finish(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        import zarr  # the core dependency every reader has; a small single-chunk array

        if self.labels is not None:
            self.labels.close()
        rows, counts = self.sampler.result()
        array = zarr.create_array(
            store=str(self.staged.work / LOCATIONS),
            shape=rows.shape,
            chunks=(max(1, len(rows)), 3),
            dtype="int32",
            fill_value=0,
            dimension_names=["row", "yxz"],
            compressors=None,  # raw little-endian int32: HttpSource reads it from /zarr/ as is
        )
        if len(rows):
            array[:] = rows
        return {"label_map": self.labels is not None, "location_counts": counts}

    def close(self) -> None:
        if self.labels is not None:
            self.labels.close()


ARRAY_STEPS.append(DerivedArrays)

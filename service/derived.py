"""Arrays derived from a scan's mask while it is written: the label map and foreground locations.

Pure numpy, no I/O: ``service/store.py`` feeds slabs in and writes what comes out.

* ``label_map`` (H, W, D) uint8: 0 where no class is set, ``k + 1`` where class ``k`` is. It
  exists only when no voxel of the scan has two classes (and every value is 0 or 1), so it
  holds exactly what ``mask`` holds in a sixth of the bytes for six classes; readers merge
  ``CATEGORIES`` from it through a lookup table (``client/label_map.py``).
* ``locations`` (N, 3) int32 ``(y, x, z)``: per class, up to ``LOCATIONS_PER_CLASS`` of its
  voxels, rows sorted by class and then in ``numpy.nonzero`` order, with the per-class counts
  in the scan attribute ``location_counts``. Foreground sampling draws a row of the chosen
  class instead of reading a mask slice (nnU-Net's ``class_locations``).

The sample is a bottom-k sample under a hash of the voxel's position seeded from the scan id:
it is the same whatever the slab size, the worker or the order slabs arrive in, and memory
stays at about k rows a class however large the class is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

LOCATIONS_PER_CLASS = 10_000
MAX_LABEL_CLASSES = 254  # label k is stored as k + 1 in a uint8


def label_map_block(mask: np.ndarray) -> np.ndarray | None:
    """(H, W, d, C) mask block -> (H, W, d) uint8 label map, or None if a voxel has two classes
    (or a value other than 0 and 1), i.e. when a label map cannot hold the mask exactly."""
    classes = mask.shape[-1]
    if classes > MAX_LABEL_CLASSES:
        return None
    labels = np.zeros(mask.shape[:-1], np.uint8)
    total = np.zeros(mask.shape[:-1], np.uint8)
    for k in range(classes):
        channel = mask[..., k]
        np.add(total, channel, out=total, casting="unsafe")
        np.copyto(labels, np.uint8(k + 1), where=channel != 0)
    if classes and int(total.max(initial=0)) > 1:
        return None
    # a value of 2 in one channel alone gives total 2 (caught above); 256 would wrap to 0
    if classes and int(mask.max(initial=0)) > 1:
        return None
    return labels


def scan_seed(scan_id: str) -> int:
    """A 64-bit seed from the scan id: the same sample on every machine and every run."""
    return int.from_bytes(hashlib.blake2b(scan_id.encode(), digest_size=8).digest(), "little")


def position_keys(
    ys: np.ndarray, xs: np.ndarray, zs: np.ndarray, shape: Sequence[int], seed: int
) -> np.ndarray:
    """splitmix64 of each voxel's linear index plus the seed: pseudo-random, uint64."""
    _, width, depth = (int(n) for n in shape[:3])
    x = (ys.astype(np.uint64) * np.uint64(width) + xs.astype(np.uint64)) * np.uint64(depth)
    x = x + zs.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


class LocationSampler:
    """Per class, the ``limit`` voxels of smallest key seen so far, fed block by block."""

    def __init__(self, shape: Sequence[int], num_classes: int, seed: int, limit: int = LOCATIONS_PER_CLASS):
        self.shape = tuple(int(n) for n in shape[:3])
        self.limit = int(limit)
        self.seed = seed
        empty = (np.empty((0, 3), np.int32), np.empty(0, np.uint64))
        self._kept: list[tuple[np.ndarray, np.ndarray]] = [empty] * num_classes

    def add(self, z0: int, mask: np.ndarray, labels: np.ndarray | None = None) -> None:
        """A (H, W, d, C) mask block starting at slice ``z0``; its label map if there is one
        (then one ``nonzero`` pass finds every class's voxels)."""
        if labels is not None:
            ys, xs, zs = np.nonzero(labels)
            found = labels[ys, xs, zs]
            for k in range(len(self._kept)):
                pick = found == k + 1
                if pick.any():
                    self._merge(k, ys[pick], xs[pick], zs[pick] + z0)
            return
        for k in range(len(self._kept)):
            ys, xs, zs = np.nonzero(mask[..., k])
            if len(ys):
                self._merge(k, ys, xs, zs + z0)

    def _merge(self, k: int, ys: np.ndarray, xs: np.ndarray, zs: np.ndarray) -> None:
        keys = position_keys(ys, xs, zs, self.shape, self.seed)
        rows = np.stack([ys, xs, zs], axis=1).astype(np.int32)
        old_rows, old_keys = self._kept[k]
        rows, keys = np.concatenate([old_rows, rows]), np.concatenate([old_keys, keys])
        if len(keys) > self.limit:
            keep = np.argpartition(keys, self.limit - 1)[: self.limit]
            rows, keys = rows[keep], keys[keep]
        self._kept[k] = (rows, keys)

    def result(self) -> tuple[np.ndarray, list[int]]:
        """(N, 3) int32 rows sorted by class then (y, x, z), and the per-class counts."""
        out, counts = [], []
        for rows, _ in self._kept:
            order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
            out.append(rows[order])
            counts.append(len(rows))
        return (np.concatenate(out) if out else np.empty((0, 3), np.int32)).astype(np.int32), counts

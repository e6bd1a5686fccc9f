"""Arrays derived from a scan's mask while it is written: the label map and foreground locations.

Pure numpy, no I/O: ``store/writer.py`` feeds slabs in and writes what comes out.

* ``label_map`` (H, W, D) uint8: 0 where no class is set, ``k + 1`` where class ``k`` is. It
  exists only when no voxel of the scan has two classes (and every value is 0 or 1), so it
  holds exactly what ``mask`` holds in a sixth of the bytes for six classes; readers merge
  ``CATEGORIES`` from it through a lookup table (``store/label_map.py``).
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

from store.scratch import scratch

LOCATIONS_PER_CLASS = 10_000
MAX_LABEL_CLASSES = 254  # label k is stored as k + 1 in a uint8


def label_map_block(mask: np.ndarray) -> np.ndarray | None:
    """(H, W, d, C) mask block -> (H, W, d) uint8 label map, or None if a voxel has two classes
    (or a value other than 0 and 1), i.e. when a label map cannot hold the mask exactly.

    The result is a view in the block's own memory order: for the slice-major slabs the job
    streams ((d, H, W, C) in memory) it is an (H, W, d) view of a (d, H, W) array.
    """
    classes = mask.shape[-1]
    if classes > MAX_LABEL_CLASSES:
        return None
    if classes == 0 or mask.size == 0:
        return np.zeros(mask.shape[:-1], np.uint8)
    if mask.dtype == np.uint8 and classes <= _PACKED_CLASSES:
        for order in ((2, 0, 1), (0, 1, 2)):  # slice-major (the job's slabs), or plain C order
            voxels = mask.transpose(*order, 3)
            if voxels.flags.c_contiguous:
                labels = _packed_labels(voxels.reshape(-1), classes)
                if labels is None:
                    return None
                return labels.reshape(voxels.shape[:3]).transpose(np.argsort(order))
        voxels = np.ascontiguousarray(mask.transpose(2, 0, 1, 3))  # any other strides: one copy
        labels = _packed_labels(voxels.reshape(-1), classes)
        return None if labels is None else labels.reshape(voxels.shape[:3]).transpose(1, 2, 0)
    return _looped_labels(mask)


_PACKED_CLASSES = 8  # a voxel's classes fit in one uint64
_HIGH = np.uint64(56)  # byte 7 of a uint64, where the multiplications below leave their sums
_WORD = np.dtype("<u8")  # a voxel's class bytes, little endian whatever the machine
_BLOCK = 1 << 15  # voxels per multiply: a 256 KB product buffer stays in the L2 cache


def _packed_labels(flat: np.ndarray, classes: int) -> np.ndarray | None:
    """Label map of a contiguous uint8 run of voxels, each ``C <= 8`` class bytes.

    Each voxel's bytes are read as one little-endian uint64 ``v`` through an unaligned view of
    stride C (so the bytes after a voxel's C are the next voxel's): with the values 0 and 1,
    ``(v * M) >> 56`` with byte ``p`` of M equal to ``8 - p`` for ``p >= 8 - C`` and 0 below is
    ``sum_k (k + 1) * b_k`` (the next voxel's bytes meet zero bytes of M, and no partial sum
    reaches 256, so nothing carries into byte 7): ``k + 1`` for a voxel of class k alone. A
    voxel with two classes gives a nonzero label too, so the mask has no overlap exactly when
    it has as many nonzero bytes as the label map has nonzero voxels. One multiply, one shift
    and two counts per voxel instead of a loop over strided class channels (about 5x faster).
    """
    if int(flat.max()) > 1:  # not binary: a label map would not hold it
        return None
    n = flat.size // classes
    multiplier = np.uint64(sum((8 - p) << (8 * p) for p in range(8 - classes, 8)))
    labels = np.empty(n, np.uint8)
    # voxels whose 8-byte read stays inside the array: the rest (at most 7) via a padded copy
    inside = max(0, (flat.size - 8) // classes + 1)
    words = np.ndarray((inside,), _WORD, buffer=flat, strides=(classes,))
    product = scratch("derived-product", (_BLOCK,), np.uint64)  # in cache, never fresh pages
    for start in range(0, inside, _BLOCK):
        stop = min(start + _BLOCK, inside)
        np.multiply(words[start:stop], multiplier, out=product[: stop - start])
        np.right_shift(product[: stop - start], _HIGH, out=labels[start:stop], casting="unsafe")
    if inside < n:
        tail = np.zeros((n - inside, 8), np.uint8)
        tail[:, :classes] = flat[inside * classes :].reshape(-1, classes)
        words = tail.view(_WORD)[:, 0]
        np.right_shift(words * multiplier, _HIGH, out=labels[inside:], casting="unsafe")
    if np.count_nonzero(flat) != np.count_nonzero(labels):
        return None  # some voxel has two classes
    return labels


def _looped_labels(mask: np.ndarray) -> np.ndarray | None:
    """The general path (more than 8 classes, other dtypes): one pass per class channel."""
    classes = mask.shape[-1]
    labels = np.zeros(mask.shape[:-1], np.uint8)
    total = np.zeros(mask.shape[:-1], np.uint8)
    for k in range(classes):
        channel = mask[..., k]
        np.add(total, channel, out=total, casting="unsafe")
        np.copyto(labels, np.uint8(k + 1), where=channel != 0)
    if int(total.max(initial=0)) > 1:
        return None
    # a value of 2 in one channel alone gives total 2 (caught above); 256 would wrap to 0
    if int(mask.max(initial=0)) > 1:
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
    return _splitmix(x + zs.astype(np.uint64), seed)


def _splitmix(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of ``x + seed`` (uint64, modulo 2**64), in place where it can."""
    x = x + np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


_ALL = np.uint64(2**64 - 1)  # the threshold of a class that has fewer than k rows: take all


class LocationSampler:
    """Per class, the ``limit`` voxels of smallest key seen so far, fed block by block.

    Once a class holds ``limit`` rows, only voxels whose key is below its largest kept key
    can enter: the rest are dropped before any row is built, so after the first slabs almost
    every voxel costs one key and one comparison. Keys are distinct (splitmix64 is a
    bijection of distinct linear indices), so the bottom-k set, and the result, do not depend
    on the order voxels arrive in.
    """

    def __init__(self, shape: Sequence[int], num_classes: int, seed: int, limit: int = LOCATIONS_PER_CLASS):
        self.shape = tuple(int(n) for n in shape[:3])
        self.limit = int(limit)
        self.seed = seed
        empty = (np.empty((0, 3), np.int32), np.empty(0, np.uint64))
        self._kept: list[tuple[np.ndarray, np.ndarray]] = [empty] * num_classes
        # per class the largest key that can still enter; index 0 is the background label
        self._below = np.full(num_classes + 1, _ALL, np.uint64)

    def add(self, z0: int, mask: np.ndarray, labels: np.ndarray | None = None) -> None:
        """A (H, W, d, C) mask block starting at slice ``z0``; its label map if there is one
        (then one ``nonzero`` pass finds every class's voxels)."""
        if labels is not None:
            self._add_labels(z0, labels)
            return
        for k in range(len(self._kept)):
            ys, xs, zs = np.nonzero(mask[..., k])
            if len(ys):
                keys = position_keys(ys, xs, zs + z0, self.shape, self.seed)
                self._merge(k, ys, xs, zs + z0, keys)

    def _add_labels(self, z0: int, labels: np.ndarray) -> None:
        # the job's label slabs are (H, W, d) views of slice-major memory: nonzero over that
        # memory in its own order, then positions from the flat index
        slices = labels.transpose(2, 0, 1)
        flat = np.ascontiguousarray(slices).reshape(-1)
        # numpy finds the nonzero entries of a bool array about 8x faster than of a uint8 one
        found = np.flatnonzero(np.not_equal(flat, 0, out=scratch("derived-found", flat.shape, np.bool_)))
        if not len(found):
            return
        height, width, depth = self.shape
        z, yx = np.divmod(found, height * width)
        keys = _splitmix((yx * depth + z + z0).astype(np.uint64), self.seed)
        classes = flat[found]
        entering = keys <= self._below[classes]
        if not entering.all():
            yx, z, keys, classes = yx[entering], z[entering], keys[entering], classes[entering]
        for label in np.unique(classes):
            pick = classes == label
            ys, xs = np.divmod(yx[pick], width)
            self._merge(int(label) - 1, ys, xs, z[pick] + z0, keys[pick])

    def _merge(self, k: int, ys: np.ndarray, xs: np.ndarray, zs: np.ndarray, keys: np.ndarray) -> None:
        entering = keys <= self._below[k + 1]
        if not entering.all():
            ys, xs, zs, keys = ys[entering], xs[entering], zs[entering], keys[entering]
        if not len(keys):
            return
        rows = np.stack([ys, xs, zs], axis=1).astype(np.int32)
        old_rows, old_keys = self._kept[k]
        rows, keys = np.concatenate([old_rows, rows]), np.concatenate([old_keys, keys])
        if len(keys) > self.limit:
            keep = np.argpartition(keys, self.limit - 1)[: self.limit]
            rows, keys = rows[keep], keys[keep]
        self._kept[k] = (rows, keys)
        if len(keys) >= self.limit:
            self._below[k + 1] = keys.max()

    def result(self) -> tuple[np.ndarray, list[int]]:
        """(N, 3) int32 rows sorted by class then (y, x, z), and the per-class counts."""
        out, counts = [], []
        for rows, _ in self._kept:
            order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
            out.append(rows[order])
            counts.append(len(rows))
        return (np.concatenate(out) if out else np.empty((0, 3), np.int32)).astype(np.int32), counts

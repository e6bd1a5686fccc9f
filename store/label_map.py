"""Reading the derived arrays of store format 2: ``label_map`` and ``locations``.

A scan whose classes never overlap has ``label_map`` (H, W, D) uint8 beside ``mask`` (scan
attribute ``"label_map": true``): 0 = no class, ``k + 1`` = class ``k``. Any mask request
(raw classes, ``CATEGORIES`` merged, with or without background) is then one table lookup per
voxel: ``table[label]`` where row ``k + 1`` holds what class ``k`` contributes to each output
channel. That decodes one byte a voxel instead of one a class and replaces the per-group sums
of ``merge_mask``; the result is identical because a voxel has at most one class.

``locations`` (N, 3) int32 holds per class a sample of its voxels (class-sorted; counts in the
attribute ``location_counts``), see ``store/derived.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.categories import Categories, all_categories

LABEL_MAP = "label_map"
LOCATIONS = "locations"


def has_label_map(attrs: dict[str, Any]) -> bool:
    return bool(attrs.get("label_map"))


def location_counts(attrs: dict[str, Any]) -> list[int] | None:
    counts = attrs.get("location_counts")
    return None if counts is None else [int(n) for n in counts]


def category_table(categories: Categories | None, background: bool, num_classes: int) -> np.ndarray:
    """(C + 1, channels) uint8: the output channels of a voxel whose label is the row index.

    A group's channel is 1 for each of its classes (the sum ``merge_mask`` takes, with at most
    one class set); background is 1 only for label 0 or a class no category selects.
    """
    if categories is None:
        categories = all_categories(num_classes)
    table = np.zeros((num_classes + 1, len(categories)), np.uint8)
    for channel, group in enumerate(categories):
        for k in group:
            table[k + 1, channel] += 1  # a class listed twice in a group counts twice, as a sum
    if background:
        table = np.concatenate([(table.sum(axis=1) == 0).astype(np.uint8)[:, None], table], axis=1)
    return table


def apply_table(labels: np.ndarray, table: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``table[labels]``: (..., channels) in the table's dtype, C-contiguous, into ``out`` if given.

    ``np.take`` of one table row per voxel runs a generic copy loop per voxel (about 1 ms a
    384x384 slice at 5 channels). Taking rows for groups of ``g`` voxels at once (a table of
    every combination of ``g`` labels, ``rows ** g`` rows of ``g * channels`` values, small
    enough to stay in cache) divides the loop count by ``g``: about 2x faster, exact by
    construction. uint8 labels with a small enough table go two at a time through a pair table
    instead (``_pair_table``), which needs no index arithmetic. The loaders write float32 y
    (and class-index y) straight from a label map this way (no uint8 merged copy in between);
    the server and the HTTP client merge uint8 masks with it.
    """
    rows, channels = table.shape
    if out is None:
        out = np.empty((*labels.shape, channels), table.dtype)
    elif out.shape != (*labels.shape, channels) or out.dtype != table.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {table.dtype} of shape {(*labels.shape, channels)}")
    flat = np.ascontiguousarray(labels).reshape(-1)
    if flat.size == 0 or channels == 0:
        return out
    top = int(flat.max())
    if top >= rows:  # the gathers clip indices; a plain table[labels] would have raised
        raise ValueError(f"label map holds label {top}, but the table has rows for labels 0-{rows - 1}")
    dest = out.reshape(-1, channels)
    pairs = _pair_table_fits(flat.dtype, rows, channels, table.dtype)
    group = 2 if pairs else _group_size(rows)
    body = flat.size - flat.size % group
    if pairs and body:  # two uint8 labels read as one uint16 are the pair table's row: no index arithmetic
        paired = _pair_table(table.tobytes(), table.dtype.str, rows, channels)
        np.take(paired, flat[:body].view("<u2"), axis=0, mode="clip",
                out=dest[:body].reshape(-1, 2 * channels))  # fmt: skip
    elif group > 1 and body:
        combined = _group_table(table.tobytes(), table.dtype.str, rows, channels, group)
        np.take(combined, _group_index(flat[:body], rows, group), axis=0, mode="clip",
                out=dest[:body].reshape(-1, group * channels))  # fmt: skip
    else:
        body = 0
    if body < flat.size:  # mode="clip" writes straight into out (no bounds-check buffer)
        np.take(table, flat[body:], axis=0, mode="clip", out=dest[body:])
    return out


PAIR_TABLE_MAX_BYTES = 4 << 20  # a table of rows * 256 pairs; the rows of labels present stay in cache


def _pair_table_fits(labels: np.dtype, rows: int, channels: int, dtype: np.dtype) -> bool:
    return (
        labels == np.uint8
        and rows <= 256
        and rows * 256 * 2 * channels * dtype.itemsize <= PAIR_TABLE_MAX_BYTES
    )


@functools.lru_cache(maxsize=64)
def _pair_table(table_bytes: bytes, dtype: str, rows: int, channels: int) -> np.ndarray:
    """(rows * 256, 2 * channels), read-only: row ``a + 256 * b`` holds the channels of label
    ``a`` then label ``b``, the two bytes ``[a, b]`` read as one little-endian uint16. Labels
    are below ``rows`` (``apply_table`` checks the largest first), so no index reaches
    ``rows * 256``; rows whose ``a`` is past the table are zero and never taken. About 2.5x
    faster than the group table: the labels are the index, no arithmetic per voxel."""
    table = np.zeros((256, channels), np.dtype(dtype))
    table[:rows] = np.frombuffer(table_bytes, np.dtype(dtype)).reshape(rows, channels)
    index = np.arange(rows * 256)
    pairs = np.ascontiguousarray(np.concatenate([table[index & 255], table[index >> 8]], axis=1))
    pairs.setflags(write=False)  # cached and shared between threads
    return pairs


GROUP_TABLE_MAX = 4096  # rows of a group table: 4 voxels at up to 7 labels (6 classes), 3 at 16
GROUP_MAX = 4


def _group_size(rows: int) -> int:
    """Voxels per gathered row: the most (up to 4) whose label combinations fit the table bound."""
    group = 1
    while group < GROUP_MAX and rows ** (group + 1) <= GROUP_TABLE_MAX:
        group += 1
    return group


@functools.lru_cache(maxsize=64)
def _group_table(table_bytes: bytes, dtype: str, rows: int, channels: int, group: int) -> np.ndarray:
    """(rows ** group, group * channels): row ``sum(l_i * rows ** (group - 1 - i))`` holds the
    channels of labels ``l_0 .. l_{group-1}`` side by side. Cached: a loader applies the same
    few tables again and again."""
    table = np.frombuffer(table_bytes, np.dtype(dtype)).reshape(rows, channels)
    combos = np.indices((rows,) * group).reshape(group, -1).T  # first label most significant
    return np.ascontiguousarray(table[combos].reshape(len(combos), group * channels))


def _group_index(flat: np.ndarray, rows: int, group: int) -> np.ndarray:
    """The group table row of each ``group`` consecutive labels (uint16: at most 4096 rows)."""
    voxels = flat.reshape(-1, group)
    index = np.multiply(voxels[:, 0], rows, dtype=np.uint16)
    for k in range(1, group):
        if k > 1:
            np.multiply(index, rows, out=index)
        np.add(index, voxels[:, k], out=index)
    return index


@dataclass(frozen=True)
class LabelRegion:
    """A mask region still as its label map and the table that merges it (``apply_table``)."""

    labels: np.ndarray
    table: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the merged mask it stands for."""
        return int(self.labels.size) * int(self.table.shape[1])


Decoded = np.ndarray | LabelRegion


def merged(region: Decoded) -> np.ndarray:
    """The merged mask of a region (an array is returned as it is).

    A slab of several slices (H, W, D) is merged slice-major and returned as an (H, W, D, C)
    view of that memory: each slice is then contiguous, and a loader cutting slices from a
    block (loaders/blocks.py) copies them ~10x faster than from C order, where a slice's
    C-byte records lie C * D bytes apart.
    """
    if not isinstance(region, LabelRegion):
        return region
    labels = region.labels
    if labels.ndim == 3 and labels.shape[2] > 1:
        slices = apply_table(np.ascontiguousarray(np.moveaxis(labels, 2, 0)), region.table)
        return np.moveaxis(slices, 0, 2)
    return apply_table(labels, region.table)


def class_rows(locations: np.ndarray, counts: Sequence[int], k: int) -> np.ndarray:
    """The (n, 3) rows of class ``k`` in a class-sorted locations array."""
    start = int(sum(counts[:k]))
    return locations[start : start + int(counts[k])]

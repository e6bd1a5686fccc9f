"""y as class indices (``cfg.Y_FORMAT = "class_index"``): one uint8 label per voxel.

The index of a voxel is its channel in the one-hot y *with* a background channel first:
0 for background (no selected category), ``c + 1`` for category ``c``. With
``INCLUDE_BACKGROUND`` that is exactly the channel of y; without it, y is
``one_hot(index, C + 1)[..., 1:]``. A voxel in two selected categories has no single index,
so overlapping categories are refused in one line.
"""

from __future__ import annotations

import functools

import numpy as np


def _overlap_message(first: int, second: int, what: str) -> str:
    return (
        f"Y_FORMAT='class_index' needs CATEGORIES that do not overlap: {what} belongs to "
        f"categories {first} and {second} (CATEGORIES[{first}], CATEGORIES[{second}]) at "
        "once, so it has no single index; use Y_FORMAT='one_hot'"
    )


def refuse_overlap(categories: tuple[tuple[int, ...], ...], scan_id: str) -> None:
    """Refuse, when a loader is built, categories that share a class (regions): its voxels
    would have no single index."""
    owner: dict[int, int] = {}
    for number, group in enumerate(categories):
        for k in group:
            if k in owner:
                raise ValueError(_overlap_message(owner[k], number, f"class {k} of scan {scan_id!r}"))
            owner[k] = number


def _indices(hits: np.ndarray, background: bool) -> np.ndarray:
    """(..., C) booleans -> (...) uint8 indices; every position at most one hit (a store's
    per-voxel channels may overlap even where categories do not)."""
    count = hits.sum(axis=-1)
    if (count > 1).any():
        first = np.unravel_index(int(np.argmax(count > 1)), count.shape)
        both = [int(c) for c in np.flatnonzero(hits[first])]
        raise ValueError(_overlap_message(both[0], both[1], "a voxel"))
    offset = 0 if background else 1
    return np.where(count > 0, hits.argmax(axis=-1) + offset, 0).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _index_table(table_bytes: bytes, dtype: str, rows: int, channels: int, background: bool) -> np.ndarray:
    table = np.frombuffer(table_bytes, dtype=dtype).reshape(rows, channels)
    return _indices(table != 0, background)


def index_table(table: np.ndarray, background: bool) -> np.ndarray:
    """Label -> class index, for a label map's table of label -> y channels (``LabelRegion``)."""
    table = np.ascontiguousarray(table)
    return _index_table(table.tobytes(), table.dtype.str, table.shape[0], table.shape[1], background)


def class_indices(y: np.ndarray, background: bool) -> np.ndarray:
    """(..., C) one-hot y -> (...) uint8 class indices (stores without a label map)."""
    return _indices(np.asarray(y) != 0, background)

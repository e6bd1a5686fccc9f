"""Reading the derived arrays of store format 2: ``label_map`` and ``locations``.

A scan whose classes never overlap has ``label_map`` (H, W, D) uint8 beside ``mask`` (scan
attribute ``"label_map": true``): 0 = no class, ``k + 1`` = class ``k``. Any mask request
(raw classes, ``CATEGORIES`` merged, with or without background) is then one table lookup per
voxel: ``table[label]`` where row ``k + 1`` holds what class ``k`` contributes to each output
channel. That decodes one byte a voxel instead of one a class and replaces the per-group sums
of ``merge_mask``; the result is identical because a voxel has at most one class.

``locations`` (N, 3) int32 holds per class a sample of its voxels (class-sorted; counts in the
attribute ``location_counts``), see ``service/derived.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from client.categories import Categories, all_categories

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


def apply_table(labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(..., channels) uint8 from a label map: one gather of whole table rows (measured: about
    as fast as ``merge_mask`` over the decoded mask, and the mask need not be decoded)."""
    return np.take(table, labels, axis=0)


def class_rows(locations: np.ndarray, counts: Sequence[int], k: int) -> np.ndarray:
    """The (n, 3) rows of class ``k`` in a class-sorted locations array."""
    start = int(sum(counts[:k]))
    return locations[start : start + int(counts[k])]

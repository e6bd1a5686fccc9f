"""A scan's statistics, taken while its arrays are written: intensity (min, max, mean, std
over finite voxels) and voxels per class, per slice and in total (``class_voxels``, which the
foreground samplers and ``has_class`` filters use). Streaming: a slab at a time, no float64
copy of the volume."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
        self.non_finite = 0  # NaN and +-Inf voxels: left out of every statistic
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
        low, high = float(block.min()), float(block.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            # NaN propagates into min and max, and an Inf is one of them: only blocks holding
            # a non-finite voxel pay for this copy of their finite values
            block = block[np.isfinite(block)]
            self.non_finite += k - int(block.size)
            k = int(block.size)
            if k == 0:
                return
            low, high = float(block.min()), float(block.max())
        self.low = min(self.low, low)
        self.high = max(self.high, high)
        # finite float64 values beyond about 1e154 overflow the sum of squares (and beyond 1e308
        # the sum): the mean or std is then not finite, and is recorded as unknown (to_attrs)
        with np.errstate(over="ignore", invalid="ignore"):
            block_mean = float(block.sum(dtype=np.float64)) / k
            if self._scratch.size < k:
                self._scratch = np.empty(k, np.float64)
            deviation = self._scratch[:k].reshape(block.shape)
            np.subtract(block, block_mean, out=deviation, dtype=np.float64)
            np.multiply(deviation, deviation, out=deviation)
            block_m2 = float(deviation.sum())
        total = self.count + k
        delta = block_mean - self.mean  # Python floats: an overflow is inf, never an error
        self.mean += delta * k / total
        self.m2 += block_m2 + delta * delta * self.count * k / total
        self.count = total

    def add_class_counts(self, counts: np.ndarray) -> None:
        """Voxels per class of consecutive slices: (C,) for one slice or (dz, C)."""
        rows = np.asarray(counts, dtype=np.int64).reshape(-1, np.shape(counts)[-1])
        self.per_slice.extend(rows.tolist())

    def to_attrs(self) -> dict[str, Any]:
        totals = [sum(column) for column in zip(*self.per_slice, strict=True)]
        intensity: dict[str, float | None] = {"min": None, "max": None, "mean": None, "std": None}
        if self.count:  # over finite voxels; all null when there are none
            std = math.sqrt(self.m2 / self.count) if math.isfinite(self.m2) else math.inf
            # a mean or std that overflowed float64 (voxels near 1e154 and beyond) is unknown:
            # null, as JSON has no infinity
            intensity = {
                "min": self.low,
                "max": self.high,
                "mean": self.mean if math.isfinite(self.mean) else None,
                "std": std if math.isfinite(std) else None,
            }
        return {
            "intensity": intensity,
            "non_finite_voxels": self.non_finite,
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

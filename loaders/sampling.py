"""Samplers: where patches go. Pure of I/O except through the ``locate`` callback.

``grid_windows`` tiles a volume (inference, PatchDataLoader). ``ForegroundSampler`` draws
training patches: a share ``ratio`` of them centred on a voxel of a foreground class (class
chosen uniformly among those present, slice weighted by the store's per-slice class voxel
counts, voxel uniformly within that slice), the rest uniformly anywhere, as nnU-Net's
oversample_foreground_percent and MONAI's RandCropByPosNegLabel. Every draw comes from
``numpy.random.default_rng((seed, epoch, sample))``, so results do not depend on thread timing.

A scan written with ``locations`` (store format 2: per class a sample of its voxels, written by
the job) is drawn from without reading any mask: the class as above, then a uniform row of
that class's locations, which is a uniform voxel of the class as the slice-then-voxel draw is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from loaders.geometry import PatchGrid, Window
from store.lru import BoundedLRU

# Foreground voxel locations kept per loader: a 384x384 slice with 5% of one class is ~30 KiB.
LOCATION_CACHE_BYTES = 64 * 2**20

Locations = tuple[np.ndarray, np.ndarray]
# a scan's class-sorted (N, 3) int32 (y, x, z) foreground locations and the per-class counts
ClassLocations = tuple[np.ndarray, list[int]]


def _locations_nbytes(value: Locations) -> int:
    return value[0].nbytes + value[1].nbytes


class LocationCache(BoundedLRU[Locations]):
    """A thread-safe LRU of ``(ys, xs)`` arrays, capped in bytes (read-ahead threads share it)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes=int(max_bytes), sizeof=_locations_nbytes)


def grid_windows(
    shape: Sequence[int], patch: Sequence[int], stride: Sequence[int] | None, pad: Sequence[int] | None
) -> list[Window]:
    return list(PatchGrid.build(shape, patch, stride, pad).windows())


def start_range(size: int, patch: int, pad: int) -> tuple[int, int]:
    """Smallest and largest patch start on an axis (padded extent, as ``axis_starts``)."""
    lo = -pad
    hi = max(size + pad, lo + patch)
    return lo, hi - patch


@dataclass(frozen=True)
class Sample:
    """A training patch to draw: which scan, whether centred on foreground, and its number."""

    scan: int
    foreground: bool
    number: int


@dataclass(frozen=True)
class ForegroundSampler:
    patch: tuple[int, int, int]
    pad: tuple[int, int, int]
    ratio: float
    seed: int

    def plan(self, num_scans: int, per_scan: int, epoch: int) -> list[Sample]:
        """An epoch's samples: every scan ``per_scan`` times; ``round(n * ratio)`` foreground."""
        n = num_scans * per_scan
        rng = np.random.default_rng((self.seed, epoch))
        foreground = np.zeros(n, dtype=bool)
        foreground[: round(n * self.ratio)] = True
        rng.shuffle(foreground)
        order = rng.permutation(n)
        return [Sample(int(i) % num_scans, bool(foreground[k]), k) for k, i in enumerate(order)]

    def rng(self, epoch: int, sample: Sample) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, sample.number))

    def pick_slice(
        self, rng: np.random.Generator, per_slice: Sequence[Sequence[int]], classes: Sequence[int]
    ) -> tuple[int, int] | None:
        """(class, z) for a foreground sample, or None when no class has voxels."""
        counts = np.asarray(per_slice, dtype=np.float64).reshape(len(per_slice), -1)
        present = [k for k in classes if k < counts.shape[1] and counts[:, k].sum() > 0]
        if not present:
            return None
        k = present[int(rng.integers(len(present)))]
        z = int(rng.choice(counts.shape[0], p=counts[:, k] / counts[:, k].sum()))
        return k, z

    def pick_location(
        self, rng: np.random.Generator, known: ClassLocations, classes: Sequence[int]
    ) -> tuple[int, int, int] | None:
        """(y, x, z) of a foreground sample from stored locations, or None when no class has any."""
        rows, counts = known
        present = [k for k in classes if k < len(counts) and counts[k] > 0]
        if not present:
            return None
        k = present[int(rng.integers(len(present)))]
        row = int(sum(counts[:k])) + int(rng.integers(counts[k]))
        return int(rows[row, 0]), int(rows[row, 1]), int(rows[row, 2])

    def window_around(self, center: Sequence[int], shape: Sequence[int]) -> Window:
        out = []
        for c, size, p, pad in zip(center, shape, self.patch, self.pad, strict=True):
            lo, hi = start_range(int(size), p, pad)
            start = min(max(int(c) - p // 2, lo), hi)
            out.append((start, start + p))
        return tuple(out)

    def random_window(self, rng: np.random.Generator, shape: Sequence[int]) -> Window:
        out = []
        for size, p, pad in zip(shape, self.patch, self.pad, strict=True):
            lo, hi = start_range(int(size), p, pad)
            start = int(rng.integers(lo, hi + 1))
            out.append((start, start + p))
        return tuple(out)

    def draw(
        self,
        samples: Sequence[Sample],
        epoch: int,
        shapes: Sequence[Sequence[int]],
        per_slice: Callable[[int], Sequence[Sequence[int]]],
        classes: Callable[[int], Sequence[int]],
        locate: Callable[[list[tuple[int, int, int]]], list[tuple[np.ndarray, np.ndarray]]],
        class_locations: Callable[[int], ClassLocations | None] | None = None,
    ) -> list[Window]:
        """Windows for ``samples``; foreground ones locate their chosen slices in one call.

        ``locate([(scan, class, z), ...])`` returns, per slice, the ``(ys, xs)`` of its voxels of
        that class in ``numpy.nonzero`` order (so a cache of them changes no draw).
        ``class_locations(scan)``, where it returns a scan's stored locations, replaces both.
        """
        rngs = [self.rng(epoch, s) for s in samples]
        stored = [
            class_locations(s.scan) if s.foreground and class_locations is not None else None for s in samples
        ]
        picks: list[tuple[int, int] | None] = [
            self.pick_slice(rng, per_slice(s.scan), classes(s.scan))
            if s.foreground and known is None
            else None
            for s, rng, known in zip(samples, rngs, stored, strict=True)
        ]
        wanted = [(s.scan, *p) for s, p in zip(samples, picks, strict=True) if p is not None]
        located = iter(locate(wanted)) if wanted else iter(())
        windows = []
        for s, rng, pick, known in zip(samples, rngs, picks, stored, strict=True):
            shape = shapes[s.scan]
            if known is not None:
                center = self.pick_location(rng, known, classes(s.scan))
                windows.append(
                    self.random_window(rng, shape) if center is None else self.window_around(center, shape)
                )
                continue
            if pick is None:
                windows.append(self.random_window(rng, shape))
                continue
            ys, xs = next(located)
            if len(ys) == 0:  # counts and mask disagree: fall back to a uniform draw
                windows.append(self.random_window(rng, shape))
                continue
            i = int(rng.integers(len(ys)))
            windows.append(self.window_around((int(ys[i]), int(xs[i]), pick[1]), shape))
        return windows

"""Stitching: put window predictions back into one scan-sized float32 output.

Two cases, chosen per scan by :func:`windows_disjoint`:

* **Disjoint windows** (2D/2.5D slices, a patch grid whose stride is the patch and which no
  snapped tail overlaps): every voxel gets exactly one prediction, so it is copied into place.
  No weights, no division, no second buffer: the output is the only scan-sized allocation.
* **Overlapping windows**: a per-voxel *running weighted mean* in float32,
  ``mean += (p - mean) * w / W`` with ``W`` the weight seen so far. It equals
  ``sum(w_i p_i) / sum(w_i)`` up to float32 rounding, needs no final normalisation pass, and is
  exact where every window predicts the same value (a pointwise model): the first window sets
  ``mean = p * (w / w) = p`` exactly, and later ones add ``(p - p) * ... = 0``. Memory is the
  output plus one (H, W, D) float32 weight volume; per-window temporaries live in two scratch
  buffers reused for every window.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from loaders.geometry import Window, clip_window

__all__ = ["Aggregator", "Window", "windows_disjoint"]  # Window: where custom loaders found it


def windows_disjoint(windows: Iterable[Window], shape: Sequence[int]) -> bool:
    """True if no voxel of ``shape`` lies in two of ``windows`` (parts outside are ignored).

    A cheap sufficient test, no voxel loop: the clipped windows are distinct and, on every
    axis, their distinct intervals do not overlap. Two distinct windows then differ on some
    axis, where their intervals are disjoint, so the windows are. Grids and slice stacks
    pass it exactly; any other layout returns False, which is always safe (blending is
    correct for disjoint windows too, only slower).
    """
    seen: set[Window] = set()
    per_axis: list[set[tuple[int, int]]] = [set() for _ in shape]
    for window in windows:
        clipped = tuple((max(a, 0), min(b, int(n))) for (a, b), n in zip(window, shape, strict=True))
        if any(b <= a for a, b in clipped):
            continue  # entirely outside the volume: contributes nothing
        if clipped in seen:
            return False
        seen.add(clipped)
        for axis, interval in enumerate(clipped):
            per_axis[axis].add(interval)
    for intervals in per_axis:
        ordered = sorted(intervals)
        if any(prev[1] > nxt[0] for prev, nxt in itertools.pairwise(ordered)):
            return False
    return True


def _zeroed(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 zero volume whose pages are all mapped now, in one sequential pass.

    ``np.zeros`` maps pages lazily; the first writes of window after window then fault them
    in scattered order, which cost 5-10x more (0.5-0.8 s for a 450 MiB output, measured) than
    touching one value per 4 KiB page in order here (0.05-0.09 s; the kernel zeroes the pages).
    """
    out = np.zeros(shape, dtype=np.float32)
    out.reshape(-1)[:: 4096 // out.itemsize] = 0
    return out


class Aggregator:
    """Weighted average of window predictions over a (H, W, D) volume with C channels.

    ``disjoint=True`` promises that no two added windows overlap (see
    :func:`windows_disjoint`): predictions are then copied into place. Voxels no window
    covers, and voxels whose every weight is 0, are 0 in the result.
    """

    def __init__(self, shape: Sequence[int], channels: int, *, disjoint: bool = False) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.channels = int(channels)
        self.disjoint = bool(disjoint)
        self._mean = _zeroed((*self.shape, self.channels))
        self._weight = None if self.disjoint else _zeroed(self.shape)
        # disjoint mode, for covered(): each placed region and its voxels of weight 0 (if any)
        self._placed: list[tuple[tuple[slice, ...], np.ndarray | None]] = []
        self._scratch = np.empty(0, dtype=np.float32)  # one window's prediction, reused
        self._ratio = np.empty(0, dtype=np.float32)  # one window's w / W, reused
        # weights converted to float32 once per distinct array (a loader returns the same one)
        self._weights_source: np.ndarray | None = None
        self._weights32 = np.empty(0, dtype=np.float32)
        self._weights_positive = True

    def add(self, window: Window, prediction: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add a window's prediction (window shape + C); the part outside the volume is dropped."""
        expected = tuple(b - a for a, b in window)
        if prediction.shape != (*expected, self.channels):
            raise ValueError(
                f"prediction of shape {prediction.shape} for window {expected} with {self.channels} channels"
            )
        vol, local = clip_window(window, self.shape)
        if any(s.stop <= s.start for s in vol):
            return
        pred = prediction[local]
        w = None if weights is None else self._float32_weights(weights, expected)[local]
        if self._weight is None:
            self._place(vol, pred, w)
        else:
            self._blend(vol, pred, w, self._weight)

    def _float32_weights(self, weights: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
        if weights is not self._weights_source:
            if weights.shape != expected:
                raise ValueError(f"blend weights of shape {weights.shape} for window {expected}")
            self._weights32 = np.ascontiguousarray(weights, dtype=np.float32)
            self._weights_positive = bool((self._weights32 > 0).all())
            self._weights_source = weights
        return self._weights32

    def _place(self, vol: tuple[slice, ...], pred: np.ndarray, w: np.ndarray | None) -> None:
        target = self._mean[vol]
        np.copyto(target, pred, casting="unsafe")
        left_out = None if w is None or self._weights_positive else w <= 0
        if left_out is not None:
            target[left_out] = 0  # a voxel of weight 0 is not covered, as in the blended case
        self._placed.append((vol, left_out))

    def _buffers(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        voxels = int(np.prod(shape))
        if self._ratio.size < voxels:
            self._ratio = np.empty(voxels, dtype=np.float32)
            self._scratch = np.empty(voxels * self.channels, dtype=np.float32)
        diff = self._scratch[: voxels * self.channels].reshape(*shape, self.channels)
        return diff, self._ratio[:voxels].reshape(shape)

    def _blend(
        self, vol: tuple[slice, ...], pred: np.ndarray, w: np.ndarray | None, weight: np.ndarray
    ) -> None:
        mean, total = self._mean[vol], weight[vol]
        diff, ratio = self._buffers(total.shape)
        if w is None:
            np.add(total, np.float32(1), out=total)
            np.divide(np.float32(1), total, out=ratio)
        else:
            np.add(total, w, out=total)
            if self._weights_positive:
                np.divide(w, total, out=ratio)
            else:  # 0/0 where nothing has weight yet: such voxels stay 0
                ratio.fill(0)
                np.divide(w, total, out=ratio, where=total != 0)
        if pred.dtype == np.float32:
            np.subtract(pred, mean, out=diff)
        else:  # to float32 first, so that a float64 model output rounds once, as a copy would
            np.copyto(diff, pred, casting="unsafe")
            np.subtract(diff, mean, out=diff)
        np.multiply(diff, ratio[..., None], out=diff)
        np.add(mean, diff, out=mean)

    def covered(self) -> np.ndarray:
        if self._weight is not None:
            return self._weight > 0
        mask = np.zeros(self.shape, dtype=bool)
        for vol, left_out in self._placed:
            mask[vol] = True if left_out is None else ~left_out
        return mask

    def result(self, dtype: type = np.float32) -> np.ndarray:
        """The blended prediction (the aggregator's own buffer for float32: add nothing after)."""
        return self._mean if np.dtype(dtype) == np.float32 else self._mean.astype(dtype)

"""Stitching: accumulate weighted predictions of windows into one scan-sized output.

Accumulators are float64: a voxel covered by several windows of a pointwise model gets
``sum(w_i * p) / sum(w_i)``, whose float64 error is far below half a float32 ulp, so the
float32 result is exactly ``p``. Memory is one scan's output plus one weight volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from loaders.geometry import clip_window

Window = tuple[tuple[int, int], ...]


class Aggregator:
    """Weighted average of window predictions over a (H, W, D) volume with C channels."""

    def __init__(self, shape: Sequence[int], channels: int) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.channels = int(channels)
        self._sum = np.zeros((*self.shape, self.channels), dtype=np.float64)
        self._weight = np.zeros(self.shape, dtype=np.float64)

    def add(self, window: Window, prediction: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add a window's prediction (window shape + C); the part outside the volume is dropped."""
        expected = tuple(b - a for a, b in window)
        if prediction.shape != (*expected, self.channels):
            raise ValueError(
                f"prediction of shape {prediction.shape} for window {expected} with {self.channels} channels"
            )
        vol, local = clip_window(window, self.shape)
        pred = prediction[local]
        if weights is None:
            self._sum[vol] += pred
            self._weight[vol] += 1.0
        else:
            w = weights[local]
            self._sum[vol] += pred * w[..., None]
            self._weight[vol] += w

    def covered(self) -> np.ndarray:
        return self._weight > 0

    def result(self, dtype: type = np.float32) -> np.ndarray:
        """The blended prediction; voxels no window covered are 0."""
        weight = np.where(self._weight > 0, self._weight, 1.0)
        out: np.ndarray = (self._sum / weight[..., None]).astype(dtype)
        out[~self.covered()] = 0
        return out

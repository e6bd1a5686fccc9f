"""Rendering a slice as a PNG: pure functions of numpy arrays (the preview route and the demo).

A plane is the image at index k along one axis, keeping the other two axes in store order as
(rows, columns): ``axis="z"`` gives (y, x), ``axis="y"`` gives (x, z), ``axis="x"`` gives (y, z).
Intensities map linearly from the window [lo, hi] to 0..255 grey; each class is blended over
it in its own colour (``store.ome.CLASS_COLORS``, the viewers' colours too).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from store.errors import InvalidParameter
from store.ome import class_color

AXES = {"y": 0, "x": 1, "z": 2}
OVERLAYS = ("none", "mask", "prediction")
MAX_SCALE = 8
OVERLAY_ALPHA = 0.5
WINDOW_STDS = 3.0  # the default window: mean +- 3 std, within [min, max]


def plane_region(shape: Sequence[int], axis: str, index: int, param: str = "z") -> tuple[slice, slice, slice]:
    """The (y, x, z) region of one plane; ``param`` names the index in errors."""
    if axis not in AXES:
        raise InvalidParameter("axis", f"{axis!r} is not one of {', '.join(AXES)}")
    size = int(shape[AXES[axis]])
    if not 0 <= index < size:
        raise InvalidParameter(param, f"slice {index} is out of range 0..{size - 1} along axis {axis}")
    region = [slice(0, int(n)) for n in shape[:3]]
    region[AXES[axis]] = slice(index, index + 1)
    return (region[0], region[1], region[2])


def take_plane(volume: np.ndarray, axis: str) -> np.ndarray:
    """Drop the length-1 ``axis`` of a region read with :func:`plane_region`."""
    return np.take(volume, 0, axis=AXES[axis])


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``window=lo,hi`` (numbers, lo < hi), or None when not given."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InvalidParameter("window", f"{text!r} is not two numbers 'lo,hi'") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and math.isfinite(hi - lo)):
        # hi - lo past the largest float (-1e308,1e308) would scale every voxel to 0: black
        raise InvalidParameter("window", f"{text!r}: needs finite lo < hi, hi - lo finite too")
    return lo, hi


def default_window(intensity: Mapping[str, Any] | None, plane: np.ndarray) -> tuple[float, float]:
    """Mean +- 3 std of the scan's stored statistics, within its [min, max]; the plane's range
    when the scan has no statistics (or they are flat)."""
    if intensity:
        try:
            low, high = float(intensity["min"]), float(intensity["max"])
            mean, std = float(intensity["mean"]), float(intensity["std"])
            lo, hi = max(low, mean - WINDOW_STDS * std), min(high, mean + WINDOW_STDS * std)
            if lo < hi:
                return lo, hi
        except (KeyError, TypeError, ValueError):
            pass
    lo, hi = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 1.0)
    return (lo, hi) if lo < hi else (lo, lo + 1.0)


def grey(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(h, w) intensities -> (h, w) uint8, linear over the window, clipped."""
    lo, hi = window
    scaled = (plane.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def overlay(grey_plane: np.ndarray, classes: np.ndarray | None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(h, w) grey and optional (h, w, C) class masks -> (h, w, 3) RGB; class k in its colour
    (a voxel of several classes shows the last)."""
    rgb = np.repeat(grey_plane[..., None], 3, axis=-1).astype(np.float32)
    if classes is not None:
        for k in range(classes.shape[-1]):
            where = classes[..., k] != 0
            rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(class_color(k), np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def labels_to_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(h, w) label map (0 none, k+1 class k) -> (h, w, C) booleans."""
    return np.stack([labels == k + 1 for k in range(num_classes)], axis=-1)


def upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    if not 1 <= scale <= MAX_SCALE:
        raise InvalidParameter("scale", f"{scale} is not a whole number in 1..{MAX_SCALE}")
    return rgb if scale == 1 else np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def render_png(
    plane: np.ndarray,
    window: tuple[float, float],
    classes: np.ndarray | None = None,
    scale: int = 1,
) -> bytes:
    """A whole preview: window, overlay, scale, PNG."""
    return encode_png(upscale(overlay(grey(plane, window), classes), scale))

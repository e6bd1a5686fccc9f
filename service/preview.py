"""Rendering a slice as a PNG: pure functions of numpy arrays (the preview route and the demo).

A plane is the image at index k along one axis, keeping the other two axes in store order as
(rows, columns): ``axis="z"`` gives (y, x), ``axis="y"`` gives (x, z), ``axis="x"`` gives (y, z).
Intensities map linearly from the window [lo, hi] to 0..255 grey; each class is blended over
it in its own colour (``store.ome.CLASS_COLORS``, the viewers' colours too).

Memory: :func:`render_png` renders a strip of rows at a time straight into the one output
raster (Pillow's, 4 bytes a pixel), so besides the planes read it holds that raster, the PNG
being written and one strip's temporaries; :func:`render_peak_bytes` is that peak, which the
preview route holds in the server's in-flight budget.
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
# the most pixels a magnified preview may have: 4096 x 4096 (64 MiB of raster)
MAX_PREVIEW_SIDE = 4096
MAX_PREVIEW_PIXELS = MAX_PREVIEW_SIDE * MAX_PREVIEW_SIDE
STRIP_BYTES = 4 << 20  # output raster rendered at once, in strips of whole rows
# The PNG's size over the unscaled RGB bytes, at most (render_peak_bytes), and what zlib,
# Pillow's encoder buffers and the PNG's growing buffer take besides.
PNG_SLACK = 1.1
PNG_SCALED_SLACK = 2.5
ZLIB_BYTES = 2 << 20
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
    """Drop the length-1 ``axis`` of a region read with :func:`plane_region` (a view: no copy)."""
    index: list[slice | int] = [slice(None)] * volume.ndim
    index[AXES[axis]] = 0
    return volume[tuple(index)]


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
    """(h, w) intensities -> (h, w) uint8, linear over the window, clipped. In float64 (one
    temporary, worked in place): float32 would round some voxels to the next grey level."""
    lo, hi = window
    scaled = plane.astype(np.float64)
    scaled -= lo
    scaled *= 255.0 / (hi - lo)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def overlay(grey_plane: np.ndarray, classes: np.ndarray | None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(h, w) grey and optional (h, w, C) class masks -> (h, w, 3) RGB; class k in its colour
    (a voxel of several classes shows the last). Blended in float32, one channel at a time."""
    rgb = np.empty((*grey_plane.shape, 3), np.uint8)
    if classes is None:
        rgb[...] = grey_plane[..., None]
        return rgb
    wheres = [classes[..., k] != 0 for k in range(classes.shape[-1])]
    colours = [alpha * np.asarray(class_color(k), np.float32) for k in range(len(wheres))]
    channel = np.empty(grey_plane.shape, np.float32)
    for c in range(3):
        channel[...] = grey_plane
        for where, colour in zip(wheres, colours, strict=True):
            np.multiply(channel, 1 - alpha, out=channel, where=where)
            np.add(channel, colour[c], out=channel, where=where)
        np.rint(channel, out=channel)
        np.clip(channel, 0, 255, out=channel)
        rgb[..., c] = channel
    return rgb


def labels_to_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(h, w) label map (0 none, k+1 class k) -> (h, w, C) booleans."""
    out = np.empty((*labels.shape, num_classes), bool)
    for k in range(num_classes):
        np.equal(labels, k + 1, out=out[..., k])
    return out


def check_scale(scale: int) -> None:
    if not 1 <= scale <= MAX_SCALE:
        raise InvalidParameter("scale", f"{scale} is not a whole number in 1..{MAX_SCALE}")


def upscale(rgb: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel as a ``scale`` x ``scale`` block, written once into one new array."""
    check_scale(scale)
    if scale == 1:
        return rgb
    rows, cols = rgb.shape[:2]
    out = np.empty((rows, scale, cols, scale, *rgb.shape[2:]), rgb.dtype)
    out[...] = rgb[:, None, :, None]
    return out.reshape(rows * scale, cols * scale, *rgb.shape[2:])


def _save_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    return _save_png(Image.fromarray(np.ascontiguousarray(rgb)))


def strip_rows(cols: int, scale: int) -> int:
    """How many plane rows :func:`render_png` renders at once: about STRIP_BYTES of raster."""
    return max(1, STRIP_BYTES // max(1, 4 * cols * scale * scale))


def render_png(
    plane: np.ndarray,
    window: tuple[float, float],
    classes: np.ndarray | None = None,
    scale: int = 1,
) -> bytes:
    """A whole preview: window, overlay, scale, PNG. Rendered in strips of rows straight into
    the output raster, so no full-size temporary is ever made."""
    from PIL import Image

    check_scale(scale)
    rows, cols = plane.shape
    image = Image.new("RGB", (cols * scale, rows * scale))
    step = strip_rows(cols, scale)
    for top in range(0, rows, step):
        strip = overlay(
            grey(plane[top : top + step], window), None if classes is None else classes[top : top + step]
        )
        image.paste(Image.fromarray(upscale(strip, scale)), (0, top * scale))
        del strip
    return _save_png(image)


def render_peak_bytes(rows: int, cols: int, itemsize: int, classes: int, scale: int) -> int:
    """The most memory a preview of a (rows, cols) plane takes, planes read included (measured:
    tests/test_server_hardening.py): the image plane (``itemsize`` bytes a voxel, read and
    possibly copied once), ``classes`` bytes a voxel of overlay planes, the output raster (4
    bytes a pixel), the PNG (deflate of noise: about the raw RGB at scale 1, under 2.5 times the
    unscaled RGB at any larger scale, where every block is runs of one pixel) and one strip's
    temporaries (float64 grey, float32 channel, class masks, RGB, its magnified copy twice)."""
    pixels = rows * cols
    out_pixels = pixels * scale * scale
    png = 3 * pixels * (PNG_SLACK if scale == 1 else PNG_SCALED_SLACK)
    strip = min(pixels, strip_rows(cols, scale) * cols)
    strip_work = strip * (8 + 4 + 3 + classes) + min(out_pixels, strip * scale * scale) * (3 + 4)
    return int(pixels * (2 * itemsize + classes) + 4 * out_pixels + png + strip_work + ZLIB_BYTES)

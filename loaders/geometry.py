"""Patch geometry: pure functions and frozen dataclasses, no I/O.

Coordinates are voxel indices of one axis of a volume of ``size`` voxels. A *window* is a
half-open range ``[start, stop)`` that may reach outside ``[0, size)``; the outside part is
filled by a numpy pad mode. :func:`padded_indices` maps every window position to the source
voxel numpy's ``np.pad`` would put there, so a window read from the store equals the same
window cut from ``np.pad(volume, ...)``, for every mode (not only the ones where padding the
clipped patch happens to agree).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# A window of a volume: ((y0, y1), (x0, x1), (z0, z1)), half-open; it may reach outside.
Window = tuple[tuple[int, int], ...]

PAD_MODES = ("constant", "edge", "reflect", "symmetric", "wrap")
BLEND_MODES = ("average", "gaussian")


def check_pad_mode(mode: str) -> str:
    if mode not in PAD_MODES:
        raise ValueError(f"IMG_PAD_MODE: {mode!r} is not one of {', '.join(PAD_MODES)}")
    return mode


def source_index(position: int, size: int, mode: str) -> int:
    """The voxel of ``[0, size)`` that ``np.pad(..., mode)`` shows at ``position`` (-1: constant)."""
    if 0 <= position < size:
        return position
    if mode == "constant":
        return -1
    if mode == "edge":
        return 0 if position < 0 else size - 1
    if mode == "wrap":
        return position % size
    if mode == "symmetric":  # edge voxel repeated: period 2*size
        j = position % (2 * size)
        return j if j < size else 2 * size - 1 - j
    if mode == "reflect":  # edge voxel not repeated: period 2*(size-1)
        if size == 1:
            return 0
        period = 2 * (size - 1)
        j = position % period
        return j if j < size else period - j
    raise ValueError(f"unknown pad mode {mode!r}")


@dataclass(frozen=True)
class AxisRead:
    """How to produce one axis of a window: read ``[lo, hi)`` then take ``take`` (-1: fill)."""

    lo: int
    hi: int
    take: tuple[int, ...]

    @functools.cached_property
    def is_plain(self) -> bool:
        """The window lies inside the volume: the read is the window."""
        return len(self.take) == self.hi - self.lo and self.take == _identity(self.hi - self.lo)

    @functools.cached_property
    def fills(self) -> bool:
        """Some positions are constant padding (zero-filled by ``take_window``)."""
        return not self.is_plain and min(self.take) < 0


@functools.lru_cache(maxsize=64)
def _identity(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def padded_indices(start: int, stop: int, size: int, mode: str) -> AxisRead:
    """Which voxels to read for window ``[start, stop)`` of an axis of ``size`` voxels."""
    if stop <= start or size < 1:
        raise ValueError(f"empty window [{start}, {stop}) or axis of size {size}")
    if start >= 0 and stop <= size:  # the common case, without a Python call per voxel
        return AxisRead(start, stop, _identity(stop - start))
    sources = [source_index(p, size, mode) for p in range(start, stop)]
    inside = [s for s in sources if s >= 0]
    if not inside:
        raise ValueError(
            f"window [{start}, {stop}) lies wholly outside an axis of {size} voxels: with "
            "IMG_PAD_MODE='constant' it would be padding only, no voxel of the scan"
        )
    lo, hi = min(inside), max(inside) + 1
    return AxisRead(lo, hi, tuple(s - lo if s >= 0 else -1 for s in sources))


def take_window(data: np.ndarray, axes: Sequence[AxisRead]) -> np.ndarray:
    """Gather a window from ``data`` (the region ``[lo, hi)`` of each axis already read).

    Trailing axes of ``data`` beyond ``axes`` (classes) are kept whole. Constant-padded
    positions are zero, as ``np.pad``'s default constant.
    """
    out = data
    for axis, a in enumerate(axes):
        if a.is_plain:  # gather only the padded axes: a 2.5D window pads z, never 384x384
            continue
        take = np.asarray(a.take, dtype=np.intp)
        out = np.take(out, np.maximum(take, 0), axis=axis)
        fill = take < 0
        if fill.any():
            sl: list[slice | np.ndarray] = [slice(None)] * out.ndim
            sl[axis] = fill
            out[tuple(sl)] = 0
    return out


def normalize_per_axis(
    value: int | Sequence[int | None] | None, ndim: int, name: str
) -> tuple[int, ...] | None:
    """``()``/None -> None; an int -> every axis; a sequence -> per axis (None -> 0)."""
    if value is None or (isinstance(value, Sequence) and len(value) == 0):
        return None
    if isinstance(value, int):
        return (int(value),) * ndim
    if len(value) != ndim:
        raise ValueError(f"{name}: {tuple(value)} needs {ndim} values")
    return tuple(0 if v is None else int(v) for v in value)


def axis_starts(size: int, patch: int, stride: int, pad: int = 0) -> tuple[int, ...]:
    """Patch starts along one axis: every ``stride`` from ``-pad``, the last snapped to the end.

    The padded extent is ``[-pad, size + pad)``, extended at the end when shorter than one
    patch. The last start is always ``end - patch``, so the grid covers every voxel (MedSegPy's
    grid drops the tail that no full stride reaches).
    """
    if patch < 1 or stride < 1 or pad < 0 or size < 1:
        raise ValueError(f"bad grid: size={size} patch={patch} stride={stride} pad={pad}")
    if pad >= patch:
        raise ValueError(f"IMG_PAD_SIZE: padding {pad} must be smaller than the patch {patch}")
    if stride > patch:
        raise ValueError(f"IMG_STRIDE: stride {stride} larger than the patch {patch} would skip voxels")
    lo = -pad
    hi = max(size + pad, lo + patch)
    last = hi - patch
    starts = list(range(lo, last, stride))
    starts.append(last)
    return tuple(starts)


@dataclass(frozen=True)
class PatchGrid:
    """A grid of patches over a volume: ``patch`` voxels every ``stride``, ``pad`` each side."""

    shape: tuple[int, ...]
    patch: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        patch: Sequence[int],
        stride: Sequence[int] | None = None,
        pad: Sequence[int] | None = None,
    ) -> PatchGrid:
        n = len(shape)
        if len(patch) != n:
            raise ValueError(f"patch {tuple(patch)} and volume {tuple(shape)} differ in dimensions")
        return cls(
            tuple(int(s) for s in shape),
            tuple(int(p) for p in patch),
            tuple(int(s) for s in (stride or patch)),
            tuple(int(p) for p in (pad or (0,) * n)),
        )

    def starts(self) -> tuple[tuple[int, ...], ...]:
        return tuple(
            axis_starts(*args) for args in zip(self.shape, self.patch, self.stride, self.pad, strict=True)
        )

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(itertools.product(*self.starts()))

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts())

    def windows(self) -> Iterator[tuple[tuple[int, int], ...]]:
        for start in self:
            yield tuple((s, s + p) for s, p in zip(start, self.patch, strict=True))


def clip_window(
    window: Sequence[tuple[int, int]], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The part of a window inside the volume: (slices into the volume, slices into the patch)."""
    vol, local = [], []
    for (start, stop), size in zip(window, shape, strict=True):
        lo, hi = max(start, 0), min(stop, size)
        vol.append(slice(lo, hi))
        local.append(slice(lo - start, hi - start))
    return tuple(vol), tuple(local)


def blend_weights(patch: Sequence[int], mode: str = "average", sigma_scale: float = 1 / 8) -> np.ndarray:
    """Per-voxel weights of one patch's prediction when overlapping patches are averaged.

    ``average``: all ones. ``gaussian``: a separable Gaussian centred on the patch with sigma
    ``sigma_scale * size`` per axis (nnU-Net's choice), scaled to a maximum of 1 and floored
    at its smallest positive value, and at 1e-8, so that no voxel ever has weight 0. The 1e-8
    keeps a patch's far corners (about 2e-9 at sigma 1/8) from underflowing in the float32 sums
    of larger patches; where every window covering a voxel sees it near a corner (a volume's
    corners and edges: an axis one window covers, or the last window snapped to the end), its
    blend differs from an unfloored Gaussian's, by up to about 1 % there; elsewhere it is the
    same.
    """
    shape = tuple(int(p) for p in patch)
    if mode == "average":
        return np.ones(shape, dtype=np.float64)
    if mode != "gaussian":
        raise ValueError(f"blend mode {mode!r} is not one of {', '.join(BLEND_MODES)}")
    weights = np.ones(shape, dtype=np.float64)
    for axis, size in enumerate(shape):
        sigma = max(size * sigma_scale, 1e-6)
        x = np.arange(size, dtype=np.float64) - (size - 1) / 2
        profile = np.exp(-0.5 * (x / sigma) ** 2)
        view = [1] * len(shape)
        view[axis] = size
        weights = weights * profile.reshape(view)
    weights /= weights.max()
    positive = weights[weights > 0]
    floor = positive.min() if positive.size else 1.0
    return np.maximum(weights, max(floor, 1e-8))


def neighbour_window(z: int, window: int) -> tuple[int, int]:
    """2.5D: the ``window`` slices centred on ``z`` (window odd)."""
    if window < 1 or window % 2 != 1:
        raise ValueError(f"IMG_SIZE[-1]: the number of 2.5D slices must be odd, got {window}")
    half = window // 2
    return z - half, z + half + 1

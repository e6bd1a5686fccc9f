"""Regions of interest: parsing and formatting ``roi=y0:y1,x0:x1,z0:z1``.

Pure functions over shapes. Each axis takes numpy slice syntax (``a:b``, ``:``, ``a:``,
``:b``, negative bounds allowed) or an index ``k``, which is kept as length 1. Unlike numpy,
bounds are never clamped: a region outside the array, or an empty one, is an error, so that a
typo does not silently read the wrong voxels. Axes left out mean the whole axis.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import numpy as np

from store.errors import InvalidROI

# ASCII digits only, of bounded length: int() would also take "1_0", other scripts' digits and 5000-digit numbers.
PLAIN_INT = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)

Region = tuple[slice, ...]  # normalized: concrete start < stop, step None


def integer_problem(text: str) -> str:
    """Why ``text`` is not a plain integer (``PLAIN_INT``), for an error message."""
    text = text.strip(" \t")
    if re.fullmatch(r"[+-]?[0-9]+", text, re.ASCII):
        return f"{text[:40]!r} has more than 18 digits"
    return f"{text[:40]!r} is not an integer"


def _parse_int(text: str, axis: int, param: str) -> int:
    text = text.strip(" \t")
    if PLAIN_INT.fullmatch(text) is None:
        raise InvalidROI(f"axis {axis}: {integer_problem(text)}", param)
    return int(text)


def _normalize(value: int, size: int) -> int:
    return value + size if value < 0 else value


def parse_roi(text: str | None, shape: Sequence[int], param: str = "roi") -> Region:
    """Parse ``text`` against ``shape`` into one concrete slice per axis."""
    if text is None or text.strip() == "":
        if text is not None and text != "":
            raise InvalidROI("empty", param)
        return full_region(shape)
    parts = text.split(",")
    if len(parts) > len(shape):
        raise InvalidROI(f"{len(parts)} axes given, the array has {len(shape)}", param)
    region: list[slice] = []
    for axis, part in enumerate(parts):
        size = int(shape[axis])
        if ":" in part:
            bits = part.split(":")
            if len(bits) != 2:
                # a:b:c is a step; a:b;c:d is axes split by ';' where ',' was meant
                why = "axes are split by ','" if ";" in part else "steps are not supported"
                raise InvalidROI(f"axis {axis}: {part.strip()!r} is not 'a:b' ({why})", param)
            lo, hi = (b.strip() for b in bits)
            start = _normalize(_parse_int(lo, axis, param), size) if lo else 0
            stop = _normalize(_parse_int(hi, axis, param), size) if hi else size
            if not (0 <= start <= size and 0 <= stop <= size):
                raise InvalidROI(f"axis {axis}: {part.strip()} is out of bounds for size {size}", param)
            if start >= stop:
                raise InvalidROI(f"axis {axis}: {part.strip()} is empty", param)
        else:
            if not part.strip():
                raise InvalidROI(f"axis {axis}: empty", param)
            index = _parse_int(part, axis, param)
            start = _normalize(index, size)
            if not 0 <= start < size:
                raise InvalidROI(f"axis {axis}: index {index} is out of bounds for size {size}", param)
            stop = start + 1
        region.append(slice(start, stop))
    region.extend(slice(0, int(n)) for n in shape[len(parts) :])
    return tuple(region)


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, int(n)) for n in shape)


def format_roi(region: Sequence[slice]) -> str:
    """The inverse of :func:`parse_roi` for normalized regions."""
    return ",".join(f"{s.start}:{s.stop}" for s in region)


def region_shape(region: Sequence[slice]) -> tuple[int, ...]:
    return tuple(int(s.stop) - int(s.start) for s in region)


def slices_text(roi: Sequence[slice], param: str = "roi") -> str:
    """A sequence of slices as roi text (what the server and :func:`parse_roi` take): a step, a
    bound that is not a whole number (``0.5``, ``True``) or an item that is no slice is refused,
    never rounded or dropped. The one conversion of slices, for local and remote reads alike."""

    def bound(value: object, axis: int) -> str:
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidROI(f"axis {axis}: bound {value!r} is not a whole number", param)
        return str(int(value))

    parts = []
    for axis, s in enumerate(roi):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise InvalidROI(f"axis {axis}: {s!r} is not a slice without step", param)
        parts.append(f"{bound(s.start, axis)}:{bound(s.stop, axis)}")
    return ",".join(parts)


def as_region(roi: str | Sequence[slice] | None, shape: Sequence[int]) -> Region:
    """Accept a roi string, a sequence of slices (validated the same way) or None."""
    if roi is None or isinstance(roi, str):
        return parse_roi(roi, shape)
    return parse_roi(slices_text(roi), shape)


def chunk_bytes_touched(region: Sequence[slice], inner: Sequence[int], itemsize: int) -> int:
    """Decoded bytes of the inner chunks a region touches (an edge chunk counts whole: it is
    decoded whole). Axes past the region's (a mask's class axis) are read whole."""
    chunks = 1
    for axis, size in enumerate(inner):
        if axis < len(region):
            lo, hi = region[axis].start, region[axis].stop
            chunks *= 0 if hi <= lo else (hi - 1) // size - lo // size + 1
    return chunks * int(np.prod(inner)) * itemsize

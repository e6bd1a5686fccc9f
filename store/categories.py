"""Class selection and merging, MedSegPy's ``CATEGORIES`` semantics.

``categories`` is a sequence whose items are a class index or a sequence of class indices; a
sequence merges its classes by summing them (MedSegPy's ``collect_mask``). ``background``
prepends a channel that is 1 where none of the selected categories is set. Each class appears at
most once in all, so a request has at most one channel per class: repeating a class would only
multiply the response (a 9 KB URL could ask for a gigabyte).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from store.errors import InvalidCategories

Categories = tuple[tuple[int, ...], ...]


def parse_categories(value: Any, param: str = "categories") -> Categories:
    """The one parser of categories, wherever they enter (REST query, client, CLI, predictions):
    a list or tuple, JSON text (``[0,[1,2],3]``) or the CLI's short form (``0,1+2,3``, a ``+``
    merges classes), into tuples of class indices, each class at most once. The range of the
    indices depends on the scan: :func:`normalize_categories` checks it."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise InvalidCategories(f"{text[:40]!r} is not a JSON list", param) from None
            except RecursionError:
                raise InvalidCategories("too deeply nested", param) from None
        else:
            try:
                value = [[int(k) for k in item.split("+")] if "+" in item else int(item)
                         for item in text.split(",") if item.strip()]  # fmt: skip
            except ValueError:
                raise InvalidCategories(
                    f"{text[:40]!r} is neither a JSON list like [0,[1,2],3] nor like 0,1+2,3", param
                ) from None
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise InvalidCategories("must be a non-empty list of class indices or lists of them", param)
    out: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for item in value:
        group = item if isinstance(item, (list, tuple)) else (item,)
        if len(group) == 0:
            raise InvalidCategories("an empty sub-list selects no class", param)
        for k in group:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise InvalidCategories(f"{k!r} is not a class index", param)
            if int(k) < 0:
                raise InvalidCategories(f"class {k} is negative", param)
            if int(k) in seen:
                raise InvalidCategories(f"class {k} is selected twice: each class may appear once", param)
            seen.add(int(k))
        out.append(tuple(int(k) for k in group))
    return tuple(out)


def normalize_categories(value: Any, num_classes: int) -> Categories:
    """Parse categories (:func:`parse_categories`) and check them against a scan's classes."""
    parsed = parse_categories(value)
    if len(parsed) > num_classes:
        raise InvalidCategories(
            f"{len(parsed)} categories for {num_classes} classes: at most one channel a class"
        )
    for group in parsed:
        for k in group:
            if k >= num_classes:
                raise InvalidCategories(f"class {k} is out of range for {num_classes} classes")
    return parsed


def all_categories(num_classes: int) -> Categories:
    return tuple((k,) for k in range(num_classes))


def merge_mask(
    mask: np.ndarray,
    categories: Categories | None = None,
    background: bool = False,
    dtype: Any = np.uint8,
) -> np.ndarray:
    """Select and merge classes on the last axis of ``mask``; optionally prepend background.

    A group's channel is the sum of its classes computed in ``dtype`` (as MedSegPy's
    ``collect_mask``; uint8 wraps like ``sum(dtype=uint8)``); background is 1 where every
    merged channel is 0. Written with elementwise ufuncs on whole planes: a fancy-indexed
    ``sum(axis=-1)`` over a short class axis is several times slower.
    """
    if categories is None:
        categories = all_categories(mask.shape[-1])
    dtype = np.dtype(dtype)
    channels: list[np.ndarray] = []
    for group in categories:
        if len(group) == 1:
            channels.append(mask[..., group[0]].astype(dtype, copy=False))
            continue
        total = np.add(mask[..., group[0]], mask[..., group[1]], dtype=dtype, casting="unsafe")
        for k in group[2:]:
            np.add(total, mask[..., k], out=total, dtype=dtype, casting="unsafe")
        channels.append(total)
    if background:
        channels.insert(0, _background(channels, mask.shape[:-1]))
    out = np.empty((*mask.shape[:-1], len(channels)), dtype)
    return np.stack(channels, axis=-1, out=out, casting="unsafe")


def _background(channels: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """True where every channel is 0 (an OR of integer channels is 0 exactly then)."""
    if not channels:
        return np.ones(shape, dtype=bool)
    if all(ch.dtype.kind in "biu" for ch in channels):
        union = np.array(channels[0], copy=True)
        for ch in channels[1:]:
            np.bitwise_or(union, ch, out=union, casting="unsafe")
        return union == 0
    empty = channels[0] == 0
    for ch in channels[1:]:
        empty &= ch == 0
    return empty


def categories_json_value(categories: Sequence[Sequence[int]]) -> list[Any]:
    """``((0,), (1, 2))`` as the JSON value ``[0, [1, 2]]``."""
    return [list(g) if len(g) > 1 else g[0] for g in categories]


def categories_to_json(categories: Sequence[Sequence[int]] | None) -> str | None:
    if categories is None:
        return None
    return json.dumps(categories_json_value(categories))

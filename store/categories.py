"""Class selection and merging, MedSegPy's ``CATEGORIES`` semantics.

``categories`` is a sequence whose items are a class or a sequence of classes; a sequence merges
its classes by summing them (MedSegPy's ``collect_mask``). A class is its index or its name (a
str, one of the scan's ``class_names``). ``background`` prepends a channel that is 1 where none
of the selected categories is set. Each class appears at most once in all, so a request has at
most one channel per class: repeating a class would only multiply the response (a 9 KB URL could
ask for a gigabyte).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from store.errors import InvalidCategories

Categories = tuple[tuple[int, ...], ...]
# Categories as given, before the scan's class names resolve them: indices and names.
Selection = tuple[tuple[int | str, ...], ...]
SHOWN_NAMES = 20  # class names an error lists (an atlas has a hundred)


def parse_categories(value: Any, param: str = "categories") -> Selection:
    """The one parser of categories, wherever they enter (REST query, client, CLI, Config,
    predictions): a list or tuple, JSON text (``[0,[1,"b",2],3]``) or the CLI's short form
    (``0,1+2,3`` or ``femur,tibia+patella``: a ``+`` merges classes; a whole number is an index,
    anything else a name), into tuples of class indices and names, each at most once. The range
    of the indices and the names depend on the scan: :func:`resolve_categories` checks them."""
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
            items = text.split(",")
            if any(not item.strip() for item in items):  # "0,,1" or "0,1,": a class left out?
                raise InvalidCategories(f"{text.strip()[:40]!r} has an empty item between commas", param)
            value = [_short_group(item, param) for item in items]
    if not isinstance(value, (list, tuple)) or len(value) == 0:
        raise InvalidCategories("must be a non-empty list of classes (index or name) or lists of them", param)
    out: list[tuple[int | str, ...]] = []
    for item in value:
        group = item if isinstance(item, (list, tuple)) else (item,)
        if len(group) == 0:
            raise InvalidCategories("an empty sub-list selects no class", param)
        seen: set[int | str] = set()  # a class may be in several categories (regions), once in each
        for k in group:
            if isinstance(k, str):
                if not k.strip():
                    raise InvalidCategories("an empty class name", param)
                key: int | str = k
            elif isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise InvalidCategories(f"{_shown(k)} is not a class index or name", param)
            elif int(k) < 0:
                raise InvalidCategories(f"class {k} is negative", param)
            else:
                key = int(k)
            if key in seen:
                raise InvalidCategories(f"class {k!r} appears twice in one category", param)
            seen.add(key)
        out.append(tuple(k if isinstance(k, str) else int(k) for k in group))
    return tuple(out)


def _short_group(item: str, param: str) -> Any:
    """One item of the short form: ``1``, ``femur``, ``1+2`` or ``femur+2``."""
    parts = [part.strip() for part in item.split("+")]
    if any(not part for part in parts):
        raise InvalidCategories(
            f"{item.strip()[:40]!r} is neither a JSON list like [0,[1,2],3] nor like 0,1+2,3", param
        )
    classes = [int(part) if _is_index(part) else part for part in parts]
    return classes if len(classes) > 1 else classes[0]


def _is_index(text: str) -> bool:
    """ASCII digits, as in a roi: ``int`` alone would also read ``1_0`` as 10 and other
    scripts' digits (Arabic-Indic, fullwidth) as numbers."""
    if not re.fullmatch(r"-?[0-9]+", text):
        return False
    try:
        int(text)
    except ValueError:  # past Python's digit limit: a name, refused as no class named so
        return False
    return True


# overlapping categories (regions) may outnumber the classes, within reason: a short URL must not
# ask for a response many times the scan's size
MAX_CATEGORIES = 64


def resolve_categories(
    selection: Selection,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    param: str = "categories",
) -> Categories:
    """Class names to indices (``class_names``: the scan's, one per mask channel), checked
    against the scan's ``num_classes``: every index in range, each class at most once in a
    category, no two categories of the same classes. A class may be in several categories:
    overlapping regions, as BraTS trains on (whole tumour 1+2+4, tumour core 1+4, enhancing 4),
    each its own channel of y."""
    if len(selection) > max(num_classes, MAX_CATEGORIES):
        raise InvalidCategories(
            f"{len(selection)} categories for {num_classes} classes: at most "
            f"{max(num_classes, MAX_CATEGORIES)} channels",
            param,
        )
    names = list(class_names or ())
    out: list[tuple[int, ...]] = []
    groups: dict[frozenset[int], int] = {}
    for number, group in enumerate(selection):
        indices = []
        seen: dict[int, int | str] = {}
        for k in group:
            index = _index_of(k, names, param) if isinstance(k, str) else k
            if index >= num_classes:
                raise InvalidCategories(
                    f"class {k} is out of range for {num_classes} classes: integers are the mask's class "
                    f"indices 0..{num_classes - 1}{_named_indices(names)}, not a dataset's label values; "
                    "class names work too",
                    param,
                )
            if index in seen:
                raise InvalidCategories(
                    f"class {k!r} and class {seen[index]!r} are the same class: each class may appear "
                    "once in a category",
                    param,
                )
            seen[index] = k
            indices.append(index)
        classes = frozenset(indices)
        if classes in groups:
            raise InvalidCategories(
                f"categories {groups[classes]} and {number} select the same classes "
                f"({_group_text(selection[groups[classes]])} and {_group_text(selection[number])}): "
                "one channel for both",
                param,
            )
        groups[classes] = number
        out.append(tuple(indices))
    return tuple(out)


def _group_text(group: tuple[int | str, ...]) -> str:
    return _shown(group[0] if len(group) == 1 else list(group))


def _named_indices(names: Sequence[str], shown: int = 4) -> str:
    """`` (0 'spleen', 1 'right_kidney', ..., 14 'prostate')``: which index is which class."""
    if not names:
        return ""
    pairs = [f"{k} {n!r}" for k, n in enumerate(names)]
    if len(pairs) > shown:
        pairs = [*pairs[: shown - 1], "...", pairs[-1]]
    return f" ({', '.join(pairs)})"


def _index_of(name: str, names: Sequence[str], param: str) -> int:
    found = [k for k, n in enumerate(names) if n == name]
    if len(found) > 1:  # a Decathlon dataset.json may give two values one name: never guess
        classes = ", ".join(map(str, found))
        raise InvalidCategories(
            f"class name {name!r} is ambiguous: classes {classes} have it; select them by number", param
        )
    if found:
        return found[0]
    raise InvalidCategories(f"no class named {_shown(name)}; the classes are {format_names(names)}", param)


def _shown(value: Any, limit: int = 80) -> str:
    """A client's value in an error, cut short: a request must not make a megabyte of detail."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_names(names: Sequence[str]) -> str:
    """Class names for a one-line error: quoted, at most ``SHOWN_NAMES`` of them."""
    shown = ", ".join(repr(n) for n in names[:SHOWN_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > SHOWN_NAMES else ""
    return (shown + more) if names else "none (the scan has no mask)"


def normalize_categories(
    value: Any, num_classes: int, class_names: Sequence[str] | None = None
) -> Categories:
    """Parse categories (:func:`parse_categories`) and resolve them against a scan's classes."""
    return resolve_categories(parse_categories(value), num_classes, class_names)


def category_names(categories: Categories | None, class_names: Sequence[str]) -> list[str]:
    """The output channels' names: a class's name, merged classes' names joined by ``+``
    (``"tibia+patella"``); every class of the scan when ``categories`` is None."""
    if categories is None:
        return list(class_names)
    return ["+".join(class_names[k] for k in group) for group in categories]


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


def categories_json_value(categories: Sequence[Sequence[int | str]]) -> list[Any]:
    """``((0,), (1, "b"))`` as the JSON value ``[0, [1, "b"]]``."""
    return [list(g) if len(g) > 1 else g[0] for g in categories]


def categories_to_json(categories: Sequence[Sequence[int | str]] | None) -> str | None:
    if categories is None:
        return None
    return json.dumps(categories_json_value(categories))

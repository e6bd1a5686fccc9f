"""Which scans a listing selects: attribute filters (``split``, ``subject_id``, ...,
``has_class``) matched against a scan's metadata, and one line saying why none matched. The
local reader, the server's ``GET /scans`` and the HTTP client all filter with ``matches``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from store.format import ScanMeta
from store.roi import PLAIN_INT, integer_problem

FILTER_KEYS = ("split", "subject_id", "time_point", "augmentation", "has_class", "scan_id")
INTEGER_KEYS = ("subject_id", "time_point", "augmentation")


def normalized_filters(filters: dict[str, Any]) -> dict[str, Any]:
    """Filters as Python callers give them, made plain once where they enter (a listing, a
    dataset's registration): numpy scalars become numbers, any other collection (a numpy
    array, a range, a pandas column, a generator) a list; ``True`` for an integer attribute
    is refused (it would match 1)."""
    out: dict[str, Any] = {}
    for key, want in filters.items():
        if want is not None and not isinstance(want, (str, bytes, list, tuple, set, frozenset)):
            if hasattr(want, "item") and getattr(want, "ndim", None) == 0:  # np.int64(3)
                want = want.item()
            elif hasattr(want, "__iter__") and not isinstance(want, dict):
                want = [v.item() if hasattr(v, "item") and getattr(v, "ndim", None) == 0 else v for v in want]
        values = want if isinstance(want, (list, tuple, set, frozenset)) else [want]
        if key in INTEGER_KEYS and any(isinstance(v, bool) for v in values):
            raise ValueError(f"{key}={want!r}: expected an integer or a list of them")
        if key in INTEGER_KEYS:  # "0000001" as in the file names is subject 1, as the server reads it
            plain = [int(v) if isinstance(v, str) and PLAIN_INT.fullmatch(v.strip()) else v for v in values]
            want = plain if isinstance(want, (list, tuple, set, frozenset)) else plain[0]
        out[key] = want
    return out


def unmatched_values(scans: Sequence[ScanMeta], filters: dict[str, Any]) -> dict[str, list[Any]]:
    """Per filter given a list, its values that no scan of ``scans`` has (a typo in a list of
    subjects or scan ids leaves a dataset short without a word otherwise)."""
    out: dict[str, list[Any]] = {}
    for key, want in filters.items():
        if key == "has_class" or not isinstance(want, (list, tuple, set, frozenset)):
            continue
        present = {str(meta.attrs.get(key)) for meta in scans}
        missing = [value for value in want if str(value) not in present]
        if missing:
            out[key] = missing
    return out


def has_class_values(want: Any) -> list[int | str]:
    """``has_class``'s classes: an index, a class name, or a list of them (any of them)."""
    values = list(want) if isinstance(want, (list, tuple, set, frozenset)) else [want]
    out: list[int | str] = []
    for value in values:
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            if len(value.strip()) > 18:  # int() would take 5000 digits, at a cost
                raise ValueError(f"has_class: {integer_problem(value)}")
            value = int(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, str))
            or (isinstance(value, int) and value < 0)
        ):
            raise ValueError(
                f"has_class: expected a class index (0, 1, ...) or a class name, or a list of them; got {want!r}"
            )
        out.append(value)
    return out


def has_any_class(meta: ScanMeta, want: Any) -> bool:
    """Whether one of ``want``'s classes (an index or a name) has voxels in the scan."""
    counts = meta.class_voxels()
    names = meta.class_names
    for value in has_class_values(want):
        k = names.index(value) if isinstance(value, str) and value in names else value
        if isinstance(k, int) and k < len(counts) and counts[k] > 0:
            return True
    return False


def matches(meta: ScanMeta, filters: dict[str, Any]) -> bool:
    """Whether a scan passes attribute filters (``has_class=k``: class k has voxels)."""
    for key, want in filters.items():
        if want is None:
            continue
        if key == "has_class":
            if not has_any_class(meta, want):
                return False
            continue
        have = meta.attrs.get(key)
        # as text too ("3" for 3, as a URL gives it), but an absent attribute is no "None"
        if isinstance(want, (list, tuple, set, frozenset)):
            if have not in want and (have is None or str(have) not in {str(w) for w in want}):
                return False
        elif have != want and (have is None or str(have) != str(want)):
            return False
    return True


def why_nothing_matches(scans: Sequence[ScanMeta], filters: dict[str, Any]) -> str:
    """Why ``filters`` select none of ``scans`` (every scan of a store): the first filter no
    scan passes, with the values the scans have (or the attribute a misspelt key may mean)."""
    import difflib

    if not scans:
        return "the store has no scans"
    for key, want in filters.items():
        if want is None or any(matches(meta, {key: want}) for meta in scans):
            continue
        if key == "has_class":
            names = sorted({n for meta in scans for n in meta.class_names})
            unknown = [v for v in has_class_values(want) if isinstance(v, str) and v not in names]
            if unknown:
                return f"has_class={want!r}: no scan has a class named {unknown[0]!r} (classes: {', '.join(names)})"
            most = max((meta.num_classes for meta in scans), default=0)
            beyond = [v for v in has_class_values(want) if isinstance(v, int) and v >= most]
            if beyond:
                return f"has_class={want!r}: the scans have {most} classes (0 to {most - 1})"
            return f"has_class={want!r}: no scan has voxels of that class"
        values = sorted({str(meta.attrs[key]) for meta in scans if key in meta.attrs})
        if values:
            shown = ", ".join(values[:12]) + (", ..." if len(values) > 12 else "")
            return f"{key}={want!r} matches no scan (its scans have {key} {shown})"
        names = sorted({k for meta in scans for k in meta.attrs} | {"has_class"})
        close = difflib.get_close_matches(key, names, n=1)
        return f"no scan has an attribute {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return f"no scan matches all of {', '.join(f'{k}={v!r}' for k, v in filters.items())}"

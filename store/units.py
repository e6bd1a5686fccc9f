"""The one parser (and formatter) of byte sizes, for command-line flags and ``SCANCACHE_*`` environment settings.

``4096``, ``64k``, ``512M``, ``2G``, ``1.5GiB`` and ``10MB`` are all accepted; K/M/G/T are powers
of 1024 whether written ``M``, ``MB`` or ``MiB`` (a cache size is never meant in powers of 1000).
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# ASCII digits only: str.isdigit() and \d would accept superscripts and other scripts' digits.
_SIZE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE | re.ASCII)


def parse_bytes(text: str | int, name: str = "size") -> int:
    """``parse_bytes("512M", "--cache-bytes")`` -> 536870912.

    Raises ``ValueError`` with one line naming ``name`` (a flag or an environment variable).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{name}: {text} is not a byte size like 4096, 512M or 2G")
        return text
    match = _SIZE.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"{name}: {str(text)[:40]!r} is not a byte size like 4096, 512M or 2G")
    number, unit = match[1], match[2].upper()
    if "." in number:
        return int(float(number) * _UNITS[unit])
    return int(number) * _UNITS[unit]  # exact for whole numbers (no float rounding)


def format_bytes(n: float) -> str:
    """``format_bytes(3 * 2**30)`` -> ``"3.0 GiB"`` (powers of 1024, as ``parse_bytes``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def count_of(number: int, noun: str) -> str:
    """``1 scan``, ``2 scans``: a count as a person writes it."""
    return f"{number} {noun}{'' if number == 1 else 's'}"

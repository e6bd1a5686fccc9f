"""The one parser of each kind of value a user types: byte sizes, whole numbers, seconds and
tuples of integers, wherever they enter (command-line flags, ``SCANCACHE_*`` environment
settings, Python arguments); and the formatter of byte sizes.

Each refuses in one line naming the setting (``name``: the flag or the environment variable)
and the value, as an :class:`InvalidValue` (a ``ValueError``). They are as strict as the REST
API's integers (``store.roi.PLAIN_INT``): ASCII digits only, so ``1_0``, ``1e3``, superscripts
and other scripts' digits are refused, not read as numbers; seconds are finite.

``4096``, ``64k``, ``512M``, ``2G``, ``1.5GiB`` and ``10MB`` are all byte sizes; K/M/G/T are powers
of 1024 whether written ``M``, ``MB`` or ``MiB`` (a cache size is never meant in powers of 1000).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

from store.errors import InvalidParameter
from store.roi import PLAIN_INT

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# ASCII digits only: str.isdigit() and \d would accept superscripts and other scripts' digits.
_SIZE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE | re.ASCII)


# Seconds: ASCII digits with an optional decimal point (``10``, ``2.5``, ``.5``); a sign only
# so that ``-1`` is told it is below the bound rather than that it is no number.
_SECONDS = re.compile(r"[+-]?(?:[0-9]{1,18}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})", re.ASCII)
# Between the integers of a tuple: ``64,64,8`` and ``64x64x8`` are the same shape.
_TUPLE_SEPARATOR = re.compile(r"[,xX]")
_COUNTS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


class InvalidValue(InvalidParameter):
    """A value refused where it enters: ``str()`` is ``"NAME: WHY"``; ``why`` is the reason
    without the name (argparse names the flag itself: ``argument --port: WHY``)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(name, why)
        self.why = why


def _shown(text: object) -> str:
    """The value as an error shows it: a string quoted and cut at 40 characters, a number as is."""
    return repr(text[:40]) if isinstance(text, str) else repr(text)


def _strip(text: str) -> str:
    return text.strip(" \t\r\n")


def parse_bytes(text: str | int, name: str = "size", positive: bool = False) -> int:
    """``parse_bytes("512M", "--cache-bytes")`` -> 536870912; ``positive``: 0 is refused too.

    Raises ``InvalidValue`` (a ``ValueError``) with one line naming ``name`` (a flag or an
    environment variable).
    """
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        if text < 0:
            raise InvalidValue(name, f"{text} is not a byte size like 4096, 512M or 2G")
        number = int(text)
    else:
        match = _SIZE.fullmatch(_strip(str(text)))
        if match is None:
            raise InvalidValue(name, f"{str(text)[:40]!r} is not a byte size like 4096, 512M or 2G")
        digits, unit = match[1], match[2].upper()
        # exact for whole numbers (no float rounding)
        number = int(float(digits) * _UNITS[unit]) if "." in digits else int(digits) * _UNITS[unit]
    if positive and number <= 0:  # a cache or a limit of 0 would serve nothing
        raise InvalidValue(name, f"{_shown(text)}: must be more than 0 bytes")
    return number


def parse_whole(
    text: str | int,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    what: str = "an integer",
) -> int:
    """``parse_whole("8000", "--port", 0, 65535, "a port number")`` -> 8000: a whole number in
    ASCII digits (an optional sign, at most 18 digits), within ``[minimum, maximum]``.

    ``what`` names the kind of number in the message (``'x' is not a port number``).
    """
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        number = int(text)
    elif isinstance(text, str) and PLAIN_INT.fullmatch(_strip(text)) is not None:
        number = int(_strip(text))
    else:
        raise InvalidValue(name, f"{_shown(text)} is not {what}")
    low = minimum is not None and number < minimum
    high = maximum is not None and number > maximum
    if low or high:
        if minimum is not None and maximum is not None:
            raise InvalidValue(name, f"{_shown(text)} is not {what} ({minimum} to {maximum})")
        bound = f"at least {minimum}" if low else f"at most {maximum}"
        raise InvalidValue(name, f"{_shown(text)} must be {bound}")
    return number


def parse_port(text: str | int, name: str) -> int:
    """A TCP port, 0 (any free one) to 65535: the socket layer would wrap a larger one silently."""
    return parse_whole(text, name, 0, 65535, "a port number")


def parse_seconds(text: str | float, name: str, zero_ok: bool = False) -> float:
    """``parse_seconds("2.5", "--header-timeout")`` -> 2.5: a finite number of seconds in ASCII
    digits with an optional decimal point, more than 0 (or at least 0 with ``zero_ok``).

    ``inf`` and ``nan`` are refused (a deadline that never ends), as are ``1e3`` and ``1_0``.
    """
    bound = ">= 0" if zero_ok else "more than 0"
    if isinstance(text, numbers.Real) and not isinstance(text, bool):
        number = float(text)
    elif isinstance(text, str) and _SECONDS.fullmatch(_strip(text)) is not None:
        number = float(_strip(text))
    else:
        if isinstance(text, str) and _strip(text).lower().lstrip("+-") in ("inf", "infinity", "nan"):
            raise InvalidValue(name, f"{_shown(text)} must be a finite number {bound}")
        raise InvalidValue(name, f"{_shown(text)} is not a number of seconds like 10 or 2.5")
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        raise InvalidValue(name, f"{_shown(text)} must be a finite number {bound}")
    return number


def parse_token(text: str | None, name: str) -> str | None:
    """A bearer token: surrounding whitespace dropped, None when nothing is left (not set).
    An HTTP header carries it as ASCII, so anything else is refused here, where it enters, not
    by the HTTP library at the first request; the token itself is never shown."""
    token = (text or "").strip()
    if not token:
        return None
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise InvalidValue(
            name, "a bearer token must be printable ASCII without spaces (an HTTP header carries it)"
        )
    return token


def format_seconds(seconds: float) -> str:
    """Seconds as ``parse_seconds`` reads them back (``10``, ``2.5``; never ``1e-05``)."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") or "0"


def parse_int_tuple(
    text: str | Sequence[int],
    name: str,
    lengths: Sequence[int] = (3,),
    minimum: int = 1,
    usage: str = "",
) -> tuple[int, ...]:
    """``parse_int_tuple("64,64,8", "--chunks")`` -> ``(64, 64, 8)``: integers separated by
    ``,`` or ``x`` (``64x64x8``), as many as one of ``lengths``, each at least ``minimum``.

    ``usage`` (e.g. ``"H,W,D"``) turns the message into ``'8,8': give three positive integers,
    H,W,D``; without it, ``'8,8' is not three comma-separated integers``.
    """
    count = " or ".join(_COUNTS.get(n, str(n)) for n in lengths)
    kind = {0: "non-negative", 1: "positive"}.get(minimum, "")
    integers = f"{kind} integers" if kind else f"integers of at least {minimum}"

    def refuse(why: str) -> InvalidValue:
        if usage:
            return InvalidValue(name, f"{_shown(text)}: give {count} {integers}, {usage}")
        return InvalidValue(name, f"{_shown(text)} is not {count} {why}")

    if isinstance(text, str):
        parts = [_strip(part) for part in _TUPLE_SEPARATOR.split(_strip(text))]
        if not all(PLAIN_INT.fullmatch(part) for part in parts):
            raise refuse("comma-separated integers")
        values = tuple(int(part) for part in parts)
    elif isinstance(text, Sequence) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in text
    ):
        values = tuple(int(v) for v in text)
    else:
        raise refuse("comma-separated integers")
    if len(values) not in lengths:
        raise refuse("comma-separated integers")
    if min(values) < minimum:
        raise refuse(integers)
    return values


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

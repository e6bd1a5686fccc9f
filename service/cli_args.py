"""The command line's argument types: each checks one kind of value where it enters and gives
argparse one line to print (``scancache <command>: error: ...``, exit 2); the token file's
reading and its mode check. ``service.cli`` builds the parsers with them."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from store.units import parse_bytes as _parse_size

# loaders.config.Y_FORMATS, written out so that the CLI does not import the loaders (numpy)
# to build its parser; tests/test_profile.py checks that the two agree.
PROFILE_Y_FORMATS = ("one_hot", "class_index")


def parse_bytes(text: str) -> int:
    """argparse type for sizes (``512M``); the parsing itself is ``store.units.parse_bytes``."""
    try:
        number = _parse_size(text, "size")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte size like 4096, 512M or 2G") from None
    if number <= 0:  # every size the CLI takes is a cache or a limit: 0 would serve nothing
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 bytes")
    return number


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); never echoed."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(
            f"scancache serve: error: --token-file {path}: cannot read it ({type(err).__name__})"
        ) from None
    if not token or any(c.isspace() for c in token):
        raise SystemExit(f"scancache serve: error: --token-file {path}: must hold one token on one line")
    warn_if_readable_by_others(path)
    return token


def warn_if_readable_by_others(path: str) -> None:
    """One line on stderr when group or other users may read the token file (as ssh checks a
    private key): the secret is as safe as the file's mode."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        print(
            f"scancache serve: warning: --token-file {path} is accessible by other users"
            f" (mode {mode:04o}); run: chmod 600 {path}",
            file=sys.stderr,
        )


class RefuseTokenFlag(argparse.Action):
    """``--token VALUE`` would put the secret where ``ps`` shows it: refuse it, naming the ways."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(
            "--token is not accepted (a command line is visible to every user, e.g. in ps);"
            " set SCANCACHE_TOKEN or use --token-file FILE"
        )


def positive_seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):  # nan compares false; inf would never end
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number more than 0")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def port_number(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: the socket layer would wrap a larger one silently."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def shape3(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive integers H,W,D")
    return values[0], values[1], values[2]


def class_names_arg(text: str) -> tuple[str, ...]:
    """``--class-names femur,tibia,patella``: one non-empty name per class, no name twice."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; give names like a,b,c")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} names {twice[0]!r} twice")
    return names


def scan_id_list(text: str) -> tuple[str, ...]:
    """``--rebuild 0000001_V00-Aug00,case_0003``: one or more scan ids."""
    from store.errors import InvalidPath
    from store.format import validate_scan_id

    ids = tuple(part.strip() for part in text.split(","))
    try:
        return tuple(validate_scan_id(i) for i in ids)
    except InvalidPath as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def spacing_arg(text: str) -> tuple[float, float, float]:
    """``--spacing 0.365,0.365,0.7``: mm along the stored axes (y, x, z)."""
    from store.ome import zyx_checked

    try:
        return zyx_checked([float(p) for p in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three positive numbers SY,SX,SZ (mm)") from None

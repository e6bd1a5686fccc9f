"""The command line's argument types: each checks one kind of value where it enters and gives
argparse one line to print (``scancache <command>: error: ...``, exit 2); the token file's
reading and its mode check; the checks of values argparse cannot see alone (an unknown flag's
closest option, a host to listen on). ``service.cli`` builds the parsers with them."""

from __future__ import annotations

import argparse
import difflib
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from store import units
from store.units import InvalidValue

if TYPE_CHECKING:
    from store.categories import Selection
    from store.format import ChunkLayout

T = TypeVar("T")

# loaders.config.Y_FORMATS, written out so that the CLI does not import the loaders (numpy)
# to build its parser; tests/test_profile.py checks that the two agree.
PROFILE_Y_FORMATS = ("one_hot", "class_index")


def _typed(parse: Callable[..., T], text: str, *args: Any, **kwargs: Any) -> T:
    """``parse(text, "value", ...)`` for argparse: its refusal without the name, which argparse
    puts in front itself (``argument --port: '8_000' is not a port number``)."""
    try:
        return parse(text, "value", *args, **kwargs)
    except InvalidValue as err:
        raise argparse.ArgumentTypeError(err.why) from None


def parse_bytes(text: str) -> int:
    """argparse type for sizes (``512M``); every size the CLI takes is a cache or a limit: 0
    would serve nothing."""
    return _typed(units.parse_bytes, text, positive=True)


def read_token_file(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); never echoed. A ValueError
    names ``--token-file`` (main() prints it as ``scancache serve: error: ...``)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--token-file {path}: cannot read it ({type(err).__name__})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--token-file {path}: must hold one token on one line")
    units.parse_token(token, f"--token-file {path}")  # what an HTTP header can carry
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
    """Seconds more than 0, finite (inf would never end)."""
    return _typed(units.parse_seconds, text)


def positive_int(text: str) -> int:
    return _typed(units.parse_whole, text, minimum=1)


def non_negative_int(text: str) -> int:
    return _typed(units.parse_whole, text, minimum=0)


def port_number(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535: the socket layer would wrap a larger one silently."""
    return _typed(units.parse_port, text)


def host_port_arg(text: str) -> str:
    """``HOST:PORT`` or ``:PORT`` (every interface, as Dask reads it) for ``preprocess
    --dashboard``: Dask took ``nonsense`` for a host name and failed the cluster's start with
    "Name or service not known"."""
    host, colon, port = text.rpartition(":")
    if not colon or not port:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8787)")
    port_number(port)
    if not host:
        return text
    try:
        socket.getaddrinfo(host.strip("[]"), None)
    except (socket.gaierror, UnicodeError):
        raise argparse.ArgumentTypeError(f"{text!r}: host {host!r} does not resolve") from None
    return text


def non_negative_seconds(text: str) -> float:
    """Seconds, 0 or more, finite (``preprocess --grace``)."""
    return _typed(units.parse_seconds, text, zero_ok=True)


def shape3(text: str) -> tuple[int, int, int]:
    """``--shape 96,96,24`` (or ``96x96x24``): three positive integers."""
    values = _typed(units.parse_int_tuple, text, usage="H,W,D")
    return values[0], values[1], values[2]


def categories_arg(text: str) -> Selection:
    """``profile --categories``, parsed once here by the one parser of categories
    (``store.categories.parse_categories``); a name the scans lack is found when they are read.
    ``""`` would read as no --categories at all (every class): refused, as the REST API does."""
    from store.categories import parse_categories
    from store.errors import InvalidCategories

    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names no class; leave it out for every class")
    try:
        return parse_categories(text, "--categories")
    except InvalidCategories as err:
        raise argparse.ArgumentTypeError(str(err)[len(err.param) + 2 :]) from None


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

    ids = tuple(part.strip() for part in text.split(",") if part.strip())  # "a,b," as pasted
    if not ids:
        raise argparse.ArgumentTypeError(f"{text!r} names no scan; give scan ids like case_001,case_002")
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


def split_names_arg(text: str) -> tuple[str, ...]:
    """``sample-data --splits train,valid,test``: each name becomes a folder under DIR, so it
    must be one plain folder name (``../x`` would write outside DIR); an empty name or one
    given twice is a typo, not a request for fewer splits."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; give names like train,valid,test")
    for name in names:
        if name in (".", "..") or "/" in name or "\\" in name:
            raise argparse.ArgumentTypeError(f"{name!r} is not a folder name (no '/', '\\', '.' or '..')")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} names {twice[0]!r} twice")
    return names


def store_arg(text: str) -> str:
    """A STORE that only a store can be (scans, verify, preprocess, serve): a server's URL would
    otherwise be taken for a local path (``http:/host:8000``, one slash lost) and not found."""
    if text.lower().startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text} is a server's URL; give a store folder or s3://BUCKET/PREFIX, "
            f"or list the server's scans with GET {text.rstrip('/')}/scans"
        )
    return text


def attach_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--chunks -1,64,8`` as ``--chunks=-1,64,8``: argparse takes a value that starts with a
    dash and is not a plain negative number for an option and answers "expected one argument",
    hiding the flag's own message. Only values that look numeric (a dash, then a digit or a
    dot) after a flag that takes one value are joined, and nothing after ``--``."""
    parsers = [parser]
    if parser._subparsers is not None:  # argparse has no public list of a parser's options
        for group in parser._subparsers._group_actions:
            parsers += list(getattr(group, "choices", {}).values())
    takes_value = {
        name
        for each in parsers
        for action in each._actions
        if action.nargs is None  # one value; flags (store_true, help) have nargs 0
        for name in action.option_strings
    }
    every = {name for each in parsers for action in each._actions for name in action.option_strings}

    def takes_a_value(flag: str) -> bool:
        """A flag taking one value, written whole or abbreviated as argparse allows (``--chunk``)."""
        if flag in takes_value:
            return True
        if not flag.startswith("--") or flag in every:
            return False
        meant = {name for name in every if name.startswith(flag)}
        return bool(meant) and meant <= takes_value

    out = list(argv)
    i = 0
    while i < len(out) - 1 and out[i] != "--":
        value = out[i + 1]
        if (
            takes_a_value(out[i])
            and len(value) > 1
            and value[0] == "-"
            and (value[1].isdigit() or value[1] == ".")
        ):
            out[i : i + 2] = [f"{out[i]}={value}"]
        i += 1
    return out


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" text, with the closest option of ``parser`` for the
    first unknown flag (a typo like ``--wokers``)."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
    if flags and flags[0] in ("--debug", "--version"):  # the top-level parser's own flags
        return message + f"; {flags[0]} goes before the command (scancache {flags[0]} COMMAND ...)"
    if flags:
        known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(flags[0], known, n=1)
        if close:
            message += f"; did you mean {close[0]}?"
    return message


def check_listen_host(host: str, label: str) -> None:
    """One line naming the setting (``label``: ``--host X`` or ``SCANCACHE_HOST=X``) when ``host``
    is no address this machine can listen on; uvicorn would log six lines and exit 3. Port 0:
    only the address is tried here, a taken port is the server's own check (``check_port_free``)."""
    import errno
    import socket

    # the family uvicorn binds (IPv6 for an address with a colon), as check_port_free does
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    hint = "listen on e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))  # getaddrinfo, then the bind
    except socket.gaierror:
        try:  # a name of IPv6 addresses only: uvicorn's own start decides
            socket.getaddrinfo(host, None)
            return
        except (socket.gaierror, UnicodeError):
            raise ValueError(f"{label}: not an address, nor a name that resolves; {hint}") from None
    except OSError as err:
        if err.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"{label}: not an address of this machine; {hint}") from None
        # another cause (no IPv6 here, permissions): uvicorn's own start says it, as before


def check_parsed(
    parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str], argv: Sequence[str]
) -> None:
    """Usage errors argparse leaves to the top-level parser, said by the command's own: an
    unknown flag after the command names the command, whose --help lists the right ones.
    ``parser.commands`` is its subparsers action (``service.cli.OneLineParser``)."""
    sub = parser.commands.choices[args.command]  # type: ignore[attr-defined]
    if extras:
        # the top-level parser takes no values, so the first word that is the command is it
        before = list(argv)[: list(argv).index(args.command)]
        if any(word in extras for word in before):
            parser.error(unrecognized_message(parser, [w for w in before if w in extras]))
        sub.error(unrecognized_message(sub, extras))


def layout_from_flags(
    layout: str | None, chunks: str | None, shard_depth: int | None, codec: str | None
) -> ChunkLayout:
    """``preprocess --layout/--chunks/--shard-depth/--codec`` as a ``ChunkLayout``; a ValueError
    names the flag. A shard holds whole inner chunks: a depth given that is no multiple of
    theirs would be rounded up when written, so it is refused (the default, 32, is rounded as
    it always was: stores written with it keep their fingerprints)."""
    from service.layouts import chosen_chunks
    from store.format import ChunkLayout

    built = ChunkLayout.parse(chosen_chunks(layout, chunks), shard_depth=shard_depth, codec=codec)
    depth = built.chunks[2]
    if shard_depth is not None and shard_depth % depth:
        lower = max(depth, shard_depth // depth * depth)
        raise ValueError(
            f"--shard-depth: {shard_depth} is not a multiple of the chunk depth {depth}; "
            f"give e.g. {lower} or {lower + depth}"
        )
    return built

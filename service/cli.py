"""The ``scancache`` command line: preprocess, verify, scans, sample-data, serve, profile, export.

Errors reach the user as one line (``scancache: error: ...``) and exit code 1 (2 for usage
errors, as argparse does); ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from service.cli_args import (
    RefuseTokenFlag,
    attach_dash_values,
    check_listen_host,
    check_parsed,
    class_names_arg,
    host_port_arg,
    layout_from_flags,
    non_negative_seconds,
    parse_bytes,
    port_number,
    positive_int,
    positive_seconds_arg,
    read_token_file,
    scan_id_list,
    spacing_arg,
    store_arg,
)
from service.export_cli import add_export_parser
from service.profile_cli import add_profile_parser
from service.sample_data_cli import add_sample_data_parser
from service.scans_cli import add_scans_parser
from service.version import package_version
from store.errors import one_line
from store.interrupts import interrupt_behind


# -- subcommands ------------------------------------------------------------------------------
def cmd_preprocess(args: argparse.Namespace) -> int:
    missing = [name for name in ("dask", "distributed") if importlib.util.find_spec(name) is None]
    if missing:  # checked before any work: the job needs them only once it converts
        raise RuntimeError(f"the preprocessing job needs {' and '.join(missing)}; install scancache[service]")
    from service.preprocess import run_preprocess

    # a ValueError names the flag; main() prints it as every error (before anything runs)
    flags = (args.layout, args.chunks, args.shard_depth, args.codec)
    # none given: each stored scan keeps its layout, a new one gets the default (run_preprocess)
    layout = None if flags == (None,) * 4 else layout_from_flags(*flags)
    summary = run_preprocess(
        args.source,
        args.store,
        scheduler=args.scheduler,
        workers=args.workers,
        dashboard=args.dashboard,
        layout=layout,
        progress=not args.quiet,
        wait=args.wait,
        prune=args.prune,
        grace_s=args.grace,
        class_names=args.class_names,
        spacing=args.spacing,
        rebuild=args.rebuild,
    )
    print(summary.report(), flush=True)
    return summary.exit_code


def cmd_verify(args: argparse.Namespace) -> int:
    from service.verify import MISMATCH, TORN, verify_store

    def note(text: str) -> None:
        print(f"verify: warning: {text}", file=sys.stderr, flush=True)

    report = verify_store(args.source, args.store, on_line=lambda line: print(line, flush=True), on_note=note)
    print(report.summary())
    # SOURCE one split folder: its differences in split are the warning's, not the store's
    repairable = (TORN,) if report.one_split else (MISMATCH, TORN)
    damaged = [line.scan_id for line in report.lines if line.status in repairable]
    if report.one_split and any(line.status == MISMATCH for line in report.lines):
        print("verify: see the warning above before converting anything again")
    if damaged:
        # a re-run skips those whose damage kept every file's size (their sources are unchanged)
        ids = ",".join(damaged)
        print(
            f"verify: to convert them again: scancache preprocess {args.source} {args.store} --rebuild {ids}"
        )
    return 0 if report.exact else 1


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from service.server.runner import serve
        from service.server.settings import ENV_HOST, ENV_TOKEN, Settings
    except ImportError as err:
        raise RuntimeError(f"the server is not available ({err}); install scancache[service]") from None
    # the token goes from the file to the server (and through the environment to uvicorn's
    # worker processes, never on a command line); Settings.resolve merges flags, SCANCACHE_*
    # variables and defaults, once
    token = read_token_file(args.token_file) if args.token_file else None
    flags = {
        "store": args.store, "host": args.host or None, "port": args.port, "token": token,
        "cache_bytes": args.cache_bytes, "max_bytes": args.max_bytes,
        "max_inflight_bytes": args.max_inflight_bytes, "header_timeout": args.header_timeout,
        "send_timeout": args.send_timeout, "predictions": args.predictions,
    }  # fmt: skip
    settings = Settings.resolve(flags)
    if settings.token is None and os.environ.get(ENV_TOKEN) is not None:  # e.g. $(cat a-missing-file)
        print(
            f"scancache serve: warning: {ENV_TOKEN} is set but empty: serving without authentication",
            file=sys.stderr,
        )
    host = settings.host
    check_listen_host(host, f"--host {host}" if args.host else f"{ENV_HOST}={host}")
    serve(settings, workers=args.workers, access_log=args.access_log)  # blocks until stopped (Ctrl-C)
    return 0


# -- parser -----------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, as every other error of the CLI (argparse prints the whole
    usage first); ``--help`` still prints it. Subcommand parsers are of this class too."""

    commands: Any = None  # the subparsers action: check_parsed reports through a command's parser

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="scancache",
        description="Preprocess MedSegPy slice-wise HDF5 scans or an nnU-Net NIfTI dataset into a "
        "chunked Zarr v3 store (a folder or s3://BUCKET/PREFIX), verify it, list it, and serve it over HTTP.",
        epilog="Run 'scancache COMMAND --help' for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"scancache {package_version()}")
    sub = parser.commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "preprocess",
        help="convert a source folder into a store (Dask job)",
        description="Convert every scan under SOURCE (2D .im/.seg slices or 3D .h5 volumes; "
        "first-level folders are splits; or an nnU-Net raw dataset: a folder with dataset.json, "
        "imagesTr/, labelsTr/, NIfTI files) into the Zarr v3 store STORE. Scans already in the "
        "store with unchanged sources are skipped; a killed run resumes when re-run. One job "
        "per store at a time (STORE/.lock). A re-converted scan is published as a new version; "
        "readers switch to it atomically. Exits 1 if any scan failed.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="folder of MedSegPy input files, or an nnU-Net dataset folder"
    )
    p.add_argument("store", metavar="STORE", type=store_arg, help="store folder (created if missing)")
    p.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="run on an existing Dask cluster (tcp://host:port) instead of locally",
    )
    p.add_argument(
        "--workers", type=positive_int, metavar="N", help="local worker processes (default: CPU count)"
    )
    p.add_argument(
        "--dashboard",
        type=host_port_arg,
        metavar="HOST:PORT",
        help="serve the local cluster's Dask dashboard there, e.g. 127.0.0.1:8787 (needs bokeh; "
        "default: none)",
    )
    p.add_argument(
        "--chunks", default=None, metavar="Y,X,Z", help="inner chunk shape (default: from --layout)"
    )
    p.add_argument(
        "--layout",
        choices=("patches", "balanced", "slices"),
        default=None,
        help="chunk shape for the access pattern: patches = 64,64,8 (default), balanced = 64,64,2, "
        "slices = whole slices (docs/tuning.md)",
    )
    p.add_argument(
        "--shard-depth", type=positive_int, default=None, metavar="Z", help="slices per shard (default: 32)"
    )
    p.add_argument(
        "--codec",
        choices=("blosc-lz4", "zstd", "none"),
        default=None,
        help="chunk compression (default: blosc-lz4)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another job is writing STORE, wait for it to finish (default: fail at once)",
    )
    p.add_argument(
        "--rebuild",
        type=scan_id_list,
        default=(),
        metavar="ID[,ID...]",
        help="convert these scans again even if the store holds them from unchanged sources "
        "(verify's MISMATCH: a stored copy damaged after it was written)",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove scans whose source files are gone (default: list them in the summary)",
    )
    p.add_argument(
        "--grace",
        type=non_negative_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="keep a replaced or removed scan version this long for readers still using it, "
        "then delete it at the end of a later job (default: %(default)s)",
    )
    p.add_argument(
        "--class-names",
        type=class_names_arg,
        default=(),
        metavar="A,B,C",
        help="MedSegPy sources: one name per mask class, in class order (default: class 0, class 1, ...)",
    )
    p.add_argument(
        "--spacing",
        type=spacing_arg,
        default=None,
        metavar="SY,SX,SZ",
        help="MedSegPy sources: voxel size in mm along the stored axes, for scans whose files give none "
        "(default: 1,1,1)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output, only the summary")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser(
        "verify",
        help="compare a store with its source voxel for voxel",
        description="Re-read every source file and compare it with STORE voxel for voxel (read "
        "with zarr-python). Prints OK/MISMATCH/MISSING/TORN/FAILED/EXTRA per scan; exits 0 only if every "
        "source scan is in the store and exact and the store holds no other scan.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("store", metavar="STORE", type=store_arg)
    p.set_defaults(func=cmd_verify)

    add_scans_parser(sub)

    add_sample_data_parser(sub)

    p = sub.add_parser(
        "serve",
        help="serve a store over HTTP",
        description="Serve STORE over HTTP: REST regions and read-only Zarr v3.",
    )
    p.add_argument(
        "store", metavar="STORE", nargs="?", default=None, type=store_arg,
        help="store folder or s3://BUCKET/PREFIX (default: SCANCACHE_STORE, as for the server's other settings)",
    )  # fmt: skip
    p.add_argument(
        "--host", default=None, help="address to listen on (default: $SCANCACHE_HOST, else 127.0.0.1)"
    )
    p.add_argument("--port", type=port_number, default=None, help="default: $SCANCACHE_PORT, else 8000")
    p.add_argument("--workers", type=positive_int, default=1, help="uvicorn worker processes (default: 1)")
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per request (off by default: a training run makes hundreds a second)",
    )
    p.add_argument(
        "--cache-bytes",
        type=parse_bytes,
        default=None,
        metavar="B",
        help="decoded-chunk cache, e.g. 512M (default: $SCANCACHE_CACHE_BYTES, else 512M)",
    )
    p.add_argument(
        "--max-bytes",
        type=parse_bytes,
        default=None,
        metavar="B",
        help="largest response, e.g. 256M (default: $SCANCACHE_MAX_BYTES, else 1G)",
    )
    p.add_argument(
        "--max-inflight-bytes",
        type=parse_bytes,
        default=None,
        metavar="B",
        help="bytes all requests may hold at once; past it they wait, then 503 "
        "(default: $SCANCACHE_MAX_INFLIGHT_BYTES, else 1G)",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_seconds_arg,
        default=None,
        metavar="S",
        help="seconds a connection has to send its request headers, and then its body "
        "(default: $SCANCACHE_HEADER_TIMEOUT, else 10)",
    )
    p.add_argument(
        "--send-timeout",
        type=positive_seconds_arg,
        default=None,
        metavar="S",
        help="seconds a client may stop reading its response before it is disconnected "
        "(default: $SCANCACHE_SEND_TIMEOUT, else 10)",
    )
    p.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="file holding the bearer token clients must send (or set $SCANCACHE_TOKEN)",
    )
    p.add_argument("--token", action=RefuseTokenFlag, help=argparse.SUPPRESS)
    p.add_argument(
        "--predictions",
        default=None,
        metavar="PRED",
        help="a predictions store (loaders.write_predictions) to serve beside the scans",
    )
    p.set_defaults(func=cmd_serve)
    add_profile_parser(sub)
    add_export_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a batch scheduler, ``kill``): unwinds as Ctrl-C does, so a job
    releases its lock and removes its staging on the way out."""


_terminating = False


def _terminate(signum: int, frame: object) -> None:
    """Raise ``Terminated`` once: a second SIGTERM (``timeout`` signals the process and then its
    process group) would interrupt the unwinding of the first, a traceback instead of one line
    and a lock or staging left behind; SIGKILL still stops a process stuck on its way out."""
    global _terminating
    if _terminating:
        return
    _terminating = True
    raise Terminated()


def _stopped(interrupt: KeyboardInterrupt) -> int:
    if isinstance(interrupt, Terminated):
        print("scancache: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process stopped by it
    print("scancache: interrupted", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = attach_dash_values(parser, sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    check_parsed(parser, args, extras, argv)
    # the server leaves SIGTERM to uvicorn (a graceful shutdown); a job or a command stops cleanly
    previous = None
    global _terminating
    _terminating = False
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader gone away is seen here, not in the interpreter's exit
        return code
    except KeyboardInterrupt as err:
        return _stopped(err)
    except SystemExit:
        raise
    except BrokenPipeError:
        # the reader of our output went away (`scancache scans STORE | head`): as any Unix
        # tool, stop quietly; stdout is pointed at devnull so the interpreter's final flush
        # does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except Exception as err:
        behind = interrupt_behind(err)  # a C extension stopped while it loaded: ImportError
        if behind is not None:
            return _stopped(behind)
        if args.debug:
            traceback.print_exc()
        message = one_line(err)
        print(f"scancache {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # main() called from Python (a test, a script) leaves it as it was
            # once terminated, a second SIGTERM (``timeout`` signals the process group too) may
            # still come while the process exits (past Python's handlers): ignored, not the default
            # that would kill the process with -15 after its one line
            signal.signal(signal.SIGTERM, signal.SIG_IGN if _terminating else previous)


if __name__ == "__main__":
    sys.exit(main())

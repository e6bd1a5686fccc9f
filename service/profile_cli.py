"""``scancache profile SOURCE --tag TAG``: run a training loader for a while and say where
the time goes and which setting to change (``service.profile``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.cli_args import (
    PROFILE_Y_FORMATS,
    categories_arg,
    non_negative_int,
    positive_int,
    positive_seconds_arg,
)
from store.units import InvalidValue, parse_int_tuple

IMG_SIZE_FORMS = "H,W,1 (2D), H,W,k (2.5D) or h,w,d[,C] (patches)"


def img_size_arg(text: str) -> tuple[int, ...]:
    """``--img-size``: three or four positive integers, parsed by the one parser of integer
    tuples (``64,64,1`` or ``64x64x1``); what each form means for a loader (2D, 2.5D, patches)
    is the loader's own check (``loaders.config``)."""
    try:
        return parse_int_tuple(text, "--img-size", lengths=(3, 4), usage=IMG_SIZE_FORMS)
    except InvalidValue as err:
        raise argparse.ArgumentTypeError(err.why) from None


def cmd_profile(args: argparse.Namespace) -> int:
    from service.profile import batch_size_note, explain, run_profile

    result = run_profile(
        args.source,
        args.tag,
        batch_size=args.batch_size,
        categories=args.categories,  # parsed by its argparse type (cli_args.categories_arg)
        img_size=args.img_size,
        seconds=args.seconds,
        split=args.split,
        y_format=args.y_format,
        workers=args.workers,
    )
    note = batch_size_note(result, args.batch_size)
    if note:  # on stderr: --json's output stays one JSON document
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(explain(result)))
    return 0


def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser(
        "profile",
        help="run a training loader for a while and say where the time goes",
        description="Run the TAG loader over SOURCE (a store folder, s3:// store or server URL) for a bounded "
        "time and print batches/s, read amplification and where the time goes (loader.stats()).",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="store folder, s3://BUCKET/PREFIX, or http(s):// server URL"
    )
    p.add_argument(
        "--tag", required=True, help="loader: DefaultDataLoader, S25dDataLoader, PatchDataLoader, ..."
    )
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="default: %(default)s")
    p.add_argument(
        "--categories",
        type=categories_arg,
        metavar="CATS",
        help="e.g. [0,[1,2],3], 0,1+2,3 or liver,kidney+2 (default: every class)",
    )
    p.add_argument(
        "--img-size",
        type=img_size_arg,
        metavar="H,W,C",
        help="the loader's IMG_SIZE: H,W,1 (2D), H,W,k (2.5D) or h,w,d[,C] (patches), e.g. 288,288,1",
    )
    p.add_argument(
        "--seconds",
        type=positive_seconds_arg,
        default=10.0,
        metavar="S",
        help="how long to run (default: 10)",
    )
    p.add_argument("--split", default=None, help="only scans of this split (default: all)")
    p.add_argument(
        "--y-format",
        choices=PROFILE_Y_FORMATS,
        default="one_hot",
        help="the loader's Y_FORMAT (default: %(default)s; class_index: one uint8 label a voxel)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="read through K torch DataLoader worker processes (persistent), as a torch training "
        "script does, and report each (default: 0, in this process)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_profile)

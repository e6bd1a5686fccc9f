"""``scancache sample-data DIR``: synthetic knee-like phantoms in MedSegPy's formats."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from service.cli_args import non_negative_int, positive_int, shape3, split_names_arg

SAMPLE_DATA_STAMP = ".sample-data.json"  # what `scancache sample-data` wrote into its folder


def cmd_sample_data(args: argparse.Namespace) -> int:
    from service.sample_data import write_sample_data

    splits = None if args.no_splits else args.splits
    params = {
        "subjects": args.subjects, "visits": args.visits, "shape": list(args.shape), "classes": args.classes,
        "format": args.format, "seed": args.seed, "splits": splits, "dtype": args.dtype,
    }  # fmt: skip
    folder = Path(args.dir)
    # a file where DIR or a folder above it must go: mkdir would say "[Errno 20] Not a directory"
    blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        where = " is" if blocked == folder else f": {str(blocked)!r} is"
        raise ValueError(f"DIR {args.dir!r}{where} a file, not a folder")
    stamp = folder / SAMPLE_DATA_STAMP
    if folder.is_dir() and any(folder.iterdir()):
        # the same command again (a compose file, a Makefile) finds its data and is done; any
        # other contents would mix shapes and formats under one scan id
        if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(params)):
            print(f"{args.dir} already holds this sample data: nothing written")
            return 0
        raise ValueError(f"{args.dir} is not empty: give a new or empty folder")
    made = not folder.exists()
    try:
        data = write_sample_data(
            args.dir,
            subjects=args.subjects,
            visits=args.visits,
            shape=args.shape,
            num_classes=args.classes,
            fmt=args.format,
            seed=args.seed,
            splits=splits,
            dtype=args.dtype,
        )
        stamp.write_text(json.dumps(params))
    except BaseException:  # DIR was new or empty: leave it so, and the same command can run again
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            if made:
                folder.rmdir()
        raise
    kinds = ", ".join(f"{data.count(k)} {k.upper()}" for k in ("2d", "3d") if data.count(k))
    noun = "scan" if len(data.scans) == 1 else "scans"  # "1 2D scan", "1 2D, 1 3D scans"
    print(f"wrote {kinds} {noun} of {'x'.join(map(str, args.shape))} to {data.root}")
    print(f"convert them with: scancache preprocess {data.root} STORE")
    return 0


def add_sample_data_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sample-data",
        help="write synthetic knee-like phantoms",
        description="Write synthetic knee-like phantom scans (concentric tissue shells, noise, "
        "several subjects and visits, split folders) in MedSegPy's 2D slice format and/or 3D.",
    )
    p.add_argument("dir", metavar="DIR", help="output folder")
    p.add_argument("--subjects", type=positive_int, default=4, help="default: %(default)s")
    p.add_argument("--visits", type=positive_int, default=2, help="default: %(default)s")
    p.add_argument("--shape", type=shape3, default=(96, 96, 24), metavar="H,W,D", help="default: 96,96,24")
    p.add_argument("--classes", type=positive_int, default=4, help="default: %(default)s")
    p.add_argument(
        "--format",
        choices=("2d", "3d", "both"),
        default="2d",
        help="2d: .im/.seg slice files; 3d: one .h5 volume a scan; both: odd subjects as slices, "
        "even ones as volumes, in one source (default: %(default)s)",
    )
    p.add_argument(
        "--dtype", choices=("float32", "int16", "uint16"), default="float32", help="default: %(default)s"
    )
    splits_help = "split folders (default: %(default)s)"
    p.add_argument("--splits", type=split_names_arg, default="train,valid,test", help=splits_help)
    p.add_argument("--no-splits", action="store_true", help="write all scans directly into DIR")
    p.add_argument("--seed", type=non_negative_int, default=0, help="default: %(default)s")
    p.set_defaults(func=cmd_sample_data)

"""``scancache export PREDICTIONS OUT_DIR``: stored predictions as NIfTI files (loaders.export)."""

from __future__ import annotations

import argparse
from typing import Any

from service.cli_args import scan_id_list
from store.units import count_of


def scan_ids(items: list[str]) -> list[str]:
    """``--scans a b,c``: the ids, each checked by the one parser of scan id lists
    (``cli_args.scan_id_list``, as ``preprocess --rebuild``); a ValueError names ``--scans``."""
    if not any(part.strip() for item in items for part in item.split(",")):
        # `--scans ,` must not mean every scan
        raise ValueError(f"--scans: {' '.join(items)!r} names no scan; give scan ids like case_001,case_002")
    try:
        return [scan_id for item in items for scan_id in scan_id_list(item)]
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--scans: {err}") from None


def cmd_export(args: argparse.Namespace) -> int:
    from loaders.export import export_nifti  # nibabel only when exporting

    scans = None if args.scans is None else scan_ids(args.scans)
    done = export_nifti(
        args.predictions,
        args.out_dir,
        scans=scans,
        probabilities=args.probabilities,
        overwrite=args.overwrite,
        scan_store=args.store,
        progress=not args.quiet,
        skip_existing=args.skip_existing,
    )
    what = "label maps and probabilities" if args.probabilities else "label maps"
    print(
        f"exported {count_of(len(done), 'scan')} ({what}, each with a .json naming its labels) to {args.out_dir}"
    )
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export stored predictions as NIfTI files in the source's geometry",
        description="Write each scan's predicted label map (and probabilities with --probabilities) "
        "from PREDICTIONS (written by loaders.write_predictions) as OUT_DIR/<scan_id>.nii.gz, in the "
        "source image's voxel order with its affine, and OUT_DIR/<scan_id>.json naming the label values.",
    )
    p.add_argument(
        "predictions", metavar="PREDICTIONS", help="predictions store (folder or s3://BUCKET/PREFIX)"
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the .nii.gz and .json files")
    p.add_argument(
        "--scans", nargs="+", metavar="SCAN", help="only these scans (default: every scan with a prediction)"
    )
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also write <scan_id>_probabilities.nii.gz (float32 x,y,z,c)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files already in OUT_DIR")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="export only the scans not in OUT_DIR yet (to finish a run that stopped, e.g. on a full disk)",
    )
    p.add_argument(
        "--store",
        metavar="STORE",
        help="the scan store (or server URL) the predictions were made on; needed only for predictions "
        "that record no geometry (written by an older scancache)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_export)

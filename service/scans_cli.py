"""``scancache scans STORE``: the published scans of a store, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from service.cli_args import non_negative_int, store_arg
from store.ome_views import is_view_chunk_file
from store.scan_filters import has_class_values, matches
from store.storage import parse_location
from store.units import count_of


def _scan_rows(
    location: str | Path, filters: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the readable published scans that pass ``filters`` (as ``DatasetCatalog``
    and ``GET /scans`` take them), and the ids of those whose ``zarr.json`` is missing,
    unreadable or not a scan's (damaged: said, not left out in silence)."""
    from store.format import ScanMeta
    from store.inventory import check_store, published_scan_ids, read_scan_attrs

    store = check_store(location)
    # an OME view's chunks are the arrays' own files under a second name: a hard link on disk
    # (counted once), an object of their own on S3 (copied there, and paid for)
    copies_count = isinstance(location, str)
    rows, damaged = [], []
    for entry in published_scan_ids(store):
        attrs = read_scan_attrs(store, entry)
        if attrs is None or "scan_id" not in attrs:
            damaged.append(entry)
            continue
        try:  # attributes a reader cannot use: said as damaged, filtered or not
            meta = ScanMeta.from_attrs(attrs)
            if filters and not matches(meta, filters):
                continue
        except (KeyError, TypeError, ValueError):
            damaged.append(entry)
            continue
        rows.append(
            {
                "scan_id": attrs["scan_id"],
                "split": attrs.get("split"),
                "subject_id": attrs.get("subject_id"),
                "time_point": attrs.get("time_point"),
                "augmentation": attrs.get("augmentation"),
                "shape": attrs.get("shape"),
                "dtype": attrs.get("dtype"),
                "num_classes": attrs.get("num_classes", 0),
                "bytes": sum(
                    n
                    for f, n in attrs.get("manifest", {}).items()
                    if copies_count or not is_view_chunk_file(f)
                ),
            }
        )
    return rows, damaged


def cmd_scans(args: argparse.Namespace) -> int:
    from store.units import format_bytes

    filters = {
        "split": args.split,
        "subject_id": args.subject_id,
        "time_point": args.time_point,
        "augmentation": args.augmentation,
        "has_class": args.has_class,
    }
    filters = {k: v for k, v in filters.items() if v is not None}
    if filters.get("has_class") is not None:
        has_class_values(filters["has_class"])  # one line for a bad value, before any reading
    rows, damaged = _scan_rows(parse_location(args.store), filters)
    for scan_id in damaged:
        print(
            f"scancache scans: warning: scan {scan_id!r} is published but its zarr.json is missing, "
            "unreadable or not a scan's (left out; scancache verify SOURCE STORE checks it)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"scans": rows}, indent=2, allow_nan=False))
        return 0
    table = [("SCAN", "SPLIT", "SUBJECT", "VISIT", "AUG", "SHAPE", "DTYPE", "CLASSES", "SIZE")]
    for row in rows:
        shape = "x".join(str(n) for n in row["shape"] or [])
        table.append(
            (
                row["scan_id"],
                row["split"] or "-",
                *(
                    "-" if row[k] is None else str(row[k])
                    for k in ("subject_id", "time_point", "augmentation")
                ),
                shape,
                str(row["dtype"]),
                str(row["num_classes"]),
                format_bytes(row["bytes"]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    print(f"{count_of(len(rows), 'scan')}, {format_bytes(sum(r['bytes'] for r in rows))}")
    for why in _unlinked_folders(parse_location(args.store)):
        print(f"scancache scans: warning: {why}", file=sys.stderr)
    return 0


def _unlinked_folders(location: Path | str) -> list[str]:
    """Scan-like folders of a local store that are no published scans (``publish.unlinked_folder``)."""
    if not isinstance(location, Path):
        return []
    from store.publish import unlinked_folder

    try:
        names = sorted(n for n in os.listdir(location) if not n.startswith("."))
    except OSError:
        return []
    return [why for n in names if (why := unlinked_folder(location, n)) is not None]


def add_scans_parser(sub: Any) -> None:
    p = sub.add_parser("scans", help="list the scans of a store", description="List the scans of STORE.")
    p.add_argument("store", metavar="STORE", type=store_arg)
    p.add_argument("--json", action="store_true", help='print {"scans": [...]} as JSON')
    # the filters of DatasetCatalog.register and GET /scans; repeat one for any of several values
    p.add_argument("--split", action="append", metavar="NAME", help="only scans of this split")
    for flag, what in (
        ("--subject-id", "subject"),
        ("--time-point", "visit (V01 -> 1)"),
        ("--augmentation", "augmentation (Aug02 -> 2)"),
    ):
        p.add_argument(
            flag, action="append", type=non_negative_int, metavar="N", help=f"only scans of this {what}"
        )
    p.add_argument(
        "--has-class",
        action="append",
        metavar="CLASS",
        help="only scans where this class (index or name) has voxels",
    )
    p.set_defaults(func=cmd_scans)

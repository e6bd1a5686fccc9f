"""Run the benchmarks and write the report: ``python -m benchmarks.run [--quick] [--out FILE]``.

Full mode uses realistic scans (4 subjects of 384x384x160 float32, 6 classes) and takes several
minutes; ``--quick`` uses two small scans and runs in under a minute (a CI smoke run). Data
goes to ``bench-output/`` and is reused by later runs of the same size. Only loopback is used.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

from benchmarks import (
    conversion,
    machine,
    object_storage,
    realscale,
    server_load,
    stitching,
    train2d,
    writepath,
)
from benchmarks.data import CATEGORIES, prepare, sizes
from benchmarks.report import Report, Row
from store.errors import one_line
from store.format import ChunkLayout

SECTIONS = (
    "realscale", "conversion", "writepath", "loaders", "server", "stitching", "s3", "trainfeed",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small data, a smoke run (< 1 minute)")
    p.add_argument("--out", default=None, help="report file (default: BENCHMARKS.md; with --quick "
                   "bench-output/BENCHMARKS.quick.md so a smoke run never replaces the real report)")  # fmt: skip
    p.add_argument("--work", default="bench-output", help="data folder (default: %(default)s)")
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument(
        "--chunks", default=None, metavar="Y,X,Z", help="store inner chunk shape (default: the store default)"
    )
    p.add_argument(
        "--server-workers", type=int, default=1, help="uvicorn workers of the servers (default: 1)"
    )
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown sections {', '.join(sorted(unknown))}")
    return args


def trainfeed_section(report: Report, work: Path, quick: bool) -> list[Row]:
    """The training-feed benchmark in a fresh process (its workers are forked, which tensorstore
    forbids once this process has read through it), with the runs recorded on the largest machine."""
    from benchmarks.trainfeed_report import render

    out = work / "trainfeed.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.trainfeed", "--work", str(work / "trainfeed"), "--out", str(out)]
    subprocess.run(cmd + (["--quick"] if quick else []), check=True, stdout=subprocess.DEVNULL)
    recorded = sorted(Path(__file__).resolve().parent.parent.glob("docs/device-runs/trainfeed-*.jsonl"))
    text = ["## Training feed (benchmarks/trainfeed.py)", "", "### This machine", "", render([str(out)])]
    if recorded:
        text += [
            "",
            "### The largest machine it ran on (docs/device-runs/)",
            "",
            render([str(p) for p in recorded]),
        ]
    report.blocks.append("\n".join(text))
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    layout = ChunkLayout.parse(args.chunks) if args.chunks else None
    work = Path(args.work) / ("quick" if args.quick else "full")
    shape, subjects = sizes(args.quick)
    print(f"benchmarks: preparing data ({subjects} scans of {shape}) in {work}", file=sys.stderr, flush=True)
    data = prepare(work, args.quick, layout)
    # Freshly written data is still being flushed to disk for a while; measuring during that
    # writeback halved the first section's figures in one run (2026-12-03), so wait for it.
    os.sync()
    used = layout or ChunkLayout()
    report = Report(
        machine.describe(),
        {
            "Mode": "quick (smoke run, small scans: figures are not meaningful)" if args.quick else "full",
            "Data": f"{len(data.scan_ids)} scans of {shape[0]}x{shape[1]}x{shape[2]} float32, 6 classes; "
            f"categories {list(CATEGORIES)} + background",
            "Store layout": f"inner chunks {used.chunks}, shard depth {used.shard_depth}, codec {used.codec}",
            "Server": f"uvicorn, {args.server_workers} worker(s), on 127.0.0.1 with the clients on the same cores",
        },
    )
    wanted = args.only.split(",")
    # Real scale first: after the conversion and write-path sections (GBs written and freed by
    # other processes) the same code's real-scale figures came out 1.3-2x lower, next epochs
    # included, with 21 GB free and nothing dirty (2026-12-03; docs/tuning.md section 12).
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("realscale", lambda: realscale.run(data, args.quick, args.server_workers)),
        ("conversion", lambda: conversion.run(data, work, layout)),
        ("writepath", lambda: writepath.report_rows(args.quick)),
        ("loaders", lambda: train2d.run(data, args.quick, args.server_workers)),
        ("server", lambda: server_load.run(data, work, args.quick, args.server_workers)),
        ("stitching", lambda: stitching.run(data)),
        ("s3", lambda: object_storage.run(data, work, args.quick)),
        ("trainfeed", lambda: trainfeed_section(report, work, args.quick)),
    ]
    failed = False
    for name, step in steps:
        if name not in wanted:
            continue
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        os.sync()  # the previous section's writes are flushed before this one measures
        t0 = time.perf_counter()
        try:
            report.add(step())
        except Exception as exc:  # one broken section must not hide the others' figures
            failed = True
            traceback.print_exc()
            report.notes.append(f"section {name!r} failed: {type(exc).__name__}: {one_line(exc)}")
        print(f"benchmarks: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report.notes.append(f"total benchmark time {time.perf_counter() - started:.0f} s")
    report.settings["Load average (1 min) at start / end"] = (
        f"{load_at_start:.2f} / {os.getloadavg()[0]:.2f} "
        + (
            "(other work competed for the cores: figures are noisy)"
            if load_at_start > 1.0
            else "(an otherwise idle machine)"
        )
    )
    out = Path(args.out or (Path(args.work) / "BENCHMARKS.quick.md" if args.quick else "BENCHMARKS.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.markdown())
    print(report.markdown())
    print(f"benchmarks: report written to {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Conversion: the preprocessing job's wall time against the floor of reading every file once.

The floor is one h5py pass over every source file (what any conversion must at least do). The
job runs on an already started Dask cluster of 1 and of 2 workers, so cluster start-up (a
one-off of a few seconds) is reported apart instead of hiding in the per-scan figures.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import h5py

from benchmarks.data import BenchData
from benchmarks.report import Row
from client.layout import ChunkLayout

SECTION = "Conversion (preprocess)"


def read_floor(source: Path) -> float:
    """Seconds to read every ``.im`` / ``.seg`` file once with h5py, single process."""
    files = sorted(p for p in source.rglob("*") if p.suffix in (".im", ".seg"))
    t0 = time.perf_counter()
    for path in files:
        with h5py.File(path, "r") as f:
            f["data"][()]
    return time.perf_counter() - t0


def job_seconds(source: Path, store: Path, workers: int, layout: ChunkLayout | None) -> tuple[float, float]:
    """(cluster start seconds, job seconds) for a fresh store on a LocalCluster of ``workers``."""
    from distributed import Client, LocalCluster

    from service.preprocess import run_preprocess

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
            silence_logs=logging.ERROR, host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.wait_for_workers(workers)
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        summary = run_preprocess(
            source, store, scheduler=cluster.scheduler_address, layout=layout, progress=False
        )
        seconds = time.perf_counter() - t1
    if summary.failed:
        raise RuntimeError(f"preprocess failed for {summary.failed} scans: {summary.failures()[:3]}")
    shutil.rmtree(store, ignore_errors=True)
    return started, seconds


def run(data: BenchData, work: Path, layout: ChunkLayout | None) -> list[Row]:
    read_floor(data.source_2d)  # the first pass fills the OS page cache; measure the second
    floor = read_floor(data.source_2d)
    start1, one = job_seconds(data.source_2d, work / "conv-store", 1, layout)
    start2, two = job_seconds(data.source_2d, work / "conv-store", 2, layout)
    n = len(data.scan_ids)
    return [
        Row(SECTION, "read floor: every source file once (h5py)", floor, "s", note=f"{n} scans"),
        Row(SECTION, "job, 1 worker", one, "s", floor, "read floor", higher_is_better=False,
            note=f"cluster start {start1:.1f} s not included"),
        Row(SECTION, "job, 2 workers", two, "s", floor, "read floor", "<= 1.5x the floor", 1 / 1.5,
            higher_is_better=False, note=f"cluster start {start2:.1f} s not included; ratio = floor / job"),
        Row(SECTION, "2 workers over 1 worker", one / two, "x speed-up", note="2 cores shared with the driver"),
    ]  # fmt: skip

"""Server load: region reads per second and p50/p99 latency at concurrency 1, 8 and 32.

Baseline: the very same response bytes (``.npy`` of each region) written to files and served
by Starlette's StaticFiles under uvicorn with the same number of workers, i.e. the cost of
HTTP alone. Clients are threads with one pooled ``httpx.Client``, all on loopback.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.data import BenchData
from benchmarks.report import Row
from benchmarks.servers import scancache_server, static_server
from benchmarks.timing import percentile
from client.wire import encode_npy
from store.roi import format_roi
from store.source import LocalSource

SECTION = "Server: region reads (random 64x64x32 image patches, .npy)"
PATCH = (64, 64, 32)


def _regions(data: BenchData, count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        o = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape, PATCH, strict=True)]
        region = tuple(slice(a, a + p) for a, p in zip(o, PATCH, strict=True))
        out.append((data.scan_ids[i % len(data.scan_ids)], format_roi(region)))
    return out


def _write_static(data: BenchData, regions: list[tuple[str, str]], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    source = LocalSource(data.store)
    names = []
    for k, (scan_id, roi) in enumerate(regions):
        name = f"r{k:04d}.npy"
        (folder / name).write_bytes(encode_npy(source.read_image(scan_id, roi)))
        names.append(name)
    source.close()
    return names


def load(base: str, paths: list[str], concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """(req/s, p50 ms, p99 ms, errors) of ``concurrency`` threads looping over ``paths``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=base, limits=limits, timeout=30.0) as client:
        for p in paths[:2]:
            client.get(p)  # warm the connection and the server's open arrays

        def worker(offset: int) -> None:
            mine: list[float] = []
            bad = 0
            k = offset
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    r = client.get(paths[k % len(paths)])
                    ok = r.status_code == 200 and len(r.content) > 0
                except httpx.HTTPError:
                    ok = False
                mine.append((time.perf_counter() - t0) * 1e3)
                bad += not ok
                k += concurrency
            with lock:
                latencies.extend(mine)
                errors[0] += bad

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, percentile(latencies, 50), percentile(latencies, 99), errors[0]


def run(data: BenchData, work: Path, quick: bool, server_workers: int) -> list[Row]:
    regions = _regions(data, 32 if quick else 128)
    names = _write_static(data, regions, work / "static")
    seconds = 1.0 if quick else 6.0
    ours_paths = [f"/scans/{s}/image?roi={r}" for s, r in regions]
    rows: list[Row] = []
    results = {}
    with scancache_server(data.store, workers=server_workers) as url:
        for c in (1, 8, 32):
            results[("ours", c)] = load(url, ours_paths, c, seconds)
    with static_server(work / "static", workers=server_workers) as url:
        for c in (1, 8, 32):
            results[("static", c)] = load(url, ["/" + n for n in names], c, seconds)
    for c in (1, 8, 32):
        rps, p50, p99, err = results[("ours", c)]
        srps, sp50, sp99, serr = results[("static", c)]
        rows.append(Row(SECTION, f"concurrency {c}: requests/s", rps, "req/s", srps, "static files",
                        note=f"errors {err} (static {serr})"))  # fmt: skip
        rows.append(Row(SECTION, f"concurrency {c}: p50 latency", p50, "ms", sp50, "static files",
                        higher_is_better=False))  # fmt: skip
        target = "p99 <= 5x p50, no errors" if c == 32 else ""
        # the target compares our own p99 to our own p50: baseline = 5 * p50 so ratio >= 1 means met
        rows.append(Row(SECTION, f"concurrency {c}: p99 latency", p99, "ms", 5 * p50 if target else sp99,
                        "5x our p50" if target else "static files", target, (1.0 if err == 0 else float("inf")) if target else None,
                        higher_is_better=False, note=f"p99/p50 = {p99 / p50:.2f}; static p99 {sp99:.1f} ms"))  # fmt: skip
    return rows

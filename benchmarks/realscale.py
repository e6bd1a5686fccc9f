"""Real scale: every loader with caches (local and server) capped at a quarter of the decoded data.

At the scale users train at (an OAI iMorphics set decodes to ~12 GB) no cache holds the data,
so each epoch reads from the store: that cold path is what this section measures. Every loader
runs in a fresh process (cold, capped cache); over HTTP each loader gets a freshly started
server with the same cap. Per loader: examples/s against the MedSegPy-style baseline on the
same files, HTTP against local, read amplification (bytes decoded / bytes delivered, from
``io_counters``), shuffle quality against a uniform permutation, and for a missed target the
"why" computed from this run's time split. Before each loader the slice files and the store are
read once into the OS page cache, so that both sides start from the same page-cache state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.child import run_child
from benchmarks.data import CATEGORIES, NUM_CLASSES, BenchData
from benchmarks.realscale_child import disk_read_bytes
from benchmarks.report import Row
from benchmarks.servers import scancache_server, server_cpu_s
from benchmarks.slicefiles import medsegpy_slice, read_h5
from benchmarks.timing import copy_ceiling, describe_cpu
from benchmarks.train2d import _categories, gather_rate, medsegpy_2d_rate
from store.reader_share import LOCAL_CACHE_ENV

SECTION = "Real scale: caches capped at 1/4 of the decoded data"


@dataclass(frozen=True)
class Case:
    label: str
    tag: str
    img_size: tuple[int, ...]
    batch: int
    speed_target: float  # x the baseline
    amp_target: float  # read amplification at most


def cases(shape: tuple[int, int, int]) -> list[Case]:
    h, w, d = shape
    out = [
        Case("2D", "DefaultDataLoader", (h, w, 1), 16, 4.0, 1.5),
        Case("2.5D (5 slices)", "S25dDataLoader", (h, w, 5), 16, 8.0, 1.5),
        Case("64x64x32 patches", "RandomPatchDataLoader", (64, 64, 32, 1), 4, 20.0, 3.0),
    ]
    if d >= 64:
        out.append(Case("64x64x64 patches", "RandomPatchDataLoader", (64, 64, 64, 1), 4, 20.0, 3.0))
    return out


def decoded_bytes(data: BenchData) -> int:
    """image (float32) + mask (one uint8 a class) of every scan, as decoded in memory."""
    h, w, d = data.shape
    return len(data.scan_ids) * h * w * d * (4 + NUM_CLASSES)


def s25d_rate(data: BenchData, examples: int, k: int = 5, seed: int = 0) -> float:
    """MedSegPy's S25dDataLoader way: one h5 open per slice of the window, the centre's mask."""
    rng = np.random.default_rng(seed)
    cats = _categories()
    files = {s: sorted(data.source_2d.glob(f"{s}_*.im")) for s in data.scan_ids}
    t0 = time.perf_counter()
    for i in range(examples):
        paths = files[data.scan_ids[i % len(data.scan_ids)]]
        z = int(rng.integers(len(paths)))
        window = [paths[min(max(j, 0), len(paths) - 1)] for j in range(z - k // 2, z + k // 2 + 1)]
        x = np.concatenate([read_h5(p) for p in window], axis=-1).astype(np.float32)
        _, y = medsegpy_slice(paths[z], cats, True)
        x, y.astype(np.float32)
    return examples / (time.perf_counter() - t0)


def baseline(data: BenchData, case: Case, quick: bool) -> tuple[float, str]:
    if case.tag == "DefaultDataLoader":
        return medsegpy_2d_rate(data, 3 if quick else 10), "MedSegPy-style"
    if case.tag == "S25dDataLoader":
        return s25d_rate(data, 24 if quick else 96), "MedSegPy S25d"
    patch = (int(case.img_size[0]), int(case.img_size[1]), int(case.img_size[2]))
    return gather_rate(data, patch, 4 if quick else 12), "gather from slice files"


WHOLE_EPOCH = 1 << 30  # the child reads min(batches, len(loader)): a whole epoch


def measured_batches(case: Case, quick: bool) -> int:
    """Slice loaders are timed over a whole epoch, the unit training repeats: with blocks the
    first window of blocks and the first opens of each scan's arrays are paid once an epoch,
    so a dozen batches would time mostly that start-up. Patch loaders draw 48 batches (their
    epoch is PATCHES_PER_SCAN patches a scan, set from the count)."""
    if quick:
        return 3
    return 48 if case.tag == "RandomPatchDataLoader" else WHOLE_EPOCH


def _spec(source: str, case: Case, batches: int, scans: int) -> dict[str, Any]:
    return {
        "task": "realscale", "source": source, "tag": case.tag, "img_size": list(case.img_size),
        "batch_size": case.batch, "batches": batches,
        "categories": [list(c) if isinstance(c, tuple) else c for c in CATEGORIES],
        "patches_per_scan": -(-min(batches, 10**4) * case.batch // scans),
        "next_epoch": batches == WHOLE_EPOCH,  # slice loaders: also time the next epoch
    }  # fmt: skip


def why(
    result: dict[str, Any],
    over_http: bool,
    ceiling: float | None = None,
    baseline: float | None = None,
    local: dict[str, Any] | None = None,
) -> str:
    """The time split this run measured, as a sentence (no canned text per loader); with the
    copy ceiling (:func:`copy_ceiling`) and the baseline, how far writing the batches alone
    would go; over HTTP with the ``local`` result, the CPU both ways took for the same batches."""
    wall = float(result["wall_s"]) or 1e-9
    amp = result["bytes_decoded"] / result["bytes_returned"] if result["bytes_returned"] else float("nan")
    per_batch = 1000 * wall / max(1, result["batches"])
    parts = [
        f"{per_batch:.0f} ms a batch; source reads took {result['read_s']:.2f} s over {wall:.2f} s of wall time "
        f"({100 * result['read_s'] / wall:.0f}%, summed over concurrent read threads"
        + (
            ", a round trip each: the server decodes and the client parses, on the same cores"
            if over_http
            else ""
        )
        + f") and decoded {result['bytes_decoded'] / 1e6:.0f} MB for {result['bytes_returned'] / 1e6:.0f} MB "
        f"delivered ({amp:.2f}x)"
        + (
            f"; {result['disk_bytes'] / 1e6:.0f} MB of the store came from disk, not the page cache"
            if result.get("disk_bytes")
            else ""
        )
    ]
    cpu = result.get("cpu") or {}
    if cpu:
        parts.append(
            describe_cpu(cpu)
            + (f", the server {result['server_cpu_s']:.2f} s more" if result.get("server_cpu_s") else "")
        )
    if local and local.get("cpu") and cpu and result.get("server_cpu_s"):
        here = cpu["user_s"] + cpu["sys_s"] + result["server_cpu_s"]
        there = local["cpu"]["user_s"] + local["cpu"]["sys_s"]
        parts.append(
            f"client and server together used {here:.2f} s of CPU where reading locally used {there:.2f} s "
            f"({here / there:.1f}x), on the same {os.cpu_count()} cores"
        )
    if ceiling and baseline:
        parts.append(
            f"writing these float32 batches alone runs at {ceiling:.0f}/s here ({ceiling / baseline:.1f}x the "
            f"baseline; this run reached {100 * result['rate'] / ceiling:.0f}% of it)"
        )
    stats = result.get("stats") or {}
    split = {k: stats[k] for k in ("merge_s", "copy_s", "wait_s") if isinstance(stats.get(k), (int, float))}
    if split:
        parts.append(", ".join(f"{k[:-2]} {v:.2f} s" for k, v in split.items()))
    else:
        parts.append("merge/copy not split (this loader has no stats())")
    return "; ".join(parts)


def honest_shuffle_row(scans: int = 16, slices: int = 160, batch: int = 16, depth: int = 8) -> Row:
    """The default 2D epoch order over a 16-scan data set (blocks of ``depth`` slices, 16 blocks
    interleaved, cfg.SHUFFLE_BLOCKS): the fewest distinct scans in any batch of 16, over seeds
    0-2 and epochs 0-2 (the order is a pure function of SEED and the epoch)."""
    from loaders.config import Config
    from loaders.ordering import block_epoch_order

    window = Config().SHUFFLE_BLOCKS
    scan_of = np.repeat(np.arange(scans), slices)
    block_of = scan_of * slices + np.tile(np.arange(slices) // depth, scans)
    fewest = batch
    for seed in range(3):
        for epoch in range(3):
            order = block_epoch_order(seed, epoch, scan_of, block_of, True, window)
            if not np.array_equal(order, block_epoch_order(seed, epoch, scan_of, block_of, True, window)):
                raise AssertionError("the epoch order is not a function of (SEED, epoch)")
            batches = scan_of[order[: len(order) // batch * batch]].reshape(-1, batch)
            fewest = min(fewest, min(len(set(b.tolist())) for b in batches))
    return Row(SECTION, f"{scans} scans x {slices} slices: fewest distinct scans in a batch of {batch}",
               fewest, "scans", 8, "target", ">= 8 scans a batch", 1.0,
               note=f"loaders/ordering.py block_epoch_order (blocks of {depth} slices, {window} interleaved), "
               "seeds 0-2 x epochs 0-2, deterministic")  # fmt: skip


def into_page_cache(*folders: Path) -> int:
    """Read every file below ``folders`` once, so the baseline's slice files and our store start
    each case equally in the OS page cache (this VM evicts idle file pages: baselines read up to
    90 MB from disk in one run and none in the next). Returns the bytes read."""
    total = 0
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 23):
                        total += len(chunk)
    return total


def run(data: BenchData, quick: bool, server_workers: int) -> list[Row]:
    cap = max(1, decoded_bytes(data) // 4)
    env = {LOCAL_CACHE_ENV: str(cap)}
    rows: list[Row] = [honest_shuffle_row()]
    notes = (
        f"{len(data.scan_ids)} scans decode to {decoded_bytes(data) / 1e6:.0f} MB; local and server chunk "
        f"caches capped at {cap / 1e6:.0f} MB"
    )
    # a quick (CI smoke) run: 2D and one patch size, to stay within its time budget
    chosen = [c for c in cases(data.shape) if not quick or c.label in ("2D", "64x64x32 patches")]
    for case in chosen:
        batches = measured_batches(case, quick)
        os.sync()  # no writeback of earlier sections' files during the measurements
        into_page_cache(data.source_2d, data.store)  # scancache's caches stay cold: new processes
        disk_before = disk_read_bytes()
        base, base_name = baseline(data, case, quick)
        base_disk = disk_read_bytes() - disk_before
        local = run_child(_spec(str(data.store), case, batches, len(data.scan_ids)), env=env)
        with scancache_server(data.store, workers=server_workers, cache_bytes=str(cap)) as url:  # fresh: cold
            server_before = server_cpu_s(url)
            remote = run_child(_spec(url, case, batches, len(data.scan_ids)), env=env)
            remote["server_cpu_s"] = server_cpu_s(url) - server_before  # the whole child, build included
        ceiling = copy_ceiling(local["batch_shapes"]) if local.get("batch_shapes") else None
        unit = "slices/s" if case.tag != "RandomPatchDataLoader" else "patches/s"
        rows.append(
            Row(SECTION, f"{case.label}: baseline", base, unit,
                note=f"{base_name}; {base_disk / 1e6:.0f} MB of its files came from disk, not the page cache")
        )  # fmt: skip
        rows.append(
            Row(SECTION, f"{case.label}: local, cold", local["rate"], unit, base, base_name,
                f">= {case.speed_target:g}x {base_name}", case.speed_target, note=notes,
                why=why(local, False, ceiling, base))
        )  # fmt: skip
        if ceiling:
            rows.append(
                Row(SECTION, f"{case.label}: copy ceiling (writing the batches alone)", ceiling, unit, base,
                    base_name, note="np.copyto of each example's float32 x and y from memory into reused "
                    "arrays, best of 3: no loader delivers these batches faster on this machine")
            )  # fmt: skip
        rows.append(
            Row(SECTION, f"{case.label}: over HTTP, cold (fresh server)", remote["rate"], unit, local["rate"],
                "local, cold", ">= 0.85x local", 0.85, why=why(remote, True, local=local))
        )  # fmt: skip
        for where, result in (("local", local), ("HTTP", remote)):
            if result.get("next_epoch_rate"):
                rows.append(
                    Row(SECTION, f"{case.label}: {where}, next epoch (same process)", result["next_epoch_rate"],
                        unit, base, base_name, note="steady state: caches still capped, arrays open, memory reused")
                )  # fmt: skip
        for where, result in (("local", local), ("HTTP", remote)):
            amp = result["bytes_decoded"] / result["bytes_returned"] if result["bytes_returned"] else 0.0
            rows.append(
                Row(SECTION, f"{case.label}: read amplification, {where}", amp, "x", case.amp_target,
                    "target", f"<= {case.amp_target:g}", 1.0, higher_is_better=False,
                    note="bytes decoded / bytes delivered", why=why(result, where == "HTTP"))
            )  # fmt: skip
        mine, uniform = local["shuffle"], local["shuffle_uniform"]
        rows.append(
            Row(SECTION, f"{case.label}: distinct scans per 16 examples", mine["distinct_mean"], "scans",
                uniform["distinct_mean"], "uniform permutation",
                note=f"min {mine['distinct_min']:g} (uniform {uniform['distinct_min']:g}) of {len(data.scan_ids)} scans")
        )  # fmt: skip
        rows.append(
            Row(SECTION, f"{case.label}: consecutive examples in the same chunk", 100 * mine["same_chunk"], "%",
                100 * uniform["same_chunk"], "uniform permutation", higher_is_better=False,
                note="lower is better shuffled")
        )  # fmt: skip
    return rows

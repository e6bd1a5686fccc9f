"""2D training batches (batch 16, image plus merged mask) and 3D random patches per second.

Baselines read the same MedSegPy files: the 2D reader opens one ``.im`` and one ``.seg`` per
slice and merges classes (MedSegPy's DefaultDataLoader); patches are gathered from slice files
(one open per slice and array), or cut from the whole volume loaded first (the MONAI / TorchIO
way). Every reader returns the same float32 x and y a model consumes.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks.child import run_child
from benchmarks.data import CATEGORIES, NUM_CLASSES, BenchData
from benchmarks.report import Row
from benchmarks.servers import scancache_server, server_cpu_s
from benchmarks.slicefiles import gather_patch, medsegpy_slice
from benchmarks.timing import copy_ceiling, describe_cpu
from store.categories import merge_mask, normalize_categories
from store.reader_share import default_cache_bytes

BATCH_2D = 16
BATCH_3D = 4
SECTION_2D = "2D training batches (16 slices, image + merged mask)"
SECTION_3D = "3D random patches (image + merged mask)"


def _categories() -> tuple[tuple[int, ...], ...]:
    return normalize_categories(list(CATEGORIES), NUM_CLASSES)


def medsegpy_2d_rate(data: BenchData, batches: int, seed: int = 0) -> float:
    """Slices per second of the MedSegPy-style reader over random slices of every scan."""
    files = sorted(data.source_2d.glob("*.im"))
    rng = np.random.default_rng(seed)
    cats = _categories()
    t0 = time.perf_counter()
    for _ in range(batches):
        xs, ys = [], []
        for k in rng.choice(len(files), BATCH_2D, replace=False):
            image, mask = medsegpy_slice(files[int(k)], cats, True)
            xs.append(image.astype(np.float32))
            ys.append(mask.astype(np.float32))
        np.stack(xs), np.stack(ys)
    return batches * BATCH_2D / (time.perf_counter() - t0)


def _slice_files(data: BenchData, scan_id: str) -> list[Path]:
    return sorted(data.source_2d.glob(f"{scan_id}_*.im"))


def _random_origin(
    rng: np.random.Generator, shape: tuple[int, ...], patch: tuple[int, int, int]
) -> tuple[int, ...]:
    return tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True))


def gather_rate(data: BenchData, patch: tuple[int, int, int], count: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    cats = _categories()
    files = {s: _slice_files(data, s) for s in data.scan_ids}
    t0 = time.perf_counter()
    for i in range(count):
        o = _random_origin(rng, data.shape, patch)
        image, mask = gather_patch(
            files[data.scan_ids[i % len(data.scan_ids)]],
            slice(o[0], o[0] + patch[0]), slice(o[1], o[1] + patch[1]), slice(o[2], o[2] + patch[2]),
        )  # fmt: skip
        image.astype(np.float32), merge_mask(mask, cats, True).astype(np.float32)
    return count / (time.perf_counter() - t0)


def whole_volume_rate(data: BenchData, patch: tuple[int, int, int], count: int, seed: int = 0) -> float:
    """Load the scan's whole volume and mask (one HDF5 file), then crop: MONAI/TorchIO style."""
    rng = np.random.default_rng(seed)
    cats = _categories()
    t0 = time.perf_counter()
    for i in range(count):
        with h5py.File(data.source_3d / f"{data.scan_ids[i % len(data.scan_ids)]}.h5", "r") as f:
            volume, seg = f["volume"][()], f["seg"][()]
        o = _random_origin(rng, data.shape, patch)
        region = (slice(o[0], o[0] + patch[0]), slice(o[1], o[1] + patch[1]), slice(o[2], o[2] + patch[2]))
        volume[region].astype(np.float32), merge_mask(seg[region], cats, True).astype(np.float32)
    return count / (time.perf_counter() - t0)


def _loader_spec(source: str, tag: str, img_size: list[int], batch: int, batches: int) -> dict[str, object]:
    return {
        "task": "loader", "source": source, "tag": tag, "img_size": img_size, "batch_size": batch,
        "batches": batches, "categories": [list(c) if isinstance(c, tuple) else c for c in CATEGORIES],
        "patches_per_scan": max(1, batches * batch // 1),
    }  # fmt: skip


@functools.cache
def _ceiling(shapes: tuple[tuple[int, ...], ...]) -> float:
    """:func:`copy_ceiling` measured once per batch shape: a loader's cold and warm passes share it."""
    return copy_ceiling([list(shape) for shape in shapes])


def pass_why(
    result: dict[str, Any], temp: str, baseline: float | None = None, server_cpu: float | None = None
) -> str:
    """One pass's measured split (``temp``: cold or warm) as the report words it: time a batch,
    the loader's source read / copy / wait, the CPU it took (and the server's, over HTTP), and
    with ``baseline`` the copy ceiling of its batches (:func:`copy_ceiling`)."""
    stats, cpu = result.get(f"{temp}_stats") or {}, result.get(f"{temp}_cpu") or {}
    batch = result["batch_shapes"][0][0] if result.get("batch_shapes") else 1
    per_batch = 1000 * batch / max(result[temp], 1e-9)
    where = "every chunk in the decoded-chunk cache" if temp == "warm" else "a fresh process, empty caches"
    parts = [f"{per_batch:.0f} ms a batch with {where}"]
    split = {
        k: stats[k] for k in ("source_read_s", "copy_s", "wait_s") if isinstance(stats.get(k), (int, float))
    }
    if split:
        parts.append(", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f} s" for k, v in split.items()))
    if cpu:
        parts.append(
            describe_cpu(cpu)
            + (f", the server {server_cpu:.2f} s more over both passes" if server_cpu else "")
        )
    if baseline and result.get("batch_shapes"):
        ceiling = _ceiling(tuple(tuple(shape) for shape in result["batch_shapes"]))
        parts.append(
            f"writing these float32 batches alone (x, and y of {result['batch_shapes'][1][-1]} channels) runs at "
            f"{ceiling:.0f}/s here, {ceiling / baseline:.1f}x the baseline"
        )
    return "; ".join(parts)


def run(data: BenchData, quick: bool, server_workers: int) -> list[Row]:
    h, w, d = data.shape
    batches_2d = 6 if quick else 30
    patches = 8 if quick else 24
    base_2d = medsegpy_2d_rate(data, batches_2d)
    spec_2d = _loader_spec(str(data.store), "DefaultDataLoader", [h, w, 1], BATCH_2D, batches_2d)
    shapes = [(64, 64, 32), (64, 64, 64)] if d >= 64 else [(64, 64, 32)]
    specs_3d = []
    for p in shapes:
        spec_3d = _loader_spec(
            str(data.store), "RandomPatchDataLoader", [*p, 1], BATCH_3D, patches // BATCH_3D
        )
        spec_3d["patches_per_scan"] = -(-patches // len(data.scan_ids))
        specs_3d.append(spec_3d)
    # The server gets the same chunk cache as the local loader's default, so HTTP against local
    # compares transports, not cache sizes (the server's own default is 512M).
    with scancache_server(data.store, workers=server_workers, cache_bytes=str(default_cache_bytes())) as url:
        specs = [spec_2d, {**spec_2d, "source": url}]
        for spec_3d in specs_3d:
            specs += [spec_3d, {**spec_3d, "source": url}]
        server_cpu: list[float | None] = [None] * len(specs)  # the server's CPU for each HTTP spec
        if quick:  # a smoke run: one process for all (only the first figure is really cold)
            results = run_child({"task": "many", "specs": specs})
        else:  # one at a time, so that measurements do not compete for the cores
            results = []
            for i, spec in enumerate(specs):
                before = server_cpu_s(url)
                results.append(run_child(spec))
                if spec["source"] == url:
                    server_cpu[i] = server_cpu_s(url) - before
    local_2d, http_2d = results[0], results[1]
    patch_results = [
        (p, results[2 + 2 * i], results[3 + 2 * i], server_cpu[3 + 2 * i]) for i, p in enumerate(shapes)
    ]
    rows = [
        Row(
            SECTION_2D,
            "MedSegPy-style reader",
            base_2d,
            "slices/s",
            note="h5py open per .im/.seg + collect_mask",
        ),
    ]
    rows.append(Row(SECTION_2D, "scancache local, cold", local_2d["cold"], "slices/s", base_2d,
                    "MedSegPy-style", ">= 2x MedSegPy", 2.0, why=pass_why(local_2d, "cold", base_2d)))  # fmt: skip
    # issue 9: with the data in the cache, 2D at least 10x the MedSegPy-style reader
    rows.append(Row(SECTION_2D, "scancache local, warm", local_2d["warm"], "slices/s", base_2d,
                    "MedSegPy-style", ">= 10x MedSegPy", 10.0, why=pass_why(local_2d, "warm", base_2d)))  # fmt: skip
    for temp in ("cold", "warm"):
        rows.append(Row(SECTION_2D, f"scancache over HTTP, {temp}", http_2d[temp], "slices/s", local_2d[temp],
                        f"local, {temp}", ">= 0.7x local", 0.7,
                        why=pass_why(http_2d, temp, server_cpu=server_cpu[1])))  # fmt: skip
    for p, local, http, http_server_cpu in patch_results:
        label = "x".join(map(str, p))
        count = max(4, patches // (2 if p[2] == 64 else 1))
        gathered = gather_rate(data, p, count)
        whole = whole_volume_rate(data, p, max(2, count // 4))
        rows.append(Row(SECTION_3D, f"{label}: gather from slice files", gathered, "patches/s"))
        rows.append(Row(SECTION_3D, f"{label}: whole volume then crop", whole, "patches/s"))
        for temp in ("cold", "warm"):
            rows.append(Row(SECTION_3D, f"{label}: scancache local, {temp}", local[temp], "patches/s", gathered,
                            "gather", ">= 20x gather", 20.0, why=pass_why(local, temp, gathered)))  # fmt: skip
        rows.append(Row(SECTION_3D, f"{label}: scancache local cold vs whole volume", local["cold"], "patches/s",
                        whole, "whole volume then crop"))  # fmt: skip
        for temp in ("cold", "warm"):
            rows.append(Row(SECTION_3D, f"{label}: scancache over HTTP, {temp}", http[temp], "patches/s",
                            local[temp], f"local, {temp}", ">= 0.7x local", 0.7,
                            why=pass_why(http, temp, server_cpu=http_server_cpu)))  # fmt: skip
    return rows

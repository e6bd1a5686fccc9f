"""The write path: ``service/shards.py`` against tensorstore writing the same shards.

``python -m benchmarks.writepath [--quick]``. One scan (image float32 + 6-class mask) is
written three ways into the exact store format (``client.layout.array_metadata``):
``ShardedArrayWriter`` with c-blosc called into reused buffers (``blosc_compress_ctx``, which
numcodecs links but does not document), the same writer with numcodecs' documented
``blosc.compress``, and tensorstore (``ts.open(create=True)`` of the same metadata, a slab at a
time). Every output is read back and compared, so the figures compare equal work.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from benchmarks.phantom import phantom
from client.layout import ChunkLayout, array_metadata
from service import shards


def write_ours(path: Path, array: np.ndarray, layout: ChunkLayout, documented: bool) -> float:
    saved = shards._blosc_into
    if documented:  # force numcodecs' public blosc.compress
        shards._blosc_into = shards._BloscInto.__new__(shards._BloscInto)
        shards._blosc_into.function = None
    try:
        t0 = time.perf_counter()
        writer = shards.ShardedArrayWriter(path, array.shape, array.dtype, layout)
        for z0 in range(0, array.shape[2], writer.slab_depth):
            writer.write_slab(z0, array[:, :, z0 : z0 + writer.slab_depth])
        writer.close()
        return time.perf_counter() - t0
    finally:
        shards._blosc_into = saved


def write_tensorstore(path: Path, array: np.ndarray, layout: ChunkLayout) -> float:
    meta = array_metadata(array.shape, array.dtype.name, array.dtype.itemsize, layout)
    meta = {k: v for k, v in meta.items() if k not in ("zarr_format", "node_type", "attributes")}
    t0 = time.perf_counter()
    spec: dict[str, Any] = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": meta,
    }
    out = ts.open(spec, create=True, context=ts.Context({"data_copy_concurrency": {"limit": 1}})).result()
    depth = meta["chunk_grid"]["configuration"]["chunk_shape"][2]  # whole shards: no read-modify-write
    for z0 in range(0, array.shape[2], depth):
        out[:, :, z0 : z0 + depth].write(array[:, :, z0 : z0 + depth]).result()
    return time.perf_counter() - t0


def _read(path: Path) -> np.ndarray:
    return (
        ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}})
        .result()
        .read()
        .result()
    )


def run(quick: bool, repeats: int = 3, work: Path = Path("bench-output/writepath")) -> list[dict[str, Any]]:
    shape = (128, 128, 48) if quick else (384, 384, 160)
    image, mask = phantom(shape, 6, seed=0)
    layout = ChunkLayout()
    rows = []
    for name, array in (("image", image), ("mask", mask)):
        times: dict[str, list[float]] = {"ctypes": [], "numcodecs": [], "tensorstore": []}
        for _ in range(repeats):
            for way in times:
                target = work / f"{name}-{way}"
                shutil.rmtree(target, ignore_errors=True)
                if way == "tensorstore":
                    times[way].append(write_tensorstore(target, array, layout))
                else:
                    times[way].append(write_ours(target, array, layout, documented=way == "numcodecs"))
                np.testing.assert_array_equal(_read(target), array)
        rows.append({"array": name, **{k: (min(v), max(v)) for k, v in times.items()}})
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.writepath", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print("| array | c-blosc via ctypes (s) | numcodecs blosc.compress (s) | tensorstore (s) |")
    print("|---|---|---|---|")
    for row in run(args.quick):
        cells = [f"{row[k][0]:.2f}-{row[k][1]:.2f}" for k in ("ctypes", "numcodecs", "tensorstore")]
        print(f"| {row['array']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

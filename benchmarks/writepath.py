"""The write path: ``store/shards.py`` against tensorstore writing the same shards.

``python -m benchmarks.writepath [--quick]``. One scan (image float32 + 6-class mask) is
written two ways into the exact store format (``store.format.array_metadata``):
``ShardedArrayWriter`` (numcodecs' documented ``blosc.compress``) and tensorstore
(``ts.open(create=True)`` of the same metadata, a whole shard of slices at a time). Every
output is read back and compared, so the figures compare equal work. (An earlier variant
called c-blosc's ``blosc_compress_ctx`` through ctypes; it measured the same as numcodecs'
public function, docs/tuning.md.)
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
from benchmarks.report import Row
from store import shards
from store.format import ChunkLayout, array_metadata

SECTION = "Write path (one scan, same shards, read back exactly)"


def write_ours(path: Path, array: np.ndarray, layout: ChunkLayout) -> float:
    t0 = time.perf_counter()
    writer = shards.ShardedArrayWriter(path, array.shape, array.dtype, layout)
    for z0 in range(0, array.shape[2], writer.slab_depth):
        writer.write_slab(z0, array[:, :, z0 : z0 + writer.slab_depth])
    writer.close()
    return time.perf_counter() - t0


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
        z1 = min(z0 + depth, array.shape[2])
        out[:, :, z0:z1].write(array[:, :, z0:z1]).result()
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
        times: dict[str, list[float]] = {"shards.py": [], "tensorstore": []}
        for _ in range(repeats):
            for way in times:
                target = work / f"{name}-{way}"
                shutil.rmtree(target, ignore_errors=True)
                if way == "tensorstore":
                    times[way].append(write_tensorstore(target, array, layout))
                else:
                    times[way].append(write_ours(target, array, layout))
                np.testing.assert_array_equal(_read(target), array)
        rows.append({"array": name, **{k: (min(v), max(v)) for k, v in times.items()}})
    shutil.rmtree(work, ignore_errors=True)
    return rows


def report_rows(quick: bool) -> list[Row]:
    """``make bench`` rows: the fastest of three writes each way (ranges in the note)."""
    out = []
    for row in run(quick):
        ours, theirs = row["shards.py"], row["tensorstore"]
        out.append(
            Row(SECTION, f"{row['array']}: store/shards.py", ours[0], "s", theirs[0], "tensorstore",
                higher_is_better=False,
                note=f"3 writes: ours {ours[0]:.2f}-{ours[1]:.2f} s, tensorstore {theirs[0]:.2f}-{theirs[1]:.2f} s")
        )  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.writepath", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    print("| array | store/shards.py (s) | tensorstore (s) |")
    print("|---|---|---|")
    for row in run(args.quick):
        cells = [f"{row[k][0]:.2f}-{row[k][1]:.2f}" for k in ("shards.py", "tensorstore")]
        print(f"| {row['array']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Chunk layout sweep: write time, size, slice and patch reads per layout and read engine.

``python -m benchmarks.layout [--quick] [--out FILE.md]``. Reads are image + mask, the way a
training step needs them. "cold" = tensorstore with ``cache_pool`` 0 (files in the OS page
cache, every read decodes), "warm" = decoded-chunk cache holding the scan; zarr-python has no
decoded cache, so its figures are always cold.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
import zarr

from benchmarks.phantom import phantom
from benchmarks.slicefiles import gather_patch, read_h5, write_slice_files
from benchmarks.timing import median_ms, total_s
from store.format import ChunkLayout
from store.writer import write_scan

SWEEP = [
    ChunkLayout((384, 384, 1), 32, "none"),
    ChunkLayout((384, 384, 1), 32, "blosc-lz4"),
    ChunkLayout((192, 192, 4), 32, "blosc-lz4"),
    ChunkLayout((96, 96, 4), 32, "none"),
    ChunkLayout((96, 96, 4), 32, "blosc-lz4"),
    ChunkLayout((96, 96, 8), 32, "none"),
    ChunkLayout((96, 96, 8), 32, "blosc-lz4"),
    ChunkLayout((96, 96, 8), 32, "zstd"),
    ChunkLayout((128, 128, 8), 32, "none"),
    ChunkLayout((128, 128, 8), 32, "blosc-lz4"),
    ChunkLayout((128, 128, 16), 32, "blosc-lz4"),
    ChunkLayout((64, 64, 8), 32, "blosc-lz4"),
    ChunkLayout((64, 64, 16), 32, "none"),
    ChunkLayout((64, 64, 16), 32, "blosc-lz4"),
    ChunkLayout((96, 96, 8), 8, "blosc-lz4"),
    ChunkLayout((96, 96, 8), 64, "blosc-lz4"),
    ChunkLayout((96, 96, 8), 160, "blosc-lz4"),
    # thin chunks: a whole slice reads little more than itself, a patch still few chunks
    ChunkLayout((64, 64, 4), 32, "none"),
    ChunkLayout((64, 64, 4), 32, "blosc-lz4"),
    ChunkLayout((128, 128, 4), 32, "none"),
    ChunkLayout((128, 128, 4), 32, "blosc-lz4"),
    ChunkLayout((128, 128, 2), 32, "none"),
    ChunkLayout((128, 128, 2), 32, "blosc-lz4"),
    ChunkLayout((64, 64, 2), 32, "none"),
    ChunkLayout((96, 96, 2), 32, "blosc-lz4"),
    ChunkLayout((192, 192, 2), 32, "none"),
]
QUICK_SWEEP = [SWEEP[0], SWEEP[6], SWEEP[9]]


@dataclass
class LayoutResult:
    layout: ChunkLayout
    write_s: float
    size_mb: float
    ts_slice_cold: float
    ts_batch16_cold: float
    ts_p64_cold: float
    ts_p32_cold: float
    ts_slice_warm: float
    ts_p64_warm: float
    zarr_slice: float
    zarr_p64: float


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _ts_open(path: Path, context: ts.Context) -> Any:
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, context=context
    ).result()


def _positions(
    shape: tuple[int, int, int], n: int, patch: tuple[int, int, int], seed: int
) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [
        tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True)) for _ in range(n)
    ]


class Engines:
    """Read slices and patches (image + mask) of one scan with tensorstore or zarr-python."""

    def __init__(self, scan_dir: Path, cache_bytes: int) -> None:
        ctx = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
        self.ts_image = _ts_open(scan_dir / "image", ctx)
        self.ts_mask = _ts_open(scan_dir / "mask", ctx)
        self.z_image = zarr.open_array(str(scan_dir / "image"), mode="r")
        self.z_mask = zarr.open_array(str(scan_dir / "mask"), mode="r")

    def ts_slices(self, zs: list[int]) -> list[np.ndarray]:
        futures = [a[:, :, z].read() for z in zs for a in (self.ts_image, self.ts_mask)]
        return [f.result() for f in futures]

    def ts_patch(self, o: tuple[int, ...], p: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        region = (slice(o[0], o[0] + p[0]), slice(o[1], o[1] + p[1]), slice(o[2], o[2] + p[2]))
        fi, fm = self.ts_image[region].read(), self.ts_mask[region].read()
        return fi.result(), fm.result()

    def zarr_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        return self.z_image[:, :, z], self.z_mask[:, :, z, :]

    def zarr_patch(self, o: tuple[int, ...], p: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        region = (slice(o[0], o[0] + p[0]), slice(o[1], o[1] + p[1]), slice(o[2], o[2] + p[2]))
        return self.z_image[region], self.z_mask[region]


def measure(root: Path, image: np.ndarray, mask: np.ndarray, layout: ChunkLayout, reps: int) -> LayoutResult:
    scan_id = "0000001_V00-Aug00"
    if root.exists():
        shutil.rmtree(root)
    write_s = total_s(lambda: write_scan(root, scan_id, image, mask, {"split": "train"}, layout))
    scan_dir = root / scan_id
    shape = image.shape
    zs = [int(z) for z in np.random.default_rng(1).integers(0, shape[2], size=16 * reps)]
    p64, p32 = (64, 64, 64), (64, 64, 32)
    o64, o32 = _positions(shape, reps + 1, p64, 2), _positions(shape, reps + 1, p32, 3)

    cold = Engines(scan_dir, 0)
    slice_cold = median_ms(lambda i: cold.ts_slices([zs[i]]), reps)
    batch_cold = median_ms(lambda i: cold.ts_slices(zs[16 * i : 16 * i + 16]), reps // 4 or 1)
    p64_cold = median_ms(lambda i: cold.ts_patch(o64[i], p64), reps)
    p32_cold = median_ms(lambda i: cold.ts_patch(o32[i], p32), reps)
    zarr_slice = median_ms(lambda i: cold.zarr_slice(zs[i]), reps)
    zarr_p64 = median_ms(lambda i: cold.zarr_patch(o64[i], p64), max(3, reps // 3))

    warm = Engines(scan_dir, 2 * 2**30)
    warm.ts_image.read().result()
    warm.ts_mask.read().result()
    slice_warm = median_ms(lambda i: warm.ts_slices([zs[i]]), reps)
    p64_warm = median_ms(lambda i: warm.ts_patch(o64[i], p64), reps)
    return LayoutResult(
        layout, write_s, _size_mb(scan_dir), slice_cold, batch_cold / 16, p64_cold, p32_cold,
        slice_warm, p64_warm, zarr_slice, zarr_p64,
    )  # fmt: skip


def measure_slice_files(folder: Path, image: np.ndarray, mask: np.ndarray, reps: int) -> dict[str, float]:
    """Baselines on the same data: one h5 slice (image + seg), a gathered 64^3 / 64x64x32 patch."""
    im_paths = sorted(folder.glob("*.im"))
    if len(im_paths) != image.shape[2]:
        shutil.rmtree(folder, ignore_errors=True)
        im_paths = write_slice_files(folder, image, mask)
    zs = [int(z) for z in np.random.default_rng(1).integers(0, image.shape[2], size=reps)]
    o64 = _positions(image.shape, reps + 1, (64, 64, 64), 2)
    o32 = _positions(image.shape, reps + 1, (64, 64, 32), 3)

    def h5_slice(i: int) -> None:
        read_h5(im_paths[zs[i]])
        read_h5(im_paths[zs[i]].with_suffix(".seg"))

    def gather(o: tuple[int, ...], depth: int) -> None:
        gather_patch(im_paths, slice(o[0], o[0] + 64), slice(o[1], o[1] + 64), slice(o[2], o[2] + depth))

    return {
        "h5_slice": median_ms(h5_slice, reps),
        "gather_p64": median_ms(lambda i: gather(o64[i], 64), max(3, reps // 3)),
        "gather_p32": median_ms(lambda i: gather(o32[i], 32), max(3, reps // 3)),
    }


def mask_shuffle_sweep(work: Path, mask: np.ndarray, reps: int) -> str:
    """The uint8 mask alone: blosc-lz4 with bitshuffle (the first default) against no shuffle."""
    from store.format import array_metadata

    zs = [int(z) for z in np.random.default_rng(1).integers(0, mask.shape[2], size=reps)]
    o64 = _positions(mask.shape[:3], reps + 1, (64, 64, 64), 2)
    lines = ["| inner chunks | mask shuffle | MB | slice ms | 64³ ms |", "|---|---|---|---|---|"]
    for chunks in ((96, 96, 8), (64, 64, 4)):
        for shuffle in ("bitshuffle", "noshuffle"):
            meta = array_metadata(mask.shape, "uint8", 1, ChunkLayout(chunks, 32, "blosc-lz4"))
            meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]["shuffle"] = shuffle
            path = work / "mask-sweep"
            shutil.rmtree(path, ignore_errors=True)
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
            ts.open({**spec, "metadata": meta}, create=True).result().write(mask).result()
            arr = ts.open(spec, context=ts.Context({"cache_pool": {"total_bytes_limit": 0}})).result()
            sl = median_ms(lambda i, a=arr: a[:, :, zs[i]].read().result(), reps)
            p = median_ms(lambda i, a=arr: a[o64[i][0] : o64[i][0] + 64, o64[i][1] : o64[i][1] + 64,
                                              o64[i][2] : o64[i][2] + 64].read().result(), reps)  # fmt: skip
            lines.append(
                f"| {'x'.join(map(str, chunks))} | {shuffle} | {_size_mb(path):.1f} | {sl:.2f} | {p:.2f} |"
            )
    return "\n".join(lines) + "\n"


def markdown(results: list[LayoutResult], base: dict[str, float]) -> str:
    head = (
        "| inner chunks | shard depth | codec | write s | MB | ts slice cold | ts slice in batch16 cold "
        "| ts 64³ cold | ts 64²x32 cold | ts slice warm | ts 64³ warm | zarr-python slice | zarr-python 64³ |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {'x'.join(map(str, r.layout.chunks))} | {r.layout.shard_depth} | {r.layout.codec} | {r.write_s:.2f} "
        f"| {r.size_mb:.0f} | {r.ts_slice_cold:.2f} | {r.ts_batch16_cold:.2f} | {r.ts_p64_cold:.2f} "
        f"| {r.ts_p32_cold:.2f} | {r.ts_slice_warm:.2f} | {r.ts_p64_warm:.2f} | {r.zarr_slice:.2f} | {r.zarr_p64:.1f} |"
        for r in results
    ]
    foot = (
        f"\nBaselines (h5py, slice files, same data): one slice image + seg {base['h5_slice']:.2f} ms; "
        f"gather 64³ patch {base['gather_p64']:.1f} ms; gather 64x64x32 patch {base['gather_p32']:.1f} ms. "
        "All times in ms per slice or patch (image + mask), medians.\n"
    )
    return head + "\n".join(rows) + "\n" + foot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default="bench-output/layout")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sample-phantom", action="store_true", help="use service.sample_data's phantom")
    parser.add_argument("--only", type=int, nargs="*", help="indices into the sweep")
    args = parser.parse_args(argv)
    shape = (192, 192, 64) if args.quick else (384, 384, 160)
    reps = 6 if args.quick else 24
    work = Path(args.work)
    if args.sample_phantom:  # the sample data's phantom: continuous Rician noise, compresses less
        from service.sample_data import phantom as sample_phantom

        image, mask = sample_phantom(shape, 6, np.random.default_rng(0))
    else:
        image, mask = phantom(shape)
    base = measure_slice_files(work / "slices", image, mask, reps)
    print(base, flush=True)
    sweep = QUICK_SWEEP if args.quick else [SWEEP[i] for i in (args.only or range(len(SWEEP)))]
    results = []
    for layout in sweep:
        results.append(measure(work / "store", image, mask, layout, reps))
        print(markdown(results[-1:], base).splitlines()[2], flush=True)
    text = (
        markdown(results, base)
        + "\nMask codec (uint8, 6 classes, cold):\n\n"
        + mask_shuffle_sweep(work, mask, reps)
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

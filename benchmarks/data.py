"""Benchmark data: MedSegPy slice files (and one-file-per-scan HDF5) plus the converted store."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from service.sample_data import SampleData, write_sample_data
from store.format import ChunkLayout

NUM_CLASSES = 6
CATEGORIES = (0, (1, 2), 3, (4, 5))  # the seed page's example: merged classes plus background


@dataclass(frozen=True)
class BenchData:
    source_2d: Path  # <id>_NNN.im / .seg slice files (what MedSegPy reads)
    source_3d: Path  # <id>.h5 with volume + seg (what MONAI / TorchIO-style pipelines read)
    store: Path
    shape: tuple[int, int, int]
    scan_ids: list[str]


def sizes(quick: bool) -> tuple[tuple[int, int, int], int]:
    """(scan shape, subjects): realistic OAI-like scans, or a small set for CI smoke runs."""
    return ((128, 128, 48), 2) if quick else ((384, 384, 160), 4)


def prepare(work: Path, quick: bool, layout: ChunkLayout | None = None) -> BenchData:
    """Write the sample data into ``work`` once (reused by later runs of the same size), convert it."""
    shape, subjects = sizes(quick)
    root = work
    stamp = root / "source" / f".complete-{shape[0]}x{shape[1]}x{shape[2]}x{subjects}"
    if not stamp.exists():
        shutil.rmtree(root / "source", ignore_errors=True)
        for kind in ("2d", "3d"):  # the same scans in each form (same seed), one folder each
            data: SampleData = write_sample_data(
                root / "source" / kind, subjects=subjects, visits=1, shape=shape, num_classes=NUM_CLASSES,
                fmt=kind, splits=None, seed=0,
            )  # fmt: skip
        stamp.touch()
        ids = [s.scan_id for s in data.scans]
    else:
        ids = sorted(p.stem for p in (root / "source" / "3d").glob("*.h5"))
    layout = layout or ChunkLayout()
    # one store per layout, so that comparing layouts (--chunks) never rebuilds the others
    # "-f2": stores with the format-2 derived arrays (label map, locations); older ones are rebuilt
    store = root / f"store-{'x'.join(map(str, layout.chunks))}-{layout.shard_depth}-{layout.codec}-f2"
    converted = store / ".complete"
    if not converted.exists():
        from service.preprocess import run_preprocess

        shutil.rmtree(store, ignore_errors=True)
        summary = run_preprocess(root / "source" / "2d", store, workers=2, layout=layout, progress=False)
        if summary.failed:
            raise RuntimeError(f"preprocessing the benchmark data failed: {summary.failures()[:3]}")
        converted.touch()
    return BenchData(root / "source" / "2d", root / "source" / "3d", store, shape, sorted(ids))

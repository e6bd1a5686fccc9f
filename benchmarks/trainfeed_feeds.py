"""The training-feed benchmark's data and its feeds (``benchmarks.trainfeed`` measures them):
OAI-size phantoms written as MedSegPy slice files and converted into a store; the MedSegPy-style
torch map datasets (the baseline: one ``.im`` and one ``.seg`` opened per item); scancache's
loaders as torch datasets."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CATEGORIES = (0, (1, 2), 3, (4, 5))
NUM_CLASSES = 6


@dataclass(frozen=True)
class Data:
    source: Path
    store: Path
    shape: tuple[int, int, int]
    scan_ids: list[str]


def _write_scan(args: tuple[Path, int, tuple[int, int, int]]) -> str:
    from service.sample_data import _write_slices, phantom

    folder, subject, shape = args
    image, mask = phantom(shape, NUM_CLASSES, np.random.default_rng(subject))
    scan_id = f"{subject:07d}_V00-Aug00"
    _write_slices(folder, scan_id, image, mask)
    return scan_id


def prepare(work: Path, scans: int, shape: tuple[int, int, int], cores: int) -> Data:
    """Slice files written in parallel (one process per scan), then ``scancache preprocess``."""
    from service.preprocess import run_preprocess

    tag = f"{scans}x{'x'.join(map(str, shape))}"
    source, store = work / f"source-{tag}", work / f"store-{tag}"
    ids = [f"{s:07d}_V00-Aug00" for s in range(1, scans + 1)]
    if not (source / ".complete").exists():
        source.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ProcessPoolExecutor(max(1, min(cores, scans))) as pool:
            list(pool.map(_write_scan, [(source, s, shape) for s in range(1, scans + 1)]))
        (source / ".complete").touch()
    if not (store / ".complete").exists():
        summary = run_preprocess(source, store, workers=max(1, min(cores, scans)), progress=False)
        if summary.failed:
            raise RuntimeError(f"preprocessing failed: {summary.failures()[:3]}")
        (store / ".complete").touch()
    return Data(source, store, shape, ids)


# -- the baseline: MedSegPy-style map datasets ------------------------------------------------------
def _merge(seg: np.ndarray) -> np.ndarray:
    from store.categories import merge_mask, normalize_categories

    return merge_mask(seg, normalize_categories(list(CATEGORIES), NUM_CLASSES), False)


class MedSegPySlices:
    """One example per slice: open the ``.im`` and the ``.seg``, read, collect the mask."""

    def __init__(self, data: Data) -> None:
        self.paths = sorted(data.source.glob("*.im"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import h5py
        import torch

        with h5py.File(self.paths[i], "r") as f:
            image = f["data"][()]
        with h5py.File(self.paths[i].with_suffix(".seg"), "r") as f:
            seg = f["data"][()][:, :, 0, :]
        y = _merge(seg).astype(np.float32)
        return torch.from_numpy(np.moveaxis(image, -1, 0).copy()), torch.from_numpy(
            np.moveaxis(y, -1, 0).copy()
        )


class MedSegPyPatches:
    """A random 64^3 patch per item, gathered from the slice files (one open per slice and file)."""

    def __init__(self, data: Data, size: int = 64, count: int = 512) -> None:
        self.data, self.size, self.count = data, size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import h5py
        import torch

        rng = np.random.default_rng(i)
        scan = self.data.scan_ids[int(rng.integers(len(self.data.scan_ids)))]
        h, w, d = self.data.shape
        s = min(self.size, h, w, d)
        y0, x0, z0 = (int(rng.integers(0, n - s + 1)) for n in (h, w, d))
        images, masks = [], []
        for z in range(z0, z0 + s):
            stem = self.data.source / f"{scan}_{z + 1:03d}"
            with h5py.File(stem.with_suffix(".im"), "r") as f:
                images.append(f["data"][y0 : y0 + s, x0 : x0 + s, 0])
            with h5py.File(stem.with_suffix(".seg"), "r") as f:
                masks.append(f["data"][y0 : y0 + s, x0 : x0 + s, 0, :])
        y = _merge(np.stack(masks, axis=2)).astype(np.float32)
        return torch.from_numpy(np.stack(images, axis=2)[None]), torch.from_numpy(
            np.moveaxis(y, -1, 0).copy()
        )


# -- scancache ---------------------------------------------------------------------------------------
def scancache_dataset(source: str, tag: str, img_size: tuple[int, ...], batch: int, y_format: str) -> Any:
    from loaders import Config, DatasetCatalog, build_loader

    name = f"feed-{abs(hash((source, tag, img_size, batch, y_format)))}"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, source)
    cfg = Config(TAG=tag, CATEGORIES=CATEGORIES, IMG_SIZE=img_size, SEED=0, Y_FORMAT=y_format)
    if tag == "RandomPatchDataLoader":
        cfg.PATCHES_PER_SCAN = 16
    loader = build_loader(cfg, name, batch_size=batch, is_test=False, shuffle=True, drop_last=True)
    return loader.as_torch_dataset(channels_first=True)

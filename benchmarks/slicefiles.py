"""The MedSegPy side: slice-wise HDF5 files and the ways people read them today.

``write_slice_files`` is only used until ``service.sample_data`` lands; the readers are the
baselines (one ``h5py.File`` open per slice file, as MedSegPy's DefaultDataLoader does).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from store.categories import Categories, merge_mask


def slice_name(subject: int, visit: int, aug: int, z: int) -> str:
    return f"{subject:07d}_V{visit:02d}-Aug{aug:02d}_{z:03d}"


def write_slice_files(
    folder: Path, image: np.ndarray, mask: np.ndarray, subject: int = 1, visit: int = 0, aug: int = 0
) -> list[Path]:
    """One ``.im`` (H, W, 1) and one ``.seg`` (H, W, 1, C) per slice; returns the ``.im`` paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for z in range(image.shape[2]):
        stem = folder / slice_name(subject, visit, aug, z + 1)
        with h5py.File(stem.with_suffix(".im"), "w") as f:
            f.create_dataset("data", data=image[:, :, z : z + 1])
        with h5py.File(stem.with_suffix(".seg"), "w") as f:
            f.create_dataset("data", data=mask[:, :, z : z + 1, :])
        paths.append(stem.with_suffix(".im"))
    return paths


def read_h5(path: Path | str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["data"][()]


def medsegpy_slice(
    im_path: Path, categories: Categories | None, background: bool
) -> tuple[np.ndarray, np.ndarray]:
    """What MedSegPy does per 2D example: open both files, read, collect the mask."""
    image = read_h5(im_path)
    seg = read_h5(im_path.with_suffix(".seg"))[:, :, 0, :]
    return image, merge_mask(seg, categories, background)


def gather_patch(im_paths: list[Path], y: slice, x: slice, z: slice) -> tuple[np.ndarray, np.ndarray]:
    """A 3D patch gathered from slice files: one open per slice and array (partial h5 reads)."""
    images, masks = [], []
    for p in im_paths[z]:
        with h5py.File(p, "r") as f:
            images.append(f["data"][y, x, 0])
        with h5py.File(p.with_suffix(".seg"), "r") as f:
            masks.append(f["data"][y, x, 0, :])
    return np.stack(images, axis=2), np.stack(masks, axis=2)

"""Synthetic knee-like phantoms in the MedSegPy formats, for tests, the demo and benchmarks.

Each scan is an ellipsoidal "bone" wrapped in concentric tissue shells (one class per shell,
like cartilage and meniscus around a femoral condyle), on a darker soft-tissue background, with
a smooth coil bias field and Rician noise. Subjects differ in position, size and shell
thickness; each tissue has about the same contrast in every subject (one MR protocol), with a
small per-subject jitter. Later visits lose a little shell thickness (as cartilage thins). The
end slices hold no foreground, as in real knee scans.

``fmt="2d"`` writes MedSegPy slice files (``.im``/``.seg``), ``"3d"`` one ``.h5`` per scan
(``volume``, ``seg``, ``spacing``), ``"both"`` a mixed source that ``scancache preprocess``
converts in one run: odd-numbered subjects as slice files, even-numbered ones as volumes, in
the same folders (as when two sites export differently; every scan id appears once).
Subjects are spread over the split folders (``train``/``valid``/``test``) by subject, so no
subject is in two splits.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from store.reader_share import memory_bytes
from store.units import format_bytes

DEFAULT_SHAPE = (96, 96, 24)
DEFAULT_SPLITS = ("train", "valid", "test")
SPACING = (0.365, 0.365, 0.7)  # mm, like OAI iMorphics DESS
FORMATS = ("2d", "3d", "both")
# Mean intensity of each tissue shell (class k takes entry k, cycling), against soft tissue at
# 0.25 and bone marrow at 0.55: one protocol gives every subject about the same contrast, so a
# model can learn tissue appearance from a few subjects. Neighbouring shells differ clearly.
TISSUE_CONTRAST = (0.95, 0.4, 0.8, 1.05, 0.65, 0.9)
TISSUE_JITTER = 0.05  # relative, per subject and class


@dataclass(frozen=True)
class SampleScan:
    scan_id: str
    split: str | None
    subject_id: int
    time_point: int
    shape: tuple[int, int, int]
    num_classes: int
    kind: str = "2d"  # how it was written: "2d" slice files or one "3d" volume


@dataclass
class SampleData:
    """Where the sample source went (one folder, whatever the format) and what it holds."""

    root: Path
    scans: list[SampleScan] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for s in self.scans if s.kind == kind)


def assign_splits(subjects: int, splits: Sequence[str] | None) -> list[str | None]:
    """Every split gets a subject while there are enough; the rest go to the first (train)."""
    if not splits:
        return [None] * subjects
    counts = [0] * len(splits)
    for i in range(subjects):
        counts[i if i < len(splits) else 0] += 1
    out: list[str | None] = []
    for name, count in zip(splits, counts, strict=True):
        out.extend([name] * count)
    return out


def phantom(
    shape: Sequence[int], num_classes: int, rng: np.random.Generator, thinning: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One scan: float32 image (H, W, D) in [0, ~1.2] and uint8 mask (H, W, D, C), disjoint classes."""
    h, w, d = (int(n) for n in shape)
    y, x, z = np.meshgrid(
        np.linspace(-1, 1, h, dtype=np.float32),
        np.linspace(-1, 1, w, dtype=np.float32),
        np.linspace(-1, 1, d, dtype=np.float32),
        indexing="ij",
    )
    # the whole knee (bone + shells, at most ~1.6 bone radii) stays inside z in (-0.95, 0.95)
    center = rng.uniform([-0.1, -0.1, -0.03], [0.1, 0.1, 0.03]).astype(np.float32)
    radii = rng.uniform([0.3, 0.35, 0.45], [0.4, 0.45, 0.55]).astype(np.float32)
    # normalized ellipsoidal radius: 1 at the bone surface
    r = np.sqrt(
        ((y - center[0]) / radii[0]) ** 2
        + ((x - center[1]) / radii[1]) ** 2
        + ((z - center[2]) / radii[2]) ** 2
    )
    thickness = rng.uniform(0.3, 0.45) / num_classes * (1.0 - thinning)
    contrast = np.resize(np.array(TISSUE_CONTRAST, dtype=np.float32), num_classes)
    tissue = contrast * rng.uniform(1.0 - TISSUE_JITTER, 1.0 + TISSUE_JITTER, size=num_classes)
    image = np.full(shape, 0.25, dtype=np.float32)  # soft tissue
    image[r < 1.0] = 0.55  # bone marrow
    mask = np.zeros((h, w, d, num_classes), dtype=np.uint8)
    inner: np.ndarray | float = 1.0
    for k in range(num_classes):
        outer = inner + thickness * (1.0 + 0.3 * np.sin(2.5 * np.arctan2(y - center[0], x - center[1]) + k))
        shell = (r >= inner) & (r < outer)
        mask[..., k] = shell
        image[shell] = tissue[k]
        inner = outer
    bias = 1.0 + 0.25 * (y + 0.5 * x)  # receive-coil shading
    signal = image * bias
    sigma = 0.04
    noisy = np.sqrt((signal + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return noisy.astype(np.float32), mask


def write_sample_data(
    directory: str | os.PathLike[str],
    subjects: int = 4,
    visits: int = 2,
    shape: Sequence[int] = DEFAULT_SHAPE,
    num_classes: int = 4,
    fmt: str = "2d",
    seed: int = 0,
    splits: Sequence[str] | None = DEFAULT_SPLITS,
    dtype: str = "float32",
) -> SampleData:
    """Write ``subjects * visits`` phantom scans; returns where they went.

    ``dtype="int16"`` writes CT-like integer images (scaled by 1000).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if len(shape) != 3 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be three positive integers (H, W, D), got {tuple(shape)}")
    if subjects < 1 or visits < 1 or num_classes < 1:
        raise ValueError("subjects, visits and num_classes must be positive")
    if fmt == "both" and subjects < 2:
        raise ValueError("fmt 'both' writes every other subject as volumes: it needs at least 2 subjects")
    for name in splits or ():  # each a folder under directory: "../x" would write outside it
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"split names must be plain folder names, got {name!r}")
    out_dtype = np.dtype(dtype)
    # the phantom of one scan is built in memory (float32 image, one uint8 mask per class)
    scan_bytes = math.prod(int(n) for n in shape) * (4 + out_dtype.itemsize + num_classes)
    memory = memory_bytes()
    if memory is not None and scan_bytes > memory // 2:
        raise ValueError(
            f"shape {tuple(int(n) for n in shape)}: one scan takes {format_bytes(scan_bytes)} to build, "
            f"more than half the memory this process may use ({format_bytes(memory)})"
        )
    root = Path(directory)
    data = SampleData(root=root)
    rng = np.random.default_rng(seed)
    vol_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    for subject_index, split in enumerate(assign_splits(subjects, splits)):
        subject_id = subject_index + 1
        subject_seed = int(rng.integers(2**31))
        kind = ("2d" if subject_id % 2 else "3d") if fmt == "both" else fmt
        folder = root / split if split else root
        folder.mkdir(parents=True, exist_ok=True)
        for visit in range(visits):
            # the same anatomy at every visit (same seed), a little thinner each time
            image, mask = phantom(vol_shape, num_classes, np.random.default_rng(subject_seed), 0.03 * visit)
            noise_rng = np.random.default_rng([subject_seed, visit])
            image = image + noise_rng.normal(0, 0.01, image.shape).astype(np.float32)
            stored = (
                (image * 1000).round().astype(out_dtype)
                if out_dtype.kind in "iu"
                else image.astype(out_dtype)
            )
            scan_id = f"{subject_id:07d}_V{visit:02d}-Aug00"
            data.scans.append(SampleScan(scan_id, split, subject_id, visit, vol_shape, num_classes, kind))
            if kind == "2d":
                _write_slices(folder, scan_id, stored, mask)
            else:
                _write_h5(folder / f"{scan_id}.h5", {"volume": stored, "seg": mask}, {"spacing": SPACING})
    return data


def _write_h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict[str, object] | None = None) -> None:
    """One HDF5 file, built in memory and written with Python's own I/O: HDF5 writing straight
    to a full disk crashed the process (h5py's cleanup of the failed file, exit 139) before
    anything could say which file or clean up; an OSError from a plain write names the file."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
        f.attrs.update(attrs or {})
    try:
        path.write_bytes(buffer.getbuffer())
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None


def _write_slices(folder: Path, scan_id: str, image: np.ndarray, mask: np.ndarray) -> None:
    for z in range(image.shape[2]):
        stem = folder / f"{scan_id}_{z + 1:03d}"
        _write_h5(stem.with_suffix(".im"), {"data": image[:, :, z : z + 1]})
        _write_h5(stem.with_suffix(".seg"), {"data": mask[:, :, z : z + 1, :]})

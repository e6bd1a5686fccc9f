"""Test helpers for the preprocessing tests: writing MedSegPy files by hand, building numpy
references from them independently of ``service.sources``, reading stores with zarr-python,
and running the CLI in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import zarr

SLICE = re.compile(r"^(\d+_V\d+-Aug\d+)_(\d+)\.(im|seg)$")


def write_slice_files(folder, scan_id, image, mask=None, width=3):
    """One ``.im`` (H, W, 1) and ``.seg`` (H, W, 1, C) per slice, 1-indexed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for z in range(image.shape[2]):
        stem = f"{scan_id}_{z + 1:0{width}d}"
        with h5py.File(folder / f"{stem}.im", "w") as f:
            f.create_dataset("data", data=image[:, :, z : z + 1])
        if mask is not None:
            with h5py.File(folder / f"{stem}.seg", "w") as f:
                f.create_dataset("data", data=mask[:, :, z : z + 1, :])


def write_volume_file(path, volume, seg=None, spacing=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("volume", data=volume)
        if seg is not None:
            f.create_dataset("seg", data=seg)
        if spacing is not None:
            f.attrs["spacing"] = spacing


def random_scan(shape, classes, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        image = rng.integers(-1000, 3000, size=shape).astype(dtype)
    else:
        image = rng.normal(0, 1, size=shape).astype(dtype)
    labels = rng.integers(-1, classes, size=shape)
    mask = np.stack([labels == k for k in range(classes)], axis=-1).astype(np.uint8)
    return image, mask


def reference(source, only=None):
    """{scan_id: (split, image, mask or None)} read straight from the h5 files with h5py."""
    source = Path(source)
    slices = defaultdict(lambda: {"im": {}, "seg": {}, "split": None})
    volumes = {}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        split = rel.parts[0] if len(rel.parts) > 1 else None
        match = SLICE.match(path.name)
        if only is not None and (match[1] if match else path.stem) not in only:
            continue
        if match:
            entry = slices[match[1]]
            with h5py.File(path, "r") as f:
                entry[match[3]][int(match[2])] = f["data"][()]
            entry["split"] = split
        elif path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                seg = f["seg"][()].astype(np.uint8) if "seg" in f else None
                volumes[path.stem] = (split, f["volume"][()], seg)
    out = dict(volumes)
    for key, entry in slices.items():
        order = sorted(entry["im"])
        image = np.stack([entry["im"][n][:, :, 0] for n in order], axis=2)
        mask = None
        if entry["seg"]:
            mask = np.stack([entry["seg"][n][:, :, 0, :] for n in order], axis=2).astype(np.uint8)
        out[key] = (entry["split"], image, mask)
    return out


def read_store(store):
    """{scan_id: (attrs, image, mask or None)} read with plain zarr-python."""
    zarr.open_group(str(store), mode="r")  # the root is a plain Zarr v3 group
    out = {}
    for name in published(store):  # not group.groups(): it warns about .staging during a run
        scan = zarr.open_group(str(Path(store) / name), mode="r")
        image = scan["image"][...]
        mask = scan["mask"][...] if "mask" in scan else None
        out[name] = (dict(scan.attrs), image, mask)
    return out


def assert_store_matches(store, source, only=None):
    truth = reference(source, only)
    stored = read_store(store)
    keys = set(only) if only is not None else set(truth)
    assert keys <= set(stored), f"missing from store: {sorted(keys - set(stored))}"
    for key in keys:
        split, image, mask = truth[key]
        attrs, got_image, got_mask = stored[key]
        assert got_image.dtype == image.dtype.newbyteorder("="), key
        np.testing.assert_array_equal(got_image, image)
        if mask is None:
            assert got_mask is None, key
            assert attrs["num_classes"] == 0
        else:
            assert got_mask.dtype == np.uint8
            np.testing.assert_array_equal(got_mask, mask)
            assert attrs["class_voxels"] == [int(v) for v in mask.sum(axis=(0, 1, 2))]
        assert attrs["split"] == split
        assert attrs["shape"] == list(image.shape)
    return truth, stored


def published(store):
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(
        p.name for p in store.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file()
    )


def start_cli(*args):
    """``scancache ARGS`` started in a session of its own (so that a test can signal it, or its
    whole process group, mid-run), stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run_cli(*args, timeout=240, env=None):
    """``scancache ARGS`` in a subprocess, as a user runs it; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )

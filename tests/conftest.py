"""Shared fixtures: small real stores written with the real writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from store.writer import write_scan


def make_volume(shape, num_classes, seed, dtype=np.float32):
    """A random image and a one-hot-ish binary mask (classes disjoint, some background)."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        image = rng.integers(-1000, 2000, size=shape).astype(dtype)
    else:
        image = rng.normal(100, 30, size=shape).astype(dtype)
    labels = rng.integers(-1, num_classes, size=shape)
    mask = np.stack([(labels == k) for k in range(num_classes)], axis=-1).astype(np.uint8)
    return image, mask


SMALL_SCANS = [
    # scan_id, shape, classes, split, subject, visit, aug, dtype
    ("0000001_V00-Aug00", (40, 36, 12), 4, "train", 1, 0, 0, np.float32),
    ("0000001_V01-Aug00", (40, 36, 9), 4, "train", 1, 1, 0, np.float32),
    ("0000002_V00-Aug00", (33, 27, 10), 4, "valid", 2, 0, 0, np.int16),
    ("0000003_V00-Aug01", (40, 36, 7), 4, "test", 3, 0, 1, np.float32),
]


def build_store(root, scans=SMALL_SCANS, image_only=("0000003_V00-Aug01",)):
    """Write ``scans`` into a store at ``root``; returns {scan_id: (image, mask or None)}."""
    truth = {}
    for i, (scan_id, shape, classes, split, subject, visit, aug, dtype) in enumerate(scans):
        image, mask = make_volume(shape, classes, seed=i, dtype=dtype)
        if scan_id in image_only:
            mask = None
        attrs = {"split": split, "subject_id": subject, "time_point": visit, "augmentation": aug}
        write_scan(root, scan_id, image, mask, attrs)
        truth[scan_id] = (image, mask)
    return truth


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A store of four small scans (one image-only) and the numpy truth it was written from."""
    root = tmp_path_factory.mktemp("store") / "store"
    truth = build_store(root)
    return root, truth


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) on loopback for the whole session; the standard
    AWS variables point this process and every child (CLI, Dask workers, servers) at it."""
    from benchmarks.s3_server import running_s3_server

    with running_s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def s3_url(s3_server):
    """``s3://<the session's bucket>/<a fresh prefix>``."""
    return s3_server.new_url()

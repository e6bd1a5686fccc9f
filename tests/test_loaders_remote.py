"""The same loader over a local store and over a real server gives identical batches."""

from __future__ import annotations

import numpy as np
import pytest
from live_server import live_server

from client.http import HttpSource
from loaders import Config, DatasetCatalog, build_loader, open_source
from store.source import LocalSource

CONFIGS = {
    "2d": dict(TAG="DefaultDataLoader"),
    "2.5d": dict(TAG="S25dDataLoader", IMG_SIZE=(40, 36, 3), IMG_PAD_MODE="reflect"),
    "patch": dict(TAG="PatchDataLoader", IMG_SIZE=(16, 16, 4, 1), IMG_STRIDE=(12, 12, 3), IMG_PAD_SIZE=1),
    "random": dict(
        TAG="RandomPatchDataLoader", IMG_SIZE=(12, 12, 4, 1), PATCHES_PER_SCAN=6, FOREGROUND_RATIO=0.5
    ),
}


@pytest.fixture(scope="module")
def datasets(small_store):
    root, _ = small_store
    with live_server(root) as url:
        for name, source in (("remote_local", str(root)), ("remote_http", url)):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, source, split="train")
        yield "remote_local", "remote_http", url
    for name in ("remote_local", "remote_http"):
        DatasetCatalog.remove(name)


def test_open_source_picks_the_source_by_address(small_store, datasets):
    root, _ = small_store
    url = datasets[2]
    local, remote = open_source(root), open_source(url)
    assert isinstance(local, LocalSource) and isinstance(remote, HttpSource)
    assert [m.scan_id for m in local.list_scans()] == [m.scan_id for m in remote.list_scans()]
    remote.close()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_local_and_remote_batches_are_identical(datasets, kind):
    local_name, http_name, _ = datasets
    loaders = []
    for name in (local_name, http_name):
        cfg = Config(
            SEED=5, CATEGORIES=(0, (1, 2), 3), INCLUDE_BACKGROUND=True, NUM_WORKERS=2, **CONFIGS[kind]
        )
        loaders.append(build_loader(cfg, name, batch_size=3, is_test=False, shuffle=True, drop_last=True))
    local, remote = loaders
    assert isinstance(remote.scans[0].source, HttpSource)
    assert len(local) == len(remote) > 0
    for _epoch in range(2):
        for b in range(len(local)):
            for a, r in zip(local[b], remote[b], strict=True):
                assert a.dtype == r.dtype == np.float32
                np.testing.assert_array_equal(a, r)
        local.on_epoch_end()
        remote.on_epoch_end()


def test_local_and_remote_inference_are_identical(datasets):
    local_name, http_name, _ = datasets

    def model(x):
        return np.concatenate([x * 0.5, x - 1.0], axis=-1)

    outputs = []
    for name in (local_name, http_name):
        cfg = Config(
            TAG="PatchDataLoader", IMG_SIZE=(16, 16, 4, 1), IMG_STRIDE=(10, 10, 3), CATEGORIES=(1, 3)
        )
        loader = build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)
        outputs.append(list(loader.inference(model)))
    for (li, lo), (ri, ro) in zip(*outputs, strict=True):
        assert li["scan_id"] == ri["scan_id"]
        np.testing.assert_array_equal(li["x"], ri["x"])
        np.testing.assert_array_equal(lo["y_true"], ro["y_true"])
        np.testing.assert_array_equal(lo["y_pred"], ro["y_pred"])


def test_a_small_server_byte_limit_splits_batches_and_scans(small_store):
    """Batches halve and inference reads slabs when --max-bytes is below one batch or one scan."""
    root, _ = small_store
    slice_bytes = 40 * 36 * 4
    with live_server(root, max_bytes=3 * slice_bytes) as url:
        results = []
        for name, source in (("tight_local", str(root)), ("tight_http", url)):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, source, split="train")
            cfg = Config(SEED=2, CATEGORIES=(1,))
            loader = build_loader(cfg, name, batch_size=6, is_test=True, shuffle=True, drop_last=False)
            batches = [loader[b] for b in range(len(loader))]
            outputs = list(loader.inference(lambda x: x + np.float32(1.0)))
            results.append((batches, outputs))
            DatasetCatalog.remove(name)
        (lb, lo), (rb, ro) = results
        for a, b in zip(lb, rb, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)
        for (li, lout), (ri, rout) in zip(lo, ro, strict=True):
            np.testing.assert_array_equal(li["x"], ri["x"])
            np.testing.assert_array_equal(lout["y_pred"], rout["y_pred"])
            np.testing.assert_array_equal(lout["y_true"], rout["y_true"])

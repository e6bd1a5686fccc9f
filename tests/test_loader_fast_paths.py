"""The loaders' fast paths keep their contracts: float32 for custom targets, cache sizing, transport."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import zarr
from live_server import live_server

from client.http import HttpSource
from client.http_batch import direct_http
from loaders import LOADER_REGISTRY, Config, DatasetCatalog, DefaultDataLoader, build_loader
from loaders.base import Element
from store.protocol import RegionRequest
from store.reader_share import (
    DEFAULT_CACHE_BYTES,
    LOCAL_CACHE_ENV,
    LOCAL_CACHE_MAX,
    WORKER_CACHE_MIN,
    default_cache_bytes,
    set_reader_share,
)

SCAN = "0000001_V00-Aug00"


class InvertedTargetLoader(DefaultDataLoader):
    """A target with arithmetic: in uint8, ``1 - mask`` would wrap; it must see float32."""

    def model_target(self, mask: np.ndarray, element: Element) -> np.ndarray:
        assert mask.dtype == np.float32
        return 1.0 - mask[:, :, 0]


@pytest.fixture(scope="module")
def dataset(small_store):
    root, _ = small_store
    DatasetCatalog.remove("fast_paths")
    DatasetCatalog.register("fast_paths", str(root), split="train", time_point=0)
    LOADER_REGISTRY["InvertedTargetLoader"] = InvertedTargetLoader
    group = zarr.open_group(str(root), mode="r")
    yield "fast_paths", group[SCAN]["image"][...], group[SCAN]["mask"][...]
    DatasetCatalog.remove("fast_paths")
    LOADER_REGISTRY.pop("InvertedTargetLoader", None)


def test_unmarked_model_target_gets_float32_and_batches_match_numpy(dataset):
    name, image, mask = dataset
    cats = (0, (1, 2), 3)
    cfg = Config(TAG="InvertedTargetLoader", CATEGORIES=cats, INCLUDE_BACKGROUND=True, SEED=3)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=True)
    plain = build_loader(Config(CATEGORIES=cats, INCLUDE_BACKGROUND=True, SEED=3), name, 4, False, True, True)
    try:
        x, y = loader[0]
        x0, y0 = plain[0]
        assert x.dtype == y.dtype == np.float32 and x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, 1.0 - y0)
        checked = 0
        for b in range(len(plain)):
            xb, yb = plain[b]
            for i, element in enumerate(plain.batch_elements(b)):
                if plain.scans[element.scan].scan_id != SCAN:
                    continue
                z = element.window[2][0]
                m = mask[:, :, z]
                merged = np.stack([m[..., 0], m[..., 1] + m[..., 2], m[..., 3]], -1)
                np.testing.assert_array_equal(xb[i, ..., 0], image[:, :, z])
                np.testing.assert_array_equal(yb[i, ..., 1:], merged)
                np.testing.assert_array_equal(yb[i, ..., 0], merged.sum(-1) == 0)
                checked += 1
        assert checked > 0
    finally:
        loader.close()
        plain.close()


def test_default_cache_bytes(monkeypatch):
    monkeypatch.delenv(LOCAL_CACHE_ENV, raising=False)
    assert DEFAULT_CACHE_BYTES <= default_cache_bytes() <= LOCAL_CACHE_MAX
    monkeypatch.setenv(LOCAL_CACHE_ENV, "12345")
    assert default_cache_bytes() == 12345
    monkeypatch.setenv(LOCAL_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=LOCAL_CACHE_ENV):
        default_cache_bytes()


def test_one_of_k_readers_keeps_a_kth_of_the_default_cache(monkeypatch):
    # torch workers call set_reader_share(cores // k, k): k caches together stay one budget
    monkeypatch.delenv(LOCAL_CACHE_ENV, raising=False)
    whole = default_cache_bytes()
    try:
        set_reader_share(1, readers=4)
        assert default_cache_bytes() == max(whole // 4, WORKER_CACHE_MIN)
        set_reader_share(1, readers=1000)
        assert default_cache_bytes() == WORKER_CACHE_MIN
        monkeypatch.setenv(LOCAL_CACHE_ENV, "300M")  # the user's setting is per process, as documented
        assert default_cache_bytes() == 300 * 2**20
    finally:
        set_reader_share(None, readers=1)
    monkeypatch.delenv(LOCAL_CACHE_ENV)
    assert default_cache_bytes() == whole


def test_direct_http_only_without_tls_or_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert direct_http("http://127.0.0.1:8000")
    assert not direct_http("https://example.org")
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    assert not direct_http("http://data.example.org:8000")
    monkeypatch.setenv("no_proxy", "data.example.org")
    assert direct_http("http://data.example.org:8000")


def test_batch_reads_survive_a_dropped_keep_alive_connection(small_store):
    root, truth = small_store
    image = truth[SCAN][0]
    request = RegionRequest(SCAN, "image", (slice(0, 8), slice(0, 8), slice(0, 2)))
    with live_server(root) as url, HttpSource(url, retries=0) as source:
        assert source._poster is not None  # loopback http: the direct path
        np.testing.assert_array_equal(source.read_regions([request])[0], image[:8, :8, :2])
        conn = source._poster._idle[-1]  # the idle keep-alive connection the next read reuses
        conn.sock.shutdown(socket.SHUT_RDWR)  # as if the server had closed the idle connection
        np.testing.assert_array_equal(source.read_regions([request])[0], image[:8, :8, :2])

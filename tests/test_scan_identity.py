"""The client knows which data it reads: a store's identity and each scan's version.

A server that comes back on another store with the same scan ids, or a scan re-published while
a loader reads it (locally or over HTTP), is one ``ScanChanged`` error naming what changed, never
other voxels or an unrelated ROI error.
"""

from __future__ import annotations

import json
import shutil
import socket

import httpx
import numpy as np
import pytest
from conftest import build_store, make_volume
from live_server import live_server

from client.http import HttpSource
from client.wire import STORE_HEADER, VERSIONS_HEADER
from loaders import Config, DatasetCatalog, build_loader, close_shared_sources
from store import publish
from store.errors import ScanChanged
from store.protocol import RegionRequest
from store.source import LocalSource
from store.writer import write_scan

SCAN = "0000001_V00-Aug00"
OTHER = "0000001_V01-Aug00"
SCANS = [
    (SCAN, (24, 20, 8), 3, "train", 1, 0, 0, np.float32),
    (OTHER, (24, 20, 6), 3, "train", 1, 1, 0, np.float32),
]


def _store(path, shape=(24, 20, 8), seed=0):
    """Two scans; ``SCAN`` with ``shape`` and data from ``seed`` (another store: other data)."""
    scans = [(SCAN, shape, *SCANS[0][2:]), SCANS[1]]
    truth = build_store(path, scans, image_only=())
    if seed:
        image, mask = make_volume(shape, 3, seed=seed)
        write_scan(path, SCAN, image, mask, {"split": "train", "subject_id": 1, "time_point": 0})
        truth[SCAN] = (image, mask)
    return truth


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_store_id_and_versions_are_served(tmp_path):
    root = tmp_path / "store"
    _store(root)
    store_id = json.loads((root / "zarr.json").read_text())["attributes"]["scancache"]["store_id"]
    assert LocalSource(root).store_id == store_id
    version = publish.current_version(root, SCAN)
    with live_server(root) as url:
        listing = httpx.get(f"{url}/scans")
        assert listing.json()["store_id"] == store_id and listing.headers[STORE_HEADER] == store_id
        assert {s["scan_id"]: s["version"] for s in listing.json()["scans"]} == {
            SCAN: version,
            OTHER: publish.current_version(root, OTHER),
        }
        one = httpx.get(f"{url}/scans/{SCAN}").json()
        assert one["version"] == version and one["store_id"] == store_id
        region = httpx.get(f"{url}/scans/{SCAN}/image", params={"roi": "0:4,0:4,1"})
        assert region.headers[VERSIONS_HEADER] == f"{SCAN}={version}"
        body = {"regions": [{"scan_id": SCAN, "roi": "0:2"}, {"scan_id": OTHER, "array": "mask"}]}
        batch = httpx.post(f"{url}/batch", json=body)
        assert (
            batch.headers[VERSIONS_HEADER]
            == f"{SCAN}={version},{OTHER}={publish.current_version(root, OTHER)}"
        )
        for response in (httpx.get(f"{url}/scans/0009999_V00-Aug00"), httpx.get(f"{url}/health")):
            assert response.headers[STORE_HEADER] == store_id  # errors too: every response
        meta = HttpSource(url).metadata(SCAN)
        assert meta.version == version and "version" not in meta.attrs and "store_id" not in meta.attrs
        assert LocalSource(root).metadata(SCAN).version == version  # both sources say it alike


def test_a_store_replaced_in_place_is_served_under_its_own_id(tmp_path):
    """rm -rf STORE and preprocess again while serving: the new store's id reaches clients (the
    header and the documents agree with its zarr.json), so a client knows it is another store."""
    import time

    root = tmp_path / "store"
    _store(root)
    old = json.loads((root / "zarr.json").read_text())["attributes"]["scancache"]["store_id"]
    with live_server(root) as url:
        assert httpx.get(f"{url}/scans").headers[STORE_HEADER] == old
        shutil.rmtree(root)
        _store(root, seed=1)
        new = json.loads((root / "zarr.json").read_text())["attributes"]["scancache"]["store_id"]
        assert new != old
        deadline = time.monotonic() + 10  # read again (in the background) at most once a second
        while httpx.get(f"{url}/health").headers[STORE_HEADER] != new and time.monotonic() < deadline:
            time.sleep(0.2)
        listing = httpx.get(f"{url}/scans")
        assert listing.headers[STORE_HEADER] == new and listing.json()["store_id"] == new
        zarr_root = httpx.get(f"{url}/zarr/zarr.json")
        assert (
            zarr_root.json()["attributes"]["scancache"]["store_id"] == zarr_root.headers[STORE_HEADER] == new
        )


def test_a_store_without_store_id_gets_a_stable_derived_one(tmp_path):
    root = tmp_path / "old"
    _store(root)
    doc = json.loads((root / "zarr.json").read_text())
    del doc["attributes"]["scancache"]["store_id"]  # written before there was one
    (root / "zarr.json").write_text(json.dumps(doc))
    first = LocalSource(root).store_id
    assert first.startswith("derived-") and LocalSource(root).store_id == first  # stable
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    assert LocalSource(copy).store_id != first  # a copy is another store
    with live_server(root) as url:
        assert httpx.get(f"{url}/scans").json()["store_id"] == first


def test_server_back_on_another_store_is_refused_not_read(tmp_path):
    """Same URL, another store with the same scan ids: other data (same shape) and another
    shape (where the old roi is out of bounds) are both one ScanChanged naming the store."""
    a, b = tmp_path / "a", tmp_path / "b"
    truth = _store(a)
    _store(b, shape=(16, 20, 8), seed=7)
    port = _free_port()
    whole = (slice(0, 24), slice(0, 20), slice(0, 8))
    with live_server(a, port=port) as url:
        source = HttpSource(url, retry_seconds=20)
        np.testing.assert_array_equal(source.read_image(OTHER), truth[OTHER][0])
        got = source.read_regions([RegionRequest(SCAN, "image", whole)])[0]
        np.testing.assert_array_equal(got, truth[SCAN][0])
    with live_server(b, port=port) as url_b:
        assert url_b == url
        for read in (
            lambda: source.read_image(OTHER),  # same shape, other store
            lambda: source.read_regions([RegionRequest(SCAN, "image", whole)]),  # roi out of b's bounds
            lambda: source.metadata(SCAN),
        ):
            with pytest.raises(ScanChanged) as err:
                read()
            text = _one_line(err)
            assert "now serves another store" in text and url in text
        fresh = HttpSource(url)  # a new source reads the new store
        assert fresh.metadata(SCAN).shape == (16, 20, 8)
        fresh.close()
    source.close()


def _loader(name, location):
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, location, scan_id=SCAN)
    cfg = Config(TAG="DefaultDataLoader", IMG_SIZE=(24, 20, 1), SHUFFLE_BLOCKS=0, SEED=1, PREFETCH_BATCHES=1)
    return build_loader(cfg, name, batch_size=2, is_test=False, shuffle=False, drop_last=False)


def _republish(root, shape, seed):
    image, mask = make_volume(shape, 3, seed=seed)
    write_scan(root, SCAN, image, mask, {"split": "train", "subject_id": 1, "time_point": 0})


@pytest.mark.parametrize("remote", [False, True], ids=["local", "http"])
@pytest.mark.parametrize("shape", [(24, 20, 8), (12, 20, 8)], ids=["same-shape", "other-shape"])
def test_scan_republished_mid_epoch_is_one_clear_error(tmp_path, remote, shape):
    root = tmp_path / "store"
    truth = _store(root)
    try:
        with live_server(root) as url:
            loader = _loader("identity", url if remote else str(root))
            x, _ = loader[0]
            np.testing.assert_array_equal(x[0, :, :, 0], truth[SCAN][0][:, :, 0])
            _republish(root, shape, seed=11)
            with pytest.raises(ScanChanged) as err:
                for b in range(len(loader)):  # read-ahead may hold a batch or two of the old one
                    loader[b]
            text = _one_line(err)
            assert SCAN in text and "rebuild the loader" in text
            again = _loader("identity", url if remote else str(root))  # a new loader reads it
            x, _ = again[0]
            assert x.shape[1:3] == shape[:2]
    finally:
        DatasetCatalog.remove("identity")
        close_shared_sources()


def test_http_source_checks_reads_against_the_metadata_it_gave(tmp_path):
    root = tmp_path / "store"
    _store(root)
    with live_server(root) as url, HttpSource(url) as source:
        before = source.metadata(SCAN)
        source.read_image(SCAN, "0:2,0:2,0")
        _republish(root, (24, 20, 8), seed=5)
        with pytest.raises(ScanChanged) as err:
            source.read_image(SCAN, "0:2,0:2,0")
        assert SCAN in _one_line(err) and before.version in str(err.value)
        after = source.metadata(SCAN)  # metadata read again: the caller now holds the new version
        assert after.version != before.version
        np.testing.assert_array_equal(source.read_image(SCAN), LocalSource(root).read_image(SCAN))
        stale = RegionRequest(SCAN, "image", "0:2", version=before.version)
        with pytest.raises(ScanChanged):
            source.read_regions([stale])
        with pytest.raises(ScanChanged):
            LocalSource(root).read_regions([stale])

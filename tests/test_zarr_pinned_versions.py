"""``/zarr/<scan_id>@<version>/``: a Zarr reader over HTTP pinned to one version of a scan reads
that version exactly while a newer one is published, and is told (410) once it is removed,
instead of reading fill values; on a local store and on S3 (a real SeaweedFS on loopback)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import zarr
from conftest import build_store, make_volume
from live_server import live_server

from client.http import HttpSource
from store.errors import ScanChanged
from store.storage import open_storage
from store.writer import write_scan

SCAN = "0000001_V00-Aug00"
SCANS = [(SCAN, (24, 20, 8), 3, "train", 1, 0, 0, np.float32)]


def _republish(root: object, seed: int) -> np.ndarray:
    image, mask = make_volume((24, 20, 8), 3, seed=seed)
    write_scan(root, SCAN, image, mask, {"split": "train", "subject_id": 1, "time_point": 0})
    return image


def _check_pinned_reads(root: object) -> None:
    truth = build_store(root, SCANS, image_only=())
    storage = open_storage(root)
    first = storage.current_version(SCAN)
    assert first is not None
    with live_server(root) as url:
        assert httpx.get(f"{url}/scans/{SCAN}", timeout=30).json()["version"] == first
        pinned = f"{url}/zarr/{SCAN}@{first}"
        # zarr-python, as a user would open it: the version's voxels, exactly
        np.testing.assert_array_equal(zarr.open_array(f"{pinned}/image", mode="r")[...], truth[SCAN][0])
        shard = httpx.get(f"{pinned}/image/c/0/0/0", timeout=30)
        assert shard.status_code == 200 and "immutable" in shard.headers["cache-control"]
        again = httpx.get(
            f"{pinned}/image/c/0/0/0", headers={"If-None-Match": shard.headers["etag"]}, timeout=30
        )
        assert again.status_code == 304 and "immutable" in again.headers["cache-control"]
        current = httpx.get(f"{url}/zarr/{SCAN}/image/c/0/0/0", timeout=30)
        assert current.content == shard.content and "no-cache" in current.headers["cache-control"]

        newer = _republish(root, seed=7)
        assert storage.current_version(SCAN) != first
        # the pinned reader still reads its own version; the plain path the new one
        np.testing.assert_array_equal(zarr.open_array(f"{pinned}/image", mode="r")[...], truth[SCAN][0])
        np.testing.assert_array_equal(zarr.open_array(f"{url}/zarr/{SCAN}/image", mode="r")[...], newer)
        assert httpx.get(f"{pinned}/image/c/0/0/0", timeout=30).content == shard.content

        assert storage.remove_old_versions(0.0) == [f"{SCAN}/{first}"]
        for path in ("zarr.json", "image/zarr.json", "image/c/0/0/0"):
            gone = httpx.get(f"{pinned}/{path}", timeout=30)
            assert gone.status_code == 410, path
            body = gone.json()
            assert body["error"] == "VersionGone" and first in body["detail"] and SCAN in body["detail"]
            assert "/tmp" not in body["detail"] and "\n" not in body["detail"]
        with pytest.raises(Exception, match="410"):  # zarr-python fails, no array of fill values
            zarr.open_array(f"{pinned}/image", mode="r")[...]

        # names that are no version of this scan: not found (or refused), never another file
        for path, status in (
            (f"/zarr/nosuchscan@{first}/zarr.json", 410),  # no such version: never fill values
            (f"/zarr/{SCAN}@..%2F..%2Fzarr.json", 400),
            (f"/zarr/{SCAN}@.hidden/zarr.json", 404),
            (f"/zarr/{SCAN}@/zarr.json", 404),
            (f"/zarr/{SCAN}@{first}@x/zarr.json", 404),
        ):
            assert httpx.get(f"{url}{path}", timeout=30).status_code == status, path


def test_a_pinned_version_is_served_exactly_then_gone_local(tmp_path):
    _check_pinned_reads(tmp_path / "store")


def test_a_pinned_version_is_served_exactly_then_gone_s3(s3_url):
    _check_pinned_reads(s3_url)


def test_http_source_reads_the_locations_of_the_version_it_planned_with(tmp_path):
    root = tmp_path / "store"
    build_store(root, SCANS, image_only=())
    with live_server(root) as url, HttpSource(url) as source:
        meta = source.metadata(SCAN)
        locations = source.read_locations(SCAN)
        stored = zarr.open_array(str(root / SCAN / "locations"), mode="r")[...]
        np.testing.assert_array_equal(locations, stored)
        # with the row count the metadata gives (what the patch loaders pass): one request
        paths: list[str] = []
        real = source._request
        source._request = lambda method, path, **kw: paths.append(path) or real(method, path, **kw)  # type: ignore[method-assign]
        rows = sum(meta.attrs["location_counts"])
        np.testing.assert_array_equal(source.read_locations(SCAN, rows=rows), stored)
        assert paths == [f"/zarr/{SCAN}@{meta.version}/locations/c/0/0"]
        source._request = real  # type: ignore[method-assign]
        _republish(root, seed=7)
        # still the planned version's locations, as long as the store keeps it
        np.testing.assert_array_equal(source.read_locations(SCAN), stored)
        assert open_storage(root).remove_old_versions(0.0) == [f"{SCAN}/{meta.version}"]
        with pytest.raises(ScanChanged, match="no longer in the store"):
            source.read_locations(SCAN)

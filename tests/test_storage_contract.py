"""The storage conformance suite: one set of tests run against each ``Storage`` (a local folder
and an S3-compatible bucket on a real loopback server), as zarr-python's store tests are.
Documents, listings, publish/switch/unpublish, grace periods, links and pointers, hard-linked
files, the lock and tensorstore's kvstore behave alike on both.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from test_s3_store import _volume

from store.lock import StoreLocked
from store.s3 import S3Storage
from store.storage import LocalStorage, open_storage
from store.writer import write_scan

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    url = request.getfixturevalue("s3_url")
    return open_storage(url)


def _staged(tmp_path, files):
    folder = tmp_path / f"staged-{time.monotonic_ns()}"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def test_storage_documents_and_listing(storage):
    assert storage.is_empty() and not storage.exists()
    storage.write("zarr.json", b'{"a": 1}')
    storage.write("dir/sub/x", b"0123456789")
    assert storage.exists() and storage.read_json("zarr.json") == {"a": 1}
    assert storage.read("dir/sub/x") == b"0123456789"
    assert storage.read_range("dir/sub/x", 2, 5) == b"234"
    assert storage.read_size("dir/sub/x") == 10
    assert storage.read("missing") is None and storage.read_size("missing") is None
    assert storage.sizes("dir") == {"sub/x": 10}
    assert not storage.is_empty()
    storage.write("dir/sub/x", b"new")  # replaced whole
    assert storage.read("dir/sub/x") == b"new"
    storage.delete("dir/sub/x")
    storage.delete("dir/sub/x")  # idempotent
    assert storage.read("dir/sub/x") is None


def test_storage_publish_switch_unpublish_and_grace(storage, tmp_path):
    storage.write("zarr.json", b"{}")
    v1 = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"1", "image/c/0": b"abc"}))
    assert storage.current_version("scan-a") == v1
    assert storage.published_names() == ["scan-a"]
    assert storage.read(f"{storage.versions_dir}/scan-a/{v1}/image/c/0") == b"abc"
    time.sleep(0.01)
    v2 = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"2"}))
    assert v2 > v1
    if isinstance(storage, S3Storage):
        storage._pointers.clear()  # a pointer is trusted for a second
    assert storage.current_version("scan-a") == v2
    # the superseded version stays for the grace period, then goes; the current one never
    assert storage.remove_old_versions(3600) == []
    assert storage.read(f"{storage.versions_dir}/scan-a/{v1}/zarr.json") == b"1"
    assert storage.remove_old_versions(0) == [f"scan-a/{v1}"]
    assert storage.read(f"{storage.versions_dir}/scan-a/{v1}/zarr.json") is None
    assert storage.read(f"{storage.versions_dir}/scan-a/{v2}/zarr.json") == b"2"
    assert storage.unpublish("scan-a") and not storage.unpublish("scan-a")
    assert storage.published_names() == [] and storage.current_version("scan-a") is None
    assert storage.remove_old_versions(3600) == []  # unpublished an instant ago
    assert storage.remove_old_versions(0) == [f"scan-a/{v2}"]


def test_versions_of_a_scan_republished_by_every_job_are_removed_after_their_grace(storage, tmp_path):
    """A job that publishes a scan again removes old versions at its end: each version's grace
    counts from its own switch away, so the store keeps the versions of the last grace period,
    not every version ever published."""
    versions = [storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"%d" % i})) for i in range(3)]
    time.sleep(2.5)
    latest = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"3"}))
    if isinstance(storage, S3Storage):
        storage._pointers.clear()
    assert storage.current_version("scan-a") == latest
    # the first two stopped being current 2.5 s ago; the third just now, a reader may hold it
    assert storage.remove_old_versions(2.0) == [f"scan-a/{v}" for v in versions[:2]]
    assert storage.read(f"{storage.versions_dir}/scan-a/{versions[2]}/zarr.json") == b"2"
    assert storage.remove_old_versions(0) == [f"scan-a/{versions[2]}"]


def test_a_version_that_never_became_current_does_not_cut_the_grace_of_the_one_before(storage, tmp_path):
    """A publish killed before its switch leaves a version that was never current. The version
    current until the next switch keeps its whole grace period from that switch, not from the
    orphan's older time (nothing tells an orphan older than the current version from one that
    was current, so both wait); one newer than the current version goes after its own grace."""
    from store.publish import new_version_name

    v1 = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"1"}))
    orphan = new_version_name()  # uploaded, never pointed to
    storage.write(f"{storage.versions_dir}/scan-a/{orphan}/zarr.json", b"orphan")
    time.sleep(2.5)
    v3 = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"3"}))
    if isinstance(storage, S3Storage):
        storage._pointers.clear()
    assert storage.current_version("scan-a") == v3
    assert storage.remove_old_versions(2.0) == []
    assert storage.read(f"{storage.versions_dir}/scan-a/{v1}/zarr.json") == b"1"  # a reader may hold it
    assert storage.remove_old_versions(0) == [f"scan-a/{v1}", f"scan-a/{orphan}"]
    newer = new_version_name()  # a later publish killed before its switch
    storage.write(f"{storage.versions_dir}/scan-a/{newer}/zarr.json", b"newer")
    assert storage.remove_old_versions(3600) == []
    assert storage.remove_old_versions(0) == [f"scan-a/{newer}"]
    assert storage.current_version("scan-a") == v3
    assert storage.read(f"{storage.versions_dir}/scan-a/{v3}/zarr.json") == b"3"


@pytest.mark.parametrize("named", ["..", "../other", "../../other/v", ""])
def test_a_link_or_pointer_naming_anything_but_a_version_of_its_scan_is_none(storage, tmp_path, named):
    v1 = storage.publish("scan-a", _staged(tmp_path, {"zarr.json": b"1"}))
    if isinstance(storage, S3Storage):
        storage.write_json(".current/scan-a", {"version": named})
        storage._pointers.clear()
    else:
        link = storage.local_path("scan-a")  # a link's target: .versions/<scan>/<version>
        link.unlink()
        os.symlink(f".versions/scan-a/{named}", link)
    assert storage.current_version("scan-a") is None
    assert storage.read(f"{storage.versions_dir}/scan-a/{v1}/zarr.json") == b"1"


def test_storage_publishes_hard_linked_files_under_every_name(storage, tmp_path):
    """An OME view's shards are the image's files hard-linked (store/ome_views.py): both names
    read back the same bytes; object storage sends the bytes once and copies on the server."""
    folder = _staged(
        tmp_path, {"zarr.json": b"{}", "image/c/0": os.urandom(70_000), "image/zarr.json": b"{}"}
    )
    (folder / "image_zyx" / "c").mkdir(parents=True)
    os.link(folder / "image/c/0", folder / "image_zyx/c/0")
    data = (folder / "image/c/0").read_bytes()
    version = storage.publish("linked", folder)  # a local publish moves the folder
    key = storage.version_key("linked", version)
    assert storage.read(f"{key}/image_zyx/c/0") == storage.read(f"{key}/image/c/0") == data
    if isinstance(storage, S3Storage):
        assert storage.bytes_uploaded == 70_000 + 2 * len(b"{}")  # the linked file once


def test_storage_lock_is_exclusive(storage):
    storage.write("zarr.json", b"{}")
    with storage.lock():
        second = storage.lock()
        with pytest.raises(StoreLocked, match="another job is writing this store"):
            second.__enter__()
    with storage.lock():  # released
        pass


def test_storage_kvstore_reads_a_published_array(storage, tmp_path):
    import tensorstore as ts

    write_scan(storage, "0000001_V00-Aug00", *_volume((20, 18, 6), 3), {"split": "train"})
    version = storage.current_version("0000001_V00-Aug00")
    spec = {
        "driver": "zarr3",
        "kvstore": storage.kvstore(f"{storage.versions_dir}/0000001_V00-Aug00/{version}/image"),
    }
    got = ts.open(spec, read=True, open=True).result().read().result()
    np.testing.assert_array_equal(got, _volume((20, 18, 6), 3)[0])

"""A scan damaged in the store after it was written: a shard file lost (tensorstore reads a
missing chunk as its fill value, so it read as zeros) or one whose bytes no longer decode
(tensorstore's message names the file's path). Read directly or over HTTP, it is one
``ScanDamaged`` naming the scan and the repair, never zeros, a path or two minutes of retries."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import numpy as np
import pytest
from conftest import build_store
from live_server import live_server

from loaders import open_source
from store.errors import ScanDamaged

SCAN = "0000001_V00-Aug00"


@pytest.fixture
def damaged(tmp_path):
    """A store whose scan SCAN lost one image shard file and whose next scan has a corrupted one;
    returns (root, the intact third scan's id, its truth)."""
    root = tmp_path / "store"
    truth = build_store(root)
    others = sorted(s for s in truth if s != SCAN)
    lost = sorted(p for p in (root / SCAN).resolve().joinpath("image", "c").rglob("*") if p.is_file())[0]
    lost.unlink()
    bad = sorted(p for p in (root / others[0]).resolve().joinpath("image", "c").rglob("*") if p.is_file())[0]
    data = bytearray(bad.read_bytes())
    data[: len(data) // 2] = bytes(b ^ 0x5A for b in data[: len(data) // 2])  # same size, other bytes
    bad.write_bytes(bytes(data))
    return root, others[0], others[1], truth


def test_a_lost_or_corrupted_shard_is_named_when_read_directly(damaged):
    root, corrupted, intact, truth = damaged
    with open_source(root) as source:
        with pytest.raises(ScanDamaged) as lost:
            source.read_image(SCAN)
        assert str(lost.value).startswith(f"scan {SCAN!r} is damaged in the store (image/c/")
        assert f"--rebuild {SCAN}" in str(lost.value) and str(root) not in str(lost.value)
        with pytest.raises(ScanDamaged) as bad:
            source.read_image(corrupted)
        assert str(bad.value).startswith(
            f"scan {corrupted!r} is damaged in the store (its image data does not decode)"
        )
        assert str(root) not in str(bad.value)
        np.testing.assert_array_equal(source.read_image(intact), truth[intact][0])  # the others read on


def test_a_damaged_scan_over_http_is_one_500_naming_it_and_not_retried(damaged):
    root, corrupted, intact, truth = damaged
    with live_server(root) as url:
        for scan in (SCAN, corrupted):
            answer = httpx.get(f"{url}/scans/{scan}/image", params={"roi": "0:4,0:4,0:2"})
            body = answer.json()
            assert answer.status_code == 500 and body["error"] == "ScanDamaged", body
            assert body["detail"].startswith(f"scan {scan!r} is damaged in the store (")
            assert str(root) not in answer.text and "/tmp" not in answer.text
        with open_source(url) as source:
            started = time.monotonic()
            with pytest.raises(ScanDamaged, match=f"scan {SCAN!r} is damaged") as info:
                source.read_image(SCAN)
            assert time.monotonic() - started < 10 and info.value.scan_id == SCAN  # no retries
            np.testing.assert_array_equal(source.read_image(intact), truth[intact][0])


def test_an_array_whose_zarr_json_is_damaged_is_not_called_missing(tmp_path):
    root = tmp_path / "store"
    build_store(root)
    meta = (root / SCAN).resolve() / "image" / "zarr.json"
    meta.write_bytes(b"x" * meta.stat().st_size)  # same size: only opening it tells
    with open_source(root) as source, pytest.raises(ScanDamaged, match="its image array does not open"):
        source.read_image(SCAN)


def test_a_restored_file_reads_again(tmp_path):
    """A scan found intact is checked once (one listing per version): a store repaired by
    putting the file back reads exactly in a new source."""
    root = tmp_path / "store"
    truth = build_store(root)
    shard = sorted(p for p in (root / SCAN).resolve().joinpath("image", "c").rglob("*") if p.is_file())[0]
    kept = tmp_path / "kept"
    shutil.copy(shard, kept)
    shard.unlink()
    with open_source(root) as source, pytest.raises(ScanDamaged):
        source.read_image(SCAN)
    shutil.copy(kept, shard)
    with open_source(root) as source:
        np.testing.assert_array_equal(source.read_image(SCAN), truth[SCAN][0])


def test_a_shard_lost_while_a_reader_runs_is_named_not_read_as_zeros(tmp_path, monkeypatch):
    """A long-lived reader (a server, a training process) that checked the scan before the loss
    checks the array it reads again after ``intact_recheck_s`` (30 s; 1 s here): the lost part
    is named, never zeros."""
    from store.storage import LocalStorage

    monkeypatch.setattr(LocalStorage, "intact_recheck_s", 1.0)
    root = tmp_path / "store"
    truth = build_store(root)
    shard = sorted(p for p in (root / SCAN).resolve().joinpath("image", "c").rglob("*") if p.is_file())[0]
    with open_source(root) as source, live_server(root) as url:
        # the scan is checked when its mask is read; its image is not read yet (nothing cached)
        np.testing.assert_array_equal(source.read_mask(SCAN), truth[SCAN][1])
        assert httpx.get(f"{url}/scans/{SCAN}/mask").status_code == 200
        shard.unlink()
        time.sleep(LocalStorage.intact_recheck_s + 0.2)
        with pytest.raises(ScanDamaged, match=f"scan {SCAN!r} is damaged in the store"):
            source.read_image(SCAN)
        answer = httpx.get(f"{url}/scans/{SCAN}/image")
        assert answer.status_code == 500 and answer.json()["error"] == "ScanDamaged"


def test_an_array_folder_lost_under_a_long_lived_reader_is_damage_not_a_missing_scan(tmp_path, monkeypatch):
    """The re-check of one array finds none of its files: the scan is damaged (its version is
    still there), not "not found" as a removed version is."""
    from store.storage import LocalStorage

    monkeypatch.setattr(LocalStorage, "intact_recheck_s", 0.5)
    root = tmp_path / "store"
    truth = build_store(root)
    with open_source(root) as source:
        np.testing.assert_array_equal(source.read_image(SCAN), truth[SCAN][0])
        shutil.rmtree((root / SCAN).resolve() / "image")  # the array's every file
        time.sleep(0.7)
        with pytest.raises(ScanDamaged, match=f"scan {SCAN!r} is damaged in the store \\(image/"):
            source.read_image(SCAN, "0:2,0:2,0:1")


class _Failed:
    """A read's future that fails as tensorstore does, with its status first."""

    def __init__(self, message: str) -> None:
        self.message = message

    def result(self):
        raise ValueError(self.message)


@pytest.mark.parametrize(
    "message",
    [
        "ABORTED: Error reading shard entry {0, 0, 0}: retry attempts failed: HTTP 503",
        "RESOURCE_EXHAUSTED: Error reading shard entry {0, 0, 0}: Failed to open: Too many open files",
        "PERMISSION_DENIED: Error reading shard entry {0, 0, 0}: HTTP 403",
    ],
)
def test_storage_that_fails_for_now_is_not_called_damage(message):
    """An S3 hiccup or a busy server is not a damaged scan: raised as it is (a server answers a
    generic 500, which clients retry), never 'rebuild it'."""
    from store.protocol import RegionRequest
    from store.ts_status import result_or_damage

    with pytest.raises(ValueError, match=message.split(":")[0]) as info:
        result_or_damage(RegionRequest(SCAN), _Failed(message))
    assert not isinstance(info.value, ScanDamaged)
    with pytest.raises(ScanDamaged):
        result_or_damage(
            RegionRequest(SCAN), _Failed("DATA_LOSS: Error reading shard index: Digest mismatch")
        )


def test_scan_damaged_survives_a_trip_to_another_process():
    import pickle

    err = ScanDamaged(SCAN, "image/c/0/0/0 is missing")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ScanDamaged and back.scan_id == SCAN and str(back) == str(err)


def test_scans_names_a_published_scan_whose_zarr_json_is_lost(tmp_path):
    """`scancache scans` lists what it can read and names, on stderr, a published scan whose
    zarr.json is gone (it left it out in silence: "3 scans", as if it never existed)."""
    import json as json_module

    from h5_sources import run_cli

    root = tmp_path / "store"
    truth = build_store(root)
    ((root / SCAN).resolve() / "zarr.json").unlink()
    for extra in ((), ("--json",)):
        result = run_cli("scans", root, *extra)
        assert result.returncode == 0, result.stderr
        assert result.stderr == (
            f"scancache scans: warning: scan {SCAN!r} is published but its zarr.json is missing, "
            "unreadable or not a scan's (left out; scancache verify SOURCE STORE checks it)\n"
        )
        listed = (
            [r["scan_id"] for r in json_module.loads(result.stdout)["scans"]]
            if extra
            else [line.split()[0] for line in result.stdout.splitlines()[1:-1]]
        )
        assert listed == sorted(s for s in truth if s != SCAN)


def test_a_scan_whose_shape_attribute_disagrees_with_its_arrays_is_damage(tmp_path):
    """A scan's zarr.json edited (or mixed from another version) to another shape than its
    arrays: ScanDamaged naming both, locally and over HTTP (a generic 500 before)."""
    import json

    root = tmp_path / "store"
    build_store(root)
    meta = (root / SCAN).resolve() / "zarr.json"
    doc = json.loads(meta.read_text())
    stored = list(doc["attributes"]["shape"])
    doc["attributes"]["shape"] = [*stored[:2], stored[2] + 4]
    meta.write_text(json.dumps(doc))
    why = f"its image array is {tuple(stored)}, its attributes say {(*stored[:2], stored[2] + 4)}"
    with open_source(root) as source, pytest.raises(ScanDamaged, match=re.escape(why)):
        source.read_image(SCAN)
    with live_server(root) as url:
        response = httpx.get(f"{url}/scans/{SCAN}/image", params={"roi": "0:2,0:2,0:2"})
        assert response.status_code == 500 and response.json()["error"] == "ScanDamaged"
        assert why in response.json()["detail"]


def test_a_listing_that_leaves_scans_out_says_which_locally_and_over_http(tmp_path):
    """A damaged scan (its zarr.json lost, or its version folder gone under its link) is left
    out of a listing, never in silence: a loader built on the store or on a server would
    otherwise train on fewer scans without a word (over HTTP it was a line in the server's
    log, or nothing)."""
    from store.errors import ScanListWarning

    root = tmp_path / "store"
    truth = build_store(root)
    others = sorted(s for s in truth if s != SCAN)
    ((root / SCAN).resolve() / "zarr.json").unlink()
    shutil.rmtree((root / others[0]).resolve())
    bad, good = sorted([SCAN, others[0]]), others[1:]
    pattern = rf"2 scans left out, damaged or unreadable: {bad[0]}.*{bad[1]}"
    with open_source(root) as source, pytest.warns(ScanListWarning, match=pattern):
        assert [m.scan_id for m in source.list_scans()] == good
    with live_server(root) as url:
        body = httpx.get(f"{url}/scans").json()
        assert [d["scan_id"] for d in body["scans"]] == good and body["skipped"] == bad
        assert str(root) not in str(body)
        with open_source(url) as source, pytest.warns(ScanListWarning, match=pattern):
            assert [m.scan_id for m in source.list_scans()] == good

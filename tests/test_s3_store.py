"""A store on S3-compatible object storage, against a real server on loopback (SeaweedFS).

The storage conformance suite (local and S3 alike) is tests/test_storage_contract.py. Here: the
job (CLI, local cluster), kill and resume, verify, scans, the lock, readers, the server and
the loaders on ``s3://BUCKET/PREFIX``, checked exactly against numpy and plain zarr-python.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_SCANS, build_store
from h5_sources import run_cli
from s3_reading import assert_s3_store_matches, current_version, open_scan_group, published_s3
from test_resume import _kill_tree

from service.sample_data import write_sample_data
from store.errors import ScanChanged
from store.s3 import S3Storage, StoreUnavailable
from store.source import LocalSource
from store.storage import open_storage
from store.writer import write_scan

pytestmark = pytest.mark.timeout(600)


def _volume(shape, classes, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, size=shape).astype(np.float32)
    labels = rng.integers(-1, classes, size=shape)
    return image, np.stack([labels == k for k in range(classes)], -1).astype(np.uint8)


# -- the job, verify, scans ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3src") / "source"
    write_sample_data(root, subjects=3, visits=2, shape=(24, 20, 6), num_classes=2, seed=5)
    return root


def test_preprocess_verify_and_scans_on_s3(source, s3_url):
    result = run_cli(
        "preprocess", source, s3_url, "--workers", "2", "--chunks", "8,8,2", "--shard-depth", "4"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scans: 6 converted, 0 skipped, 0 failed" in result.stdout
    assert_s3_store_matches(s3_url, source)  # plain zarr-python, as docs/store-format.md says
    again = run_cli("preprocess", source, s3_url, "--workers", "1", "--chunks", "8,8,2", "--shard-depth", "4")
    assert "scans: 0 converted, 6 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    verify = run_cli("verify", source, s3_url)
    assert verify.returncode == 0 and "verify: 6 ok; store is exact" in verify.stdout, verify.stdout
    listing = run_cli("scans", s3_url, "--json")
    assert listing.returncode == 0, listing.stderr
    assert [row["scan_id"] for row in json.loads(listing.stdout)["scans"]] == published_s3(s3_url)
    # nothing but the store under the prefix: no staging, no lock left behind
    storage = open_storage(s3_url)
    # each scan's size is what its version's objects hold on S3 (OME views' copies included)
    for row in json.loads(listing.stdout)["scans"]:
        folder = storage.version_key(row["scan_id"], current_version(s3_url, row["scan_id"]))
        stored = storage.sizes(folder)
        assert row["bytes"] == sum(n for key, n in stored.items() if key != "zarr.json"), row["scan_id"]
    assert storage.read(".lock") is None
    assert not [k for k in storage.sizes("") if k.startswith(".staging")]


def test_verify_catches_a_damaged_object(source, s3_url):
    assert run_cli("preprocess", source, s3_url, "--workers", "1", "-q").returncode == 0
    storage = open_storage(s3_url)
    version = current_version(s3_url, "0000001_V00-Aug00")
    key = f"{storage.versions_dir}/0000001_V00-Aug00/{version}/image/c/0/0/0"
    storage.write(key, (storage.read(key) or b"")[:-7])
    result = run_cli("verify", source, s3_url)
    assert result.returncode == 1
    assert "TORN     0000001_V00-Aug00: image/c/0/0/0 has " in result.stdout, result.stdout
    # the next job converts it again
    again = run_cli("preprocess", source, s3_url, "--workers", "1")
    assert "scans: 1 converted, 5 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    assert run_cli("verify", source, s3_url).returncode == 0


SCANS = 24


def test_sigkill_then_rerun_completes_on_s3(tmp_path, s3_url):
    source = tmp_path / "source"
    write_sample_data(source, subjects=SCANS // 2, visits=2, shape=(32, 32, 6), num_classes=2, seed=3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "preprocess", str(source), s3_url, "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if published_s3(s3_url):
                    break
            except Exception:  # the bucket's first objects are still being written
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        _kill_tree(proc)
    done = published_s3(s3_url)
    assert len(done) >= 1, "the job published nothing before it was killed"
    assert_s3_store_matches(s3_url, source, only=done)  # every scan a reader sees is whole
    # the killed job's lock names a dead pid of this host: the next job takes it over
    rerun = run_cli("preprocess", source, s3_url, "--workers", "2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"scans: {SCANS - len(done)} converted, {len(done)} skipped, 0 failed" in rerun.stdout
    assert len(published_s3(s3_url)) == SCANS
    assert run_cli("verify", source, s3_url).returncode == 0
    assert_s3_store_matches(s3_url, source)


def test_a_second_job_fails_at_once_and_a_stale_lock_is_taken_over(source, s3_url, monkeypatch):
    storage = open_storage(s3_url)
    assert run_cli("preprocess", source, s3_url, "--workers", "1", "-q").returncode == 0
    holder = {"host": "another-host", "pid": 1, "started": time.time(), "token": "x"}
    storage.write(".lock", json.dumps(holder).encode())
    result = run_cli("preprocess", source, s3_url, "--workers", "1")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"scancache preprocess: error: {s3_url}: another job is writing this store")
    assert "another-host" in line
    # a lock not renewed for longer than SCANCACHE_LOCK_STALE_S is a gone job's
    time.sleep(2.1)
    result = run_cli("preprocess", source, s3_url, "--workers", "1", env={"SCANCACHE_LOCK_STALE_S": "1"})
    assert result.returncode == 0, result.stderr
    assert "took over the lock of a job that has not renewed it for " in result.stderr
    assert "(pid 1 on another-host" in result.stderr
    assert storage.read(".lock") is None
    # a lock of this host's live process is its, however late its heartbeat
    alive = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": "y"}
    storage.write(".lock", json.dumps(alive).encode())
    time.sleep(1.1)
    result = run_cli("preprocess", source, s3_url, "--workers", "1", env={"SCANCACHE_LOCK_STALE_S": "1"})
    assert result.returncode == 1 and "another job is writing this store" in result.stderr, result.stderr
    storage.delete(".lock")


def test_a_job_whose_lock_is_taken_over_stops_with_one_line(source, s3_url):
    """A job judged gone (its heartbeat late: a paused node) whose lock another job took over
    stops publishing and removing, and says so; it never exits 0."""
    storage = open_storage(s3_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "preprocess", str(source), s3_url, "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SCANCACHE_LOCK_HEARTBEAT_S": "0.2"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while storage.read(".lock") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        thief = {"host": "another-host", "pid": 1, "started": time.time(), "token": "thief"}
        storage.write(".lock", json.dumps(thief).encode())  # another job took it over
        out, err = proc.communicate(timeout=180)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 1, out + err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"scancache preprocess: error: {s3_url}: another job took over this job's lock")
    )
    assert json.loads(storage.read(".lock") or b"{}").get("token") == "thief"  # the other's, left
    assert_s3_store_matches(s3_url, source, only=published_s3(s3_url))  # what it published is whole


def test_bad_object_storage_is_one_line(source, s3_server, tmp_path):
    missing = run_cli("preprocess", source, "s3://no-such-bucket-here/store")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "scancache preprocess: error: s3://no-such-bucket-here/store: bucket 'no-such-bucket-here' does not exist"
        " (create it first, e.g. aws s3 mb s3://BUCKET; scancache does not make buckets)"
    )
    url = s3_server.new_url()
    wrong = run_cli("scans", url, env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert f"{url}: access denied" in wrong.stderr
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = run_cli("scans", url, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stderr
    assert f"cannot reach the endpoint http://127.0.0.1:{port}" in down.stderr
    bad = run_cli("scans", "s3://Bad_Bucket/x")
    assert bad.returncode == 1 and "'Bad_Bucket' is not a valid S3 bucket name" in bad.stderr


# -- readers: LocalSource, loaders, predictions, the server -------------------------------------
@pytest.fixture(scope="module")
def s3_store(s3_server):
    url = s3_server.new_url("readers")
    truth = build_store(url)
    return url, truth


READ_WITH_FILES = """
import hashlib, sys
from store.source import LocalSource
source = LocalSource(sys.argv[1])
for scan_id in source.scan_ids():
    print(scan_id, hashlib.sha256(source.read_image(scan_id).tobytes()).hexdigest())
"""


@pytest.mark.parametrize("where", ["profile", "default", "config-only"])
def test_credentials_from_the_shared_files_read_voxels_too(s3_store, s3_server, tmp_path, where):
    """Keys in ~/.aws (AWS_PROFILE's, the default profile's, or a profile of the config file
    alone) and the endpoint in the profile: listings (boto3) and voxels (tensorstore) alike."""
    import hashlib
    import os

    from benchmarks.s3_server import ACCESS_KEY, SECRET_KEY

    url, truth = s3_store
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    keys = f"aws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    section = "default" if where == "default" else "lab"
    config = f"[{'default' if where == 'default' else 'profile lab'}]\nendpoint_url = {s3_server.endpoint}\n"
    config += "region = us-east-1\n" + (keys if where == "config-only" else "")
    (home / ".aws" / "config").write_text(config)
    if where != "config-only":
        (home / ".aws" / "credentials").write_text(f"[{section}]\n{keys}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true")
    if where != "default":
        env["AWS_PROFILE"] = "lab"
    out = subprocess.run(
        [sys.executable, "-c", READ_WITH_FILES, url], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    want = {s: hashlib.sha256(image.tobytes()).hexdigest() for s, (image, _) in truth.items()}
    assert dict(line.split() for line in out.stdout.splitlines()) == want


def test_local_source_reads_s3_exactly_and_follows_a_republish(s3_store, s3_server):
    url, truth = s3_store
    source = LocalSource(url)
    assert source.scan_ids() == sorted(truth)
    for scan_id, (image, mask) in truth.items():
        np.testing.assert_array_equal(source.read_image(scan_id), image)
        np.testing.assert_array_equal(
            source.read_image(scan_id, (slice(3, 9), slice(None), slice(2, 3))), image[3:9, :, 2:3]
        )
        if mask is not None:
            np.testing.assert_array_equal(source.read_mask(scan_id), mask)
    # a republish under a reader: the next call (after the pointer's second) reads the new one
    other = s3_server.new_url("republish")
    build_store(other, scans=SMALL_SCANS[:1])
    reader = LocalSource(other)
    first = reader.read_image("0000001_V00-Aug00")
    new_image = np.full_like(first, 3.0)
    write_scan(other, "0000001_V00-Aug00", new_image, None, {"split": "train"})
    time.sleep(1.1)
    np.testing.assert_array_equal(reader.read_image("0000001_V00-Aug00"), new_image)


def _s3_reads() -> float:
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/read")
    return sum(v.get("value", 0) for m in metrics for v in m.get("values", []))


def test_cached_chunks_cost_no_request(s3_store):
    # A published version never changes, so what the chunk cache holds is not revalidated:
    # tensorstore's default would send one conditional request per shard on every read.
    url, truth = s3_store
    source = LocalSource(url, cache_bytes=64 << 20)
    scan_id = sorted(truth)[0]
    roi = (slice(2, 10), slice(None), slice(1, 4))
    first = source.read_image(scan_id, roi)
    before = _s3_reads()
    for _ in range(3):
        np.testing.assert_array_equal(source.read_image(scan_id, roi), truth[scan_id][0][roi])
    assert _s3_reads() == before
    np.testing.assert_array_equal(first, truth[scan_id][0][roi])


def _reference_y(mask):
    """CATEGORIES (0, (1, 2), 3) with background first, from the numpy mask (classes disjoint)."""
    channels = [mask[..., 0], mask[..., [1, 2]].sum(-1), mask[..., 3]]
    y = np.stack(channels, -1).astype(np.float32)
    return np.concatenate([(y.sum(-1, keepdims=True) == 0).astype(np.float32), y], -1)


def test_loader_over_s3_gives_the_numpy_batches_and_predictions_go_to_s3(s3_store, s3_server):
    from loaders import Config, DatasetCatalog, build_loader, write_predictions
    from store.predictions import PredictionStore

    url, truth = s3_store
    DatasetCatalog.remove("s3_train")
    DatasetCatalog.register("s3_train", url, split="train")
    try:
        cfg = Config(SEED=3, CATEGORIES=(0, (1, 2), 3), INCLUDE_BACKGROUND=True)
        loader = build_loader(cfg, "s3_train", batch_size=5, is_test=False, shuffle=False, drop_last=False)
        train = [s for s, *_rest in SMALL_SCANS if _rest[2] == "train"]
        slices = [(s, z) for s in train for z in range(truth[s][0].shape[2])]
        assert len(loader) == math.ceil(len(slices) / 5)
        for b in range(len(loader)):
            x, y = loader[b]
            chunk = slices[b * 5 : (b + 1) * 5]
            np.testing.assert_array_equal(x, np.stack([truth[s][0][:, :, z, None] for s, z in chunk]))
            y_ref = np.stack([_reference_y(truth[s][1][:, :, z]) for s, z in chunk])
            np.testing.assert_array_equal(y, y_ref)
        pred_url = s3_server.new_url("pred")
        test_loader = build_loader(
            Config(CATEGORIES=(1, 3)), "s3_train", batch_size=4, is_test=True, shuffle=False, drop_last=False
        )
        summary = write_predictions(
            test_loader, lambda x: np.concatenate([x * 0 + 0.25, x * 0 + 0.75], -1), pred_url
        )
        assert sorted(summary.written) == sorted(train)
        store = PredictionStore(pred_url)
        assert store.scan_ids() == sorted(train)
        for scan_id in train:
            shape = truth[scan_id][0].shape
            labels = store.read(scan_id, "label_map", tuple(slice(0, n) for n in shape))
            np.testing.assert_array_equal(labels, np.full(shape, 2, np.uint8))  # argmax: category 1 -> 2
    finally:
        DatasetCatalog.remove("s3_train")


def test_profile_runs_a_patch_loader_on_s3(s3_store, capsys):
    """``scancache profile s3://...``: a real patch loader on the bucket, its figures and a why
    that knows the store is on object storage."""
    from service.cli import main

    url, _ = s3_store
    args = ["profile", url, "--tag", "RandomPatchDataLoader", "--img-size", "8,8,4,1", "--seconds", "0.3"]
    assert main([*args, "--batch-size", "2", "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["object_storage"] is True and result["batches"] >= 1
    assert result["stats"]["bytes_delivered"] > 0


def test_server_over_s3_serves_regions_and_the_zarr_tree(s3_store):
    import httpx
    import zarr
    from live_server import live_server

    url, truth = s3_store
    with live_server(url) as base:
        listing = httpx.get(f"{base}/scans", timeout=30).json()
        assert sorted(s["scan_id"] for s in listing["scans"]) == sorted(truth)
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        scan_id = "0000002_V00-Aug00"
        image, mask = truth[scan_id]
        from client.http import HttpSource

        remote = HttpSource(base)
        np.testing.assert_array_equal(
            remote.read_image(scan_id, (slice(2, 30), slice(None), slice(1, 4))), image[2:30, :, 1:4]
        )
        np.testing.assert_array_equal(remote.read_mask(scan_id), mask)
        remote.close()
        # the store as Zarr over HTTP: plain zarr-python reads the current version
        served = zarr.open_array(f"{base}/zarr/{scan_id}/image", mode="r")
        np.testing.assert_array_equal(served[...], image)
        # and from the root group, as the user guide opens it
        root = zarr.open_group(f"{base}/zarr/", mode="r")
        np.testing.assert_array_equal(root[scan_id]["image"][...], image)
        assert httpx.head(f"{base}/zarr/zarr.json", timeout=10).status_code == 200
        assert httpx.get(f"{base}/zarr/.lock", timeout=10).status_code in (400, 404)
        hidden = f"{base}/zarr/.scan-versions/{scan_id}/{current_version(url, scan_id)}/zarr.json"
        assert httpx.get(hidden, timeout=10).status_code in (400, 404)


def test_plain_reader_finds_the_current_version_as_documented(s3_store):
    url, truth = s3_store
    for scan_id in published_s3(url):
        group = open_scan_group(url, scan_id)
        np.testing.assert_array_equal(group["image"][...], truth[scan_id][0])


def test_storages_pickle_for_dask_workers(s3_url):
    import pickle

    storage = open_storage(s3_url)
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.url == storage.url and copy.read("zarr.json") is None


def _read_many(storage, keys, rounds, out):
    """Read every key ``rounds`` times; put how many answers differed from the first one's."""
    first = {k: storage.read(k) for k in keys}
    wrong = sum(storage.read(k) != first[k] for _ in range(rounds) for k in keys)
    out.put((wrong, sorted(k for k, v in first.items() if v is None)))


def test_a_forked_process_reads_through_its_own_connections(s3_store):
    """A torch DataLoader forks its workers after the training process has read the store: a
    child that used the parent's pooled connections would get answers meant for the parent
    (another object's body, checksum errors). Parent and child read the same objects at once."""
    import multiprocessing

    url, truth = s3_store
    storage = open_storage(url)
    keys = ["zarr.json", *(f".current/{scan_id}" for scan_id in truth)]
    assert all(storage.read(k) is not None for k in keys)  # the parent's pool holds connections
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_read_many, args=(storage, keys, 100, out))
    child.start()
    _read_many(storage, keys, 100, out)
    results = [out.get(timeout=120) for _ in range(2)]
    child.join(timeout=60)
    assert child.exitcode == 0
    assert results == [(0, []), (0, [])]
    assert open_storage(url) is storage  # this process keeps its own


def test_an_unreachable_store_is_not_a_traceback_in_python(s3_server):
    with pytest.raises(StoreUnavailable, match="bucket 'no-bucket-x' does not exist"):
        LocalSource("s3://no-bucket-x/store")


@pytest.fixture
def plain_http_server(tmp_path):
    """A real HTTP server on loopback that is no S3 API (as a SeaweedFS filer port would be): a
    static file server of an empty folder, answering 404 to everything."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_endpoint_that_is_no_s3_api_is_named_not_taken_for_a_missing_store(
    s3_server, plain_http_server, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", plain_http_server)
    storage = S3Storage("lab", "knee")
    why = f"s3://lab/knee: the endpoint {plain_http_server} answers HTTP 404 without an S3 error: it is not an S3 API (check AWS_ENDPOINT_URL)"
    for attempt in (storage.check_bucket, lambda: storage.read("zarr.json")):
        with pytest.raises(StoreUnavailable) as info:
            attempt()
        assert str(info.value) == why


def test_s3_settings_errors_name_the_store_and_the_setting(s3_server, monkeypatch):
    """A look-alike URL, credentials in the URL, an unknown profile and an endpoint without its
    scheme: each one line naming the store and what to change, no secret repeated."""
    from store.storage import parse_location

    with pytest.raises(
        ValueError,
        match=r"^S3://lab/knee: an S3 store is written s3://BUCKET/PREFIX \(did you mean s3://lab/knee\?\)$",
    ):
        open_storage("S3://lab/knee")
    with pytest.raises(ValueError, match=r"did you mean s3://lab/x\?"):
        parse_location("s3:/lab/x")
    with pytest.raises(ValueError) as info:
        open_storage("s3://key:secret-XYZ@lab/knee")
    assert "secret-XYZ" not in str(info.value) and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(
        info.value
    )
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(
        StoreUnavailable, match=r"^s3://lab/knee: AWS_PROFILE 'nosuch' is not in the AWS config files$"
    ):
        S3Storage("lab", "knee")
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:18333")
    with pytest.raises(
        StoreUnavailable,
        match=r"AWS_ENDPOINT_URL '127.0.0.1:18333' is not a URL \(it starts with http:// or https://\)",
    ):
        S3Storage("lab", "knee")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:pw-XYZ@127.0.0.1:1")
    with pytest.raises(StoreUnavailable) as unreachable:
        S3Storage("lab", "knee").check_bucket()
    assert "pw-XYZ" not in str(unreachable.value) and "http://***@127.0.0.1:1" in str(unreachable.value)
    # a password holding "@" or "/", a URL botocore quotes mid-message, a query, a value that is no URL
    for endpoint in (
        "http://user:p@ss-XYZ@127.0.0.1:1",
        "http://user:pa/ss-XYZ@127.0.0.1:1",
        "ftp://user:pw-XYZ@127.0.0.1:1",
        "http://127.0.0.1:1/?token=XYZ",
        "user:pw-XYZ@127.0.0.1:1",
    ):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(StoreUnavailable) as refused:
            S3Storage("lab", "knee").check_bucket()
        message = str(refused.value)
        assert "XYZ" not in message and message.startswith("s3://lab/knee: ") and "\n" not in message, (
            endpoint
        )


def test_local_storage_is_unchanged_on_disk(tmp_path):
    root = tmp_path / "store"
    build_store(root, scans=SMALL_SCANS[:1])
    assert (root / "0000001_V00-Aug00").is_symlink()
    assert Path(root / "0000001_V00-Aug00").resolve().parent.parent.name == ".versions"


def test_two_servers_over_one_s3_store_agree_and_never_show_a_partial_scan(s3_server):
    """Scale-out: two servers share nothing but the bucket; a job re-publishing a scan while they
    serve shows each reader the old scan or the new one, whole."""
    import threading

    import httpx
    from live_server import live_server

    from client.http import HttpSource

    url = s3_server.new_url("scaleout")
    build_store(url, scans=SMALL_SCANS[:2])
    scan_id = SMALL_SCANS[0][0]
    shape = SMALL_SCANS[0][1]
    versions = [np.full(shape, float(v), np.float32) for v in range(1, 4)]
    with live_server(url) as first, live_server(url) as second:
        a, b = (httpx.get(f"{u}/scans", timeout=30).json() for u in (first, second))
        assert a == b and len(a["scans"]) == 2
        stop = threading.Event()

        def publish() -> None:
            while not stop.is_set():
                for image in versions:
                    write_scan(url, scan_id, image, None, {"split": "train"})

        writer = threading.Thread(target=publish, daemon=True)
        writer.start()
        seen = set()
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                for base in (first, second):
                    # a fresh reader each time: one reader that saw a version refuses another
                    # (ScanChanged); a new one reads whichever is current, whole
                    client = HttpSource(base)
                    try:
                        got = client.read_image(scan_id)
                    except ScanChanged:  # published between its metadata and its voxels: said so
                        continue
                    except Exception as err:  # a scan is never missing while re-published
                        pytest.fail(f"read failed during a publish: {err}")
                    finally:
                        client.close()
                    values = np.unique(got)
                    if values.size == 1 and float(values[0]) in (1.0, 2.0, 3.0):
                        seen.add(float(values[0]))
                    else:  # the first version (random) is allowed only whole
                        assert got.shape == shape
                        np.testing.assert_array_equal(got, build_store_truth_first(shape))
        finally:
            stop.set()
            writer.join(timeout=60)
        assert seen, "no republished version was ever read"


def build_store_truth_first(shape):
    from conftest import make_volume

    return make_volume(shape, SMALL_SCANS[0][2], seed=0, dtype=SMALL_SCANS[0][7])[0]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:p@ss@127.0.0.1:1/x", "http://***@127.0.0.1:1/x"),  # "@" in a password
        ("http://user:pa/ss@127.0.0.1:1", "http://***@127.0.0.1:1"),  # "/" in a password
        ("endpoint `ftp://user:pw@h:1` is no URI", "endpoint `ftp://***@h:1` is no URI"),
        ("http://127.0.0.1:1/?token=T&sig=S", "http://127.0.0.1:1/?***"),
        ("s3://bucket/key@v", "s3://bucket/key@v"),  # no user information: the bucket stays
        ("s3://KEY:SECRET@bucket/p", "s3://***@bucket/p"),
        ("plain text, no URL", "plain text, no URL"),
    ],
)
def test_messages_show_urls_without_their_secrets(text, shown):
    from store.s3_errors import without_secrets

    assert without_secrets(text) == shown
    assert without_secrets("a" * 200_000) == "a" * 200_000  # linear: no rescans of a long run


def test_an_endpoint_gone_while_serving_is_a_503_to_retry_not_a_500(tmp_path, monkeypatch, s3_server):
    """Object storage down under a running server: its scan and /zarr/ routes answer 503 with
    Retry-After (docs/rest-api.md), as /health does, not 500 with a traceback in the log."""
    import httpx
    from live_server import live_server

    from benchmarks.s3_server import running_s3_server

    with running_s3_server(tmp_path / "own") as own:
        for key, value in own.env().items():
            monkeypatch.setenv(key, value)
        own.bucket = own.new_bucket("gone")
        url = own.new_url("gone")
        truth = build_store(url, scans=SMALL_SCANS[:1])
        scan_id = next(iter(truth))
        with live_server(url) as base:
            assert httpx.get(f"{base}/scans/{scan_id}", timeout=30).status_code == 200
            own.process.kill()
            own.process.wait()
            time.sleep(1.2)  # past the pointer's second of trust
            for path in (f"/scans/{scan_id}", f"/zarr/{scan_id}/image/zarr.json"):
                response = httpx.get(base + path, timeout=120)
                assert response.status_code == 503, (path, response.text)
                assert response.json()["detail"].startswith("store unavailable")
                assert response.headers["retry-after"] == "5"


def test_a_refused_heartbeat_while_the_lock_still_names_the_job_is_no_takeover(s3_url, monkeypatch):
    """A rewrite that succeeded but whose answer was lost is retried with the old ETag (412):
    the object still names this job, which keeps its lock; another job's token loses it."""
    monkeypatch.setenv("SCANCACHE_LOCK_HEARTBEAT_S", "0.1")
    storage = open_storage(s3_url)
    storage.write("zarr.json", b"{}")
    with storage.lock() as lock:
        lock.etag = '"an-etag-of-a-rewrite-whose-answer-was-lost"'
        time.sleep(0.6)
        assert not lock.lost and lock.etag != '"an-etag-of-a-rewrite-whose-answer-was-lost"'
        thief = {"host": "another-host", "pid": 1, "started": time.time(), "token": "thief"}
        storage.write(".lock", json.dumps(thief).encode())
        time.sleep(0.6)
        assert lock.lost
    assert json.loads(storage.read(".lock") or b"{}")["token"] == "thief"  # the other's, left
    storage.delete(".lock")
    with storage.lock() as lock:  # a lock gone (the other job released it) is lost too
        storage.delete(".lock")
        time.sleep(0.6)
        assert lock.lost

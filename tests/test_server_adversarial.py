"""Issue 11's adversarial requests against a real uvicorn server: each answered with a 4xx or
the RFC's behaviour, never a 5xx, never a response built from an amplified request."""

from __future__ import annotations

import http.client
import io
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from live_server import live_server

SCAN = "0000001_V00-Aug00"  # (40, 36, 12) float32, 4 classes


@pytest.fixture(scope="module")
def url(small_store):
    with live_server(small_store[0]) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def raw(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


@pytest.mark.parametrize(
    "categories",
    ["[" + ",".join(["0"] * 3000) + "]", "[0,0]", "[[0,1],[1,0]]", "[0,1,2,3,0]", "[[1,1]]"],
)
def test_repeated_or_excessive_categories_are_refused(client, categories):
    """The same category twice (a channel repeated: a short URL asking for a response many
    times the scan's size), or a class twice in one category."""
    response = client.get(f"/scans/{SCAN}/mask", params={"categories": categories})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["param"] == "categories" and body["error"] == "InvalidCategories"
    assert "\n" not in body["detail"]


@pytest.mark.parametrize("categories", ["[0,[0,1]]", "[[1,2],[2,3]]"])
def test_overlapping_categories_are_regions_of_their_own(client, categories):
    response = client.get(f"/scans/{SCAN}/mask", params={"categories": categories})
    assert response.status_code == 200, response.text


def test_batch_categories_are_refused_with_the_region_named(client):
    region = {"scan_id": SCAN, "array": "mask", "roi": "0:4,0:4,0", "categories": [1, 1]}
    response = client.post("/batch", json={"regions": [region]})
    assert response.status_code == 422 and response.json()["param"] == "regions[0].categories"


@pytest.mark.parametrize(
    "roi", ["1_0:2_0", "\u00b9:\u00b2", "\u0661:\u0662", "0:" + "9" * 5000, "+-1:2", "0x1:4"]
)
def test_roi_integers_are_ascii_only(client, roi):
    response = client.get(f"/scans/{SCAN}/image", params={"roi": roi})
    assert response.status_code == 422, response.text
    assert response.json()["param"] == "roi"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=\u00b2-",
        "bytes=-\u00b2",
        "bytes=" + "9" * 5000 + "-",
        "bytes=0-" + "9" * 5000,
        "bytes=1_0-20",
        "bytes=\u0661-",
        "bytes= -",
        "bytes=5-2",
        "items=0-1",
    ],
)
def test_unreadable_ranges_are_ignored(url, small_store, header):
    expected = (small_store[0] / "zarr.json").read_bytes()
    # http.client sends header values as latin-1: encode non-latin text as UTF-8 bytes ourselves
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("GET", "/zarr/zarr.json")
    conn.putheader("Range", header.encode("utf-8"))
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200 and body == expected


@pytest.mark.parametrize(
    "path",
    [
        "/health",
        "/scans",
        f"/scans/{SCAN}",
        f"/scans/{SCAN}/image?roi=0:4,0:4,0",
        f"/scans/{SCAN}/mask?roi=0:4,0:4,0",
        "/zarr/zarr.json",
        "/metrics",
    ],
)
def test_head_is_answered_wherever_get_is(client, url, path):
    get = raw(url, "GET", path)
    head = raw(url, "HEAD", path, {"Range": "bytes=0-3"})
    assert get.status == 200 and head.status == 200
    for name in ("content-type",) if path == "/metrics" else ("content-length", "content-type", "etag"):
        assert head.getheader(name) == get.getheader(name), name


def test_head_with_range_on_a_shard_is_200_with_the_whole_size(client, url, small_store):
    shard = next(
        p for p in (small_store[0] / SCAN / "image").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    path = "/zarr/" + shard.relative_to(small_store[0]).as_posix()
    head = raw(url, "HEAD", path, {"Range": "bytes=0-3"})
    assert head.status == 200 and int(head.getheader("content-length")) == shard.stat().st_size
    got = client.get(path, headers={"Range": "bytes=0-3"})
    assert got.status_code == 206 and got.content == shard.read_bytes()[:4]


def test_a_valid_region_still_reads_exactly(client, small_store):
    response = client.get(f"/scans/{SCAN}/mask", params={"roi": "0:8,0:8,3", "categories": "[3,[0,2]]"})
    mask = small_store[1][SCAN][1][0:8, 0:8, 3:4]
    expected = np.stack([mask[..., 3], mask[..., 0] + mask[..., 2]], axis=-1)
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), expected)


def test_zarr_tree_follows_scan_links_but_never_leaves_the_scan_version(tmp_path):
    from conftest import build_store

    root, outside = tmp_path / "store", tmp_path / "outside"
    build_store(
        root, scans=[("0000001_V00-Aug00", (8, 8, 4), 2, "train", 1, 0, 0, np.float32)], image_only=()
    )
    outside.mkdir()
    (outside / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (outside / "secret").write_text("TOP-SECRET-CONTENT")
    version = (root / SCAN).resolve()
    assert version.parent.name == SCAN and version.parent.parent.name == ".versions"
    # links a damaged or hostile store could hold: to outside, to staging, inside a version
    (root / "0000002_V00-Aug00").symlink_to(outside)
    staged = root / ".staging" / "job-1" / "0000003_V00-Aug00"
    staged.mkdir(parents=True)
    (staged / "zarr.json").write_text("{}")
    (root / "0000003_V00-Aug00").symlink_to(Path(".staging/job-1/0000003_V00-Aug00"))
    (version / "image" / "leak").symlink_to(outside / "secret")
    (version / "image" / "lock").symlink_to(Path("../../../../.lock"))
    (root / ".lock").write_text("{}")
    shard = next(
        p
        for p in (version / "image").rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != "zarr.json"
    )
    with live_server(root) as base, httpx.Client(base_url=base, timeout=30) as client:
        served = client.get("/zarr/" + SCAN + "/" + shard.relative_to(version).as_posix())
        assert served.status_code == 200 and served.content == shard.read_bytes()
        assert client.get(f"/zarr/{SCAN}/zarr.json").json()["attributes"]["scan_id"] == SCAN
        for path in (
            "0000002_V00-Aug00/zarr.json",
            "0000002_V00-Aug00/secret",
            "0000003_V00-Aug00/zarr.json",
            f"{SCAN}/image/leak",
            f"{SCAN}/image/lock",
            ".lock",
            ".staging/job-1/0000003_V00-Aug00/zarr.json",
            f".versions/{SCAN}/{version.name}/zarr.json",
        ):
            response = client.get(f"/zarr/{path}")
            assert response.status_code == 404, path
            assert "TOP-SECRET" not in response.text and str(tmp_path) not in response.text


def test_listing_survives_damaged_and_non_finite_metadata(tmp_path, caplog):
    import json
    import logging

    from conftest import build_store

    root = tmp_path / "store"
    scans = [(f"000000{i}_V00-Aug00", (8, 8, 3), 2, "train", i, 0, 0, np.float32) for i in (1, 2, 3)]
    build_store(root, scans=scans, image_only=())
    nan_doc = (root / "0000001_V00-Aug00" / "zarr.json").resolve()
    doc = json.loads(nan_doc.read_text())
    doc["attributes"].update(mean=float("nan"), std=float("inf"), percentiles=[1.0, float("-inf")])
    nan_doc.write_text(json.dumps(doc))  # Python writes NaN/Infinity: not strict JSON
    (root / "0000002_V00-Aug00" / "zarr.json").resolve().write_text("{ damaged")
    with (
        caplog.at_level(logging.WARNING, logger="scancache.server"),
        live_server(root) as base,
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        listing = client.get("/scans")
        assert listing.status_code == 200
        strict = json.loads(listing.text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
        assert [s["scan_id"] for s in strict["scans"]] == ["0000001_V00-Aug00", "0000003_V00-Aug00"]
        one = client.get("/scans/0000001_V00-Aug00")
        assert one.status_code == 200
        attrs = json.loads(one.text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
        assert attrs["mean"] is None and attrs["std"] is None and attrs["percentiles"] == [1.0, None]
        damaged = client.get("/scans/0000002_V00-Aug00")
        assert damaged.status_code == 500 and damaged.json()["error"] == "ScanDamaged"
    assert any("skipped scan 0000002_V00-Aug00" in r.getMessage() for r in caplog.records)


def test_half_open_connections_are_closed_after_the_header_timeout(small_store):
    import socket
    import time

    with live_server(small_store[0], header_timeout=1.0) as base:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        conns = []
        for i in range(300):
            sock = socket.create_connection((host, port), timeout=10)
            if i % 2:  # half send a partial request, half nothing at all
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            conns.append(sock)
        healthy = raw(base, "GET", "/health")  # others are still served meanwhile
        assert healthy.status == 200
        deadline = time.monotonic() + 30
        closed = 0
        for sock in conns:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += sock.recv(1) == b""
            except OSError:
                pass
            finally:
                sock.close()
        assert closed == 300
        # a request whose headers arrive in time is answered as usual, on a kept-alive connection
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(2):
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status":"ok"}'
        conn.close()


def test_requests_whose_body_never_arrives_are_closed_after_the_header_timeout(small_store):
    import json
    import socket
    import time

    body = json.dumps({"regions": [{"scan_id": SCAN, "roi": "0:2,0:2,0"}]}).encode()
    head = f"POST /batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with live_server(small_store[0], header_timeout=1.0) as base:
        address = (urlsplit(base).hostname, urlsplit(base).port)
        stalled = []
        for sent in (b"", body[:10]):  # headers and nothing, headers and part of the body
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(head.encode() + sent)
            stalled.append(sock)
        # a body that arrives a moment after its headers (within the deadline) is answered,
        # and the kept-alive connection serves the next request too
        slow = socket.create_connection(address, timeout=10)
        slow.sendall(head.encode())
        time.sleep(0.4)
        slow.sendall(body + head.encode() + body)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2:
            chunk = slow.recv(65536)
            assert chunk, answers
            answers += chunk
        slow.close()
        started = time.monotonic()
        for sock in stalled:
            try:
                assert sock.recv(1) == b""  # closed by the server, without an answer
            except ConnectionResetError:
                pass
            finally:
                sock.close()
        assert time.monotonic() - started < 5


def test_oversized_headers_are_refused(url):
    response = raw(url, "GET", "/health", {"X-Big": "a" * 100_000})
    assert response.status == 431

"""The data server over real HTTP: uvicorn on loopback, every route exact against numpy."""

from __future__ import annotations

import gzip
import http.client
import io
import json
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tensorstore as ts
import zarr
from live_server import live_server

from client.wire import NPY_MEDIA_TYPE, NPY_STREAM_MEDIA_TYPE, decode_npy_stream
from store.categories import merge_mask

SCAN = "0000001_V00-Aug00"  # (40, 36, 12) float32, 4 classes
INT_SCAN = "0000002_V00-Aug00"  # (33, 27, 10) int16
IMAGE_ONLY = "0000003_V00-Aug01"
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def url(small_store):
    with live_server(small_store[0]) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == NPY_MEDIA_TYPE
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def raw_get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send ``path`` byte for byte: httpx would normalize ``..`` away before it left the client."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_scan_listing_and_filters(client, small_store):
    _, truth = small_store
    scans = client.get("/scans").json()["scans"]
    assert [s["scan_id"] for s in scans] == sorted(truth)
    for entry in scans:
        image, mask = truth[entry["scan_id"]]
        assert entry["shape"] == list(image.shape) and entry["dtype"] == image.dtype.name
        assert entry["num_classes"] == (0 if mask is None else mask.shape[-1])
        assert {"split", "subject_id", "time_point", "augmentation"} <= entry.keys()
        assert "class_voxels_per_slice" not in entry  # only in /scans/{id}

    def ids(**params):
        return [s["scan_id"] for s in client.get("/scans", params=params).json()["scans"]]

    assert ids(split="train") == ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    assert ids(split=["valid", "test"]) == ["0000002_V00-Aug00", "0000003_V00-Aug01"]
    assert ids(subject_id=1, time_point=1) == ["0000001_V01-Aug00"]
    assert ids(augmentation=1) == ["0000003_V00-Aug01"]
    with_class_3 = sorted(s for s, (_, m) in truth.items() if m is not None and m[..., 3].any())
    assert ids(has_class=3) == with_class_3 and IMAGE_ONLY not in with_class_3
    # several classes (any of them), and scan ids, as the Python API takes them
    with_0_or_3 = sorted(
        s for s, (_, m) in truth.items() if m is not None and (m[..., 0].any() or m[..., 3].any())
    )
    assert ids(has_class=[0, 3]) == with_0_or_3
    assert ids(scan_id=["0000002_V00-Aug00", "0000001_V00-Aug00"]) == [
        "0000001_V00-Aug00",
        "0000002_V00-Aug00",
    ]
    typo = client.get("/scans", params={"has_class": "femur"})
    assert typo.status_code == 422 and typo.json()["param"] == "has_class"
    assert typo.json()["detail"].startswith("has_class: no scan has a class named 'femur' (classes: ")
    assert ids(split="nope") == []
    full = client.get("/scans", params={"full": "true"}).json()["scans"]
    assert all("class_voxels_per_slice" in s for s in full)


def test_scan_metadata(client, small_store):
    _, truth = small_store
    image, mask = truth[SCAN]
    meta = client.get(f"/scans/{SCAN}").json()
    assert meta["scan_id"] == SCAN and meta["shape"] == [40, 36, 12] and meta["dtype"] == "float32"
    assert (meta["split"], meta["subject_id"], meta["time_point"], meta["augmentation"]) == ("train", 1, 0, 0)
    assert meta["class_voxels"] == mask.sum(axis=(0, 1, 2)).tolist()
    assert meta["class_voxels_per_slice"] == mask.sum(axis=(0, 1)).tolist()
    assert meta["intensity"]["max"] == pytest.approx(float(image.max()))


@pytest.mark.parametrize(
    ("scan_id", "roi", "index"),
    [
        (SCAN, None, np.s_[:, :, :]),
        (SCAN, "1:30,-10:,4", np.s_[1:30, -10:, 4:5]),
        (SCAN, ":5", np.s_[:5]),
        (INT_SCAN, "3:20,:,2:5", np.s_[3:20, :, 2:5]),
        (IMAGE_ONLY, "-1,-1,-1", np.s_[-1:, -1:, -1:]),
    ],
)
def test_image_regions_are_exact(client, small_store, scan_id, roi, index):
    image = small_store[1][scan_id][0]
    got = npy(client.get(f"/scans/{scan_id}/image", params={} if roi is None else {"roi": roi}))
    assert got.dtype == image.dtype
    np.testing.assert_array_equal(got, image[index])


@pytest.mark.parametrize(
    ("params", "categories", "background"),
    [
        ({}, None, False),
        ({"categories": "[0,[1,2],3]", "background": "true"}, ((0,), (1, 2), (3,)), True),
        ({"categories": "[2]"}, ((2,),), False),
        ({"background": "true"}, None, True),
    ],
)
def test_mask_regions_are_exact(client, small_store, params, categories, background):
    mask = small_store[1][SCAN][1]
    got = npy(client.get(f"/scans/{SCAN}/mask", params={"roi": "2:30,5:,3:9", **params}))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, merge_mask(mask[2:30, 5:, 3:9], categories, background))


def test_batch_returns_every_region_in_order(client, small_store):
    truth = small_store[1]
    regions = [
        {"scan_id": SCAN, "array": "image", "roi": "0:16,0:16,0:4"},
        {
            "scan_id": SCAN,
            "array": "mask",
            "roi": "0:16,0:16,0:4",
            "categories": [0, [1, 2]],
            "background": True,
        },
        {"scan_id": INT_SCAN, "array": "image", "roi": None},
        {"scan_id": IMAGE_ONLY, "roi": "5"},
        {"scan_id": INT_SCAN, "array": "mask", "roi": ":,:,9"},
    ]
    response = client.post("/batch", json={"regions": regions})
    assert response.status_code == 200 and response.headers["content-type"] == NPY_STREAM_MEDIA_TYPE
    arrays = decode_npy_stream(response.content)
    expected = [
        truth[SCAN][0][0:16, 0:16, 0:4],
        merge_mask(truth[SCAN][1][0:16, 0:16, 0:4], ((0,), (1, 2)), True),
        truth[INT_SCAN][0],
        truth[IMAGE_ONLY][0][5:6],
        truth[INT_SCAN][1][:, :, 9:10],
    ]
    assert len(arrays) == len(expected)
    for got, want in zip(arrays, expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_etags_revalidate_and_masks_are_gzipped(client, small_store):
    for path, params in [(f"/scans/{SCAN}/image", {"roi": "0:8"}), ("/scans", {}), (f"/scans/{SCAN}", {})]:
        first = client.get(path, params=params)
        assert first.headers["cache-control"] == "private, no-cache"
        again = client.get(path, params=params, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == first.headers["etag"]
    # ":" and "0:40" are the same region: the same ETag
    a = client.get(f"/scans/{SCAN}/image", params={"roi": ":,:,0"}).headers["etag"]
    assert client.get(f"/scans/{SCAN}/image", params={"roi": "0:40,0:36,0:1"}).headers["etag"] == a
    assert client.get(f"/scans/{SCAN}/image", params={"roi": "0:40,0:36,1"}).headers["etag"] != a
    # Masks travel gzipped to clients that accept it; float images never do.
    mask = client.get(f"/scans/{SCAN}/mask", headers={"Accept-Encoding": "gzip"})
    assert (
        mask.headers["content-encoding"] == "gzip"
        and int(mask.headers["content-length"]) < mask.num_bytes_downloaded + 1
    )
    np.testing.assert_array_equal(npy(mask), small_store[1][SCAN][1])
    plain = client.get(f"/scans/{SCAN}/mask", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and len(plain.content) > len(
        gzip.compress(plain.content, 1)
    )
    assert (
        "content-encoding"
        not in client.get(f"/scans/{SCAN}/image", headers={"Accept-Encoding": "gzip"}).headers
    )


def test_standard_zarr_readers_read_the_zarr_tree(url, client, small_store):
    _, truth = small_store
    group = zarr.open_group(f"{url}/zarr/", mode="r")
    assert group.attrs["scancache"]["format"] == 2 and group.attrs["scancache"]["store_id"]
    for scan_id, (image, mask) in truth.items():
        np.testing.assert_array_equal(group[scan_id]["image"][...], image)
        assert group[scan_id].attrs["shape"] == list(image.shape)
        if mask is not None:
            np.testing.assert_array_equal(group[scan_id]["mask"][2:9, 3:, 1:4], mask[2:9, 3:, 1:4])
    store = ts.open({"driver": "zarr3", "kvstore": f"{url}/zarr/{INT_SCAN}/image/"}, read=True).result()
    assert store.dtype.numpy_dtype == np.int16
    np.testing.assert_array_equal(store[3:20, :, 2:5].read().result(), truth[INT_SCAN][0][3:20, :, 2:5])
    metrics = client.get("/metrics").text
    ranged = [
        line
        for line in metrics.splitlines()
        if 'route="/zarr/{path:path}"' in line and 'status="206"' in line
    ]
    assert ranged and float(ranged[0].split()[-1]) > 0  # the readers really used Range requests


def test_zarr_files_support_ranges_head_and_conditionals(client, small_store):
    root = small_store[0]
    shard = next((root / SCAN / "image" / "c").rglob("*/*/*"))
    rel = shard.relative_to(root).as_posix()
    data = shard.read_bytes()
    whole = client.get(f"/zarr/{rel}")
    assert whole.status_code == 200 and whole.content == data
    assert (
        whole.headers["accept-ranges"] == "bytes"
        and whole.headers["content-type"] == "application/octet-stream"
    )
    for header, expected in [
        ("bytes=-20", data[-20:]),
        ("bytes=5-9", data[5:10]),
        (f"bytes={len(data) - 3}-", data[-3:]),
    ]:
        part = client.get(f"/zarr/{rel}", headers={"Range": header})
        assert part.status_code == 206 and part.content == expected
        start = len(data) - len(expected) if header.startswith("bytes=-") else int(header[6:].split("-")[0])
        assert part.headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"
    unsatisfiable = client.get(f"/zarr/{rel}", headers={"Range": f"bytes={len(data)}-"})
    assert (
        unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == f"bytes */{len(data)}"
    )
    assert (
        client.get(f"/zarr/{rel}", headers={"Range": "bytes=0-1,4-5"}).content == data
    )  # multi-range: whole file
    stale = client.get(f"/zarr/{rel}", headers={"Range": "bytes=0-3", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == data
    head = client.head(f"/zarr/{rel}")
    assert (
        head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(data)
    )
    assert client.get(f"/zarr/{rel}", headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
    doc = client.get(f"/zarr/{SCAN}/zarr.json")
    assert doc.headers["content-type"] == "application/json" and doc.json()["attributes"]["scan_id"] == SCAN


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/zarr/../zarr.json", 400),
        (f"/zarr/{SCAN}/../../../etc/passwd", 400),
        ("/zarr/%2e%2e/%2e%2e/etc/passwd", 400),
        (f"/zarr/{SCAN}%2F..%2F..%2Fzarr.json", 400),
        (f"/zarr/{SCAN}%2fimage%2fzarr.json", 400),
        ("/zarr//etc/passwd", 400),
        (f"/zarr/{SCAN}\\..\\zarr.json", 400),
        ("/zarr/.staging/zarr.json", 404),
        ("/scans/..%2F..%2Fetc/image", 400),
        ("/scans/../../etc/passwd", 404),
        ("/scans/.staging", 400),
    ],
)
def test_paths_cannot_leave_the_store(url, small_store, path, status):
    got, body = raw_get(url, path)
    assert got == status, body
    detail = json.loads(body)["detail"]
    assert "\n" not in detail and str(small_store[0]) not in body.decode() and "root:" not in body.decode()


def test_openapi_documents_routes_parameters_and_binary_responses(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for route in [
        "/health",
        "/scans",
        "/scans/{scan_id}",
        "/scans/{scan_id}/image",
        "/scans/{scan_id}/mask",
        "/batch",
        "/zarr/{path}",
        "/metrics",
    ]:
        assert route in paths, route
    mask = paths["/scans/{scan_id}/mask"]["get"]
    assert NPY_MEDIA_TYPE in mask["responses"]["200"]["content"]
    assert {"404", "413", "422"} <= mask["responses"].keys()
    params = {p["name"]: p for p in mask["parameters"]}
    assert {"scan_id", "roi", "categories", "background"} <= params.keys()
    assert all(p.get("description") for p in params.values())
    assert NPY_MEDIA_TYPE in paths["/scans/{scan_id}/image"]["get"]["responses"]["200"]["content"]
    assert NPY_STREAM_MEDIA_TYPE in paths["/batch"]["post"]["responses"]["200"]["content"]
    zarr_get = paths["/zarr/{path}"]["get"]
    assert "206" in zarr_get["responses"] and "416" in zarr_get["responses"]
    listing = {p["name"] for p in paths["/scans"]["get"]["parameters"]}
    assert {"split", "subject_id", "time_point", "augmentation", "has_class"} <= listing
    assert client.get("/docs").status_code == 200


def test_metrics_count_requests_and_bytes(client):
    client.get(f"/scans/{SCAN}/image", params={"roi": "0:4"})
    text = client.get("/metrics").text
    assert 'scancache_http_requests_total{method="GET",route="/scans/{scan_id}/image",status="200"}' in text
    # a HEAD is counted under its route too, not "unrouted"
    assert client.head("/scans").status_code == 200 and client.head("/zarr/zarr.json").status_code == 200
    text = client.get("/metrics").text
    assert 'scancache_http_requests_total{method="HEAD",route="/scans",status="200"}' in text
    assert 'scancache_http_requests_total{method="HEAD",route="/zarr/{path:path}",status="200"}' in text
    assert 'method="HEAD",route="unrouted"' not in text
    assert "scancache_http_response_bytes_total" in text and "scancache_chunk_cache_limit_bytes" in text
    assert (
        "scancache_chunk_cache_hits_total" in text and 'scancache_region_bytes_total{array="image"}' in text
    )


def test_token_is_required_everywhere_but_health(small_store):
    with live_server(small_store[0], token=TOKEN) as base, httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/health").status_code == 200
        for path in [
            "/scans",
            f"/scans/{SCAN}",
            f"/scans/{SCAN}/image",
            "/zarr/zarr.json",
            "/metrics",
            "/docs",
            "/openapi.json",
        ]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]:
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer" and TOKEN not in response.text
        denied = client.post("/batch", json={"regions": [{"scan_id": SCAN}]})
        assert denied.status_code == 401 and "bearer token" in denied.json()["detail"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        image = npy(client.get(f"/scans/{SCAN}/image", params={"roi": "0:3"}, headers=auth))
        np.testing.assert_array_equal(image, small_store[1][SCAN][0][0:3])
        spec = {
            "driver": "zarr3",
            "kvstore": {
                "driver": "http",
                "base_url": base,
                "path": f"/zarr/{SCAN}/image/",
                "headers": [f"Authorization: Bearer {TOKEN}"],
            },
        }
        np.testing.assert_array_equal(
            ts.open(spec, read=True).result()[...].read().result(), small_store[1][SCAN][0]
        )


def test_run_with_workers_and_token_from_environment(small_store):
    """``service.server.run`` as ``scancache serve --workers 2`` starts it: settings via env vars."""
    root, truth = small_store
    with live_server(root, token=TOKEN, process=True, workers=2, max_bytes=10_000) as base:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base, timeout=30, headers=auth) as client:
            for _ in range(4):  # spread over both workers
                got = npy(client.get(f"/scans/{INT_SCAN}/image", params={"roi": "0:5,0:5"}))
                np.testing.assert_array_equal(got, truth[INT_SCAN][0][0:5, 0:5])
            assert client.get(f"/scans/{SCAN}/image").status_code == 413  # max_bytes reached the workers
            assert httpx.get(f"{base}/scans").status_code == 401

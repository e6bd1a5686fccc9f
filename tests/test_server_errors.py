"""The server's error matrix, in process (httpx over ASGI): statuses, one-line details naming the
parameter, limits refused before reading, no paths in bodies, and no 5xx from any client input."""

from __future__ import annotations

import gzip
import json
import logging
import os
import posixpath
import shutil
from pathlib import Path
from urllib.parse import quote

import anyio
import httpx
import numpy as np
import pytest
from conftest import make_volume
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import live_server

from client.wire import decode_npy, decode_npy_stream
from service.server import Settings, create_app
from store.writer import write_scan

SCAN = "0000001_V00-Aug00"  # (40, 36, 12) float32, 4 classes
IMAGE_ONLY = "0000003_V00-Aug01"


class InProcess:
    """Synchronous requests against an app through httpx's ASGI transport (no sockets)."""

    def __init__(self, app, raise_app_exceptions: bool = True) -> None:
        self.transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=self.transport, base_url="http://testserver") as client:
                return await client.request(method, url, **kwargs)

        return anyio.run(go)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)


def assert_error(response: httpx.Response, status: int, *words: str, root: Path | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["detail"], str) and "\n" not in body["detail"]
    for word in words:
        assert word in body["detail"], body
    if root is not None:
        assert str(root) not in response.text and "/tmp" not in response.text
    return body


@pytest.fixture(scope="module")
def client(small_store):
    root, _ = small_store
    return InProcess(create_app(Settings(store=root)))


@pytest.fixture(scope="module")
def store_root(small_store):
    return small_store[0]


@pytest.mark.parametrize(
    ("url", "status", "words", "error"),
    [
        ("/scans/0000009_V00-Aug00", 404, ["0000009_V00-Aug00", "not found"], "ScanNotFound"),
        ("/scans/0000009_V00-Aug00/image", 404, ["not found"], "ScanNotFound"),
        ("/scans/zarr.json/image", 404, ["not found"], "ScanNotFound"),  # a file, not a scan
        (f"/scans/{IMAGE_ONLY}/mask", 404, ["no mask"], "ArrayNotFound"),
        (f"/scans/{SCAN}/labels", 404, ["Not Found"], None),
        ("/scans/.staging", 400, ["invalid scan id"], "InvalidPath"),
        # "$" in a pattern matches before a final newline: the id check is a full match
        (f"/scans/{SCAN}%0A", 400, ["invalid scan id"], "InvalidPath"),
        (f"/scans/{SCAN}%0A/image?roi=0:2", 400, ["invalid scan id"], "InvalidPath"),
        ("/scans/..%2F..%2Fetc/image", 400, ["encoded slashes"], "InvalidPath"),
        (f"/scans/{SCAN}/image?roi=0:100", 422, ["roi", "out of bounds"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=5:5", 422, ["roi", "empty"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=", 200, [], None),
        (f"/scans/{SCAN}/image?roi=a:b", 422, ["roi", "not an integer"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=0:1,0:1,0:1,0:1", 422, ["roi", "4 axes"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=0:4:2", 422, ["roi", "steps"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=0:4;0:4", 422, ["roi", "axes are split by ','"], "InvalidROI"),
        (f"/scans/{SCAN}/image?roi=0:1234567890123456789", 422, ["roi", "more than 18 digits"], "InvalidROI"),
        (f"/scans/{SCAN}/mask?categories=[9]", 422, ["categories", "out of range"], "InvalidCategories"),
        (f"/scans/{SCAN}/mask?categories=[]", 422, ["categories"], "InvalidCategories"),
        (f"/scans/{SCAN}/mask?categories=[[]]", 422, ["categories", "empty"], "InvalidCategories"),
        (
            f"/scans/{SCAN}/mask?categories=zero",
            422,
            ["categories", "no class named 'zero'"],
            "InvalidCategories",
        ),
        (f"/scans/{SCAN}/mask?categories=[true]", 422, ["categories"], "InvalidCategories"),
        (f"/scans/{SCAN}/mask?categories={'[' * 5000}", 422, ["categories", "deeply"], "InvalidCategories"),
        (f"/scans/{SCAN}/mask?background=maybe", 422, ["background"], "InvalidParameter"),
        ("/scans?has_class=one", 422, ["has_class"], "InvalidParameter"),
        ("/scans?subject_id=x", 422, ["subject_id"], "InvalidParameter"),
        # a misspelt parameter would have meant the whole volume, or every scan
        (
            f"/scans/{SCAN}/image?rio=0:1",
            422,
            ["rio: not a parameter of this route (it takes: channel, roi)"],
            "InvalidParameter",
        ),
        ("/scans?splt=train", 422, ["splt: not a parameter", "split"], "InvalidParameter"),
        # one value given twice would have answered the last one; a list parameter repeats
        (f"/scans/{SCAN}/image?roi=0:4&roi=0:8", 422, ["roi: given more than once"], "InvalidParameter"),
        ("/scans?split=train&split=valid", 200, [], None),
        ("/scans?split", 422, ["split: empty"], "InvalidParameter"),  # it answered "no scans"
        ("/scans?split=train&split=", 422, ["split: empty"], "InvalidParameter"),
        ("/zarr/zarr.json?x=1", 422, ["x: not a parameter", "takes: none"], "InvalidParameter"),
        ("/nothing-here", 404, ["Not Found"], None),
    ],
)
def test_error_matrix(client, store_root, url, status, words, error):
    response = client.get(url)
    if status == 200:
        assert response.status_code == 200
        return
    body = assert_error(response, status, *words, root=store_root)
    assert body["error"] == error
    if error and error.startswith("Invalid") and error != "InvalidPath":
        assert body["param"] in body["detail"]


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("PUT", "/scans"),
        ("DELETE", f"/scans/{SCAN}"),
        ("POST", f"/scans/{SCAN}/image"),
        ("PATCH", "/zarr/zarr.json"),
    ],
)
def test_the_service_is_read_only(client, method, url):
    assert_error(client.request(method, url), 405, "Method Not Allowed")


@pytest.mark.parametrize(
    ("regions", "status", "words"),
    [
        (
            [{"scan_id": SCAN, "roi": "0:2"}, {"scan_id": "0000009_V00-Aug00"}],
            404,
            ["regions[1]", "not found"],
        ),
        ([{"scan_id": SCAN, "array": "labels"}], 404, ["regions[0]", "labels"]),
        ([{"scan_id": IMAGE_ONLY, "array": "mask"}], 404, ["regions[0]", "no mask"]),
        ([{"scan_id": "../x"}], 400, ["regions[0]", "invalid scan id"]),
        ([{"scan_id": SCAN + "\n"}], 400, ["regions[0]", "invalid scan id"]),
        ([{"scan_id": SCAN, "roi": "0:99"}], 422, ["regions[0].roi", "out of bounds"]),
        ([{"scan_id": SCAN, "roi": 3}], 422, ["regions[0].roi"]),
        (
            [{"scan_id": SCAN}, {"scan_id": SCAN, "array": "mask", "categories": [0, [4]]}],
            422,
            ["regions[1].categories"],
        ),
        (
            [{"scan_id": SCAN, "array": "mask", "categories": "0,nine"}],
            422,
            ["regions[0].categories", "no class named 'nine'"],
        ),
        ([{"scan_id": SCAN, "colour": "red"}], 422, ["regions[0].colour"]),
        # a mask's fields on an image region: "array" left out, not a request for the image
        ([{"scan_id": SCAN, "categories": [9]}], 422, ["regions[0].categories", "only mask regions"]),
        ([{"scan_id": SCAN, "background": True}], 422, ["regions[0].background", "only mask regions"]),
        ([{"roi": "0:1"}], 422, ["regions[0].scan_id"]),
        # a value of no type the field takes: the field named, not pydantic's union branch
        # ("regions[0].categories.list[any]: ... (and 1 more)")
        (
            [{"scan_id": SCAN, "array": "mask", "categories": {"a": 1}}],
            422,
            [
                "regions[0].categories",
                "categories: Input should be a valid list; or Input should be a valid string",
            ],
        ),
    ],
)
def test_batch_errors_name_the_region(client, regions, status, words):
    body = assert_error(client.post("/batch", json={"regions": regions}), status, *words)
    assert body["param"] is not None and body["param"].startswith(words[0]), body  # also a 404's field
    assert "list[any]" not in body["detail"] and "(and 1 more)" not in body["detail"]


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"regions": 1}', b'{"regions": [1]}', b"\xff\xfe"])
def test_malformed_batch_bodies_are_422(client, body):
    assert_error(client.post("/batch", content=body, headers={"content-type": "application/json"}), 422)


def test_a_body_nested_past_the_recursion_limit_is_422_naming_the_body(client):
    deep = (
        b'{"regions": [{"scan_id": "x", "array": "mask", "categories": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    )
    body = assert_error(
        client.post("/batch", content=deep, headers={"content-type": "application/json"}), 422
    )
    assert body["param"] == "body" and body["detail"] == "body: not valid JSON (nested too deeply)"


@pytest.mark.parametrize(
    ("body", "headers", "detail"),
    [
        (b'{"regions": [{"scan_id": "\xe9"}]}', {}, "body: not UTF-8 text (byte 26)"),
        (
            b'{"regions": [{"categories": [' + b"9" * 5000 + b"]}]}",
            {},
            "body: a number has more than 4300 digits",
        ),
    ],
)
def test_a_body_that_cannot_be_decoded_says_why(client, body, headers, detail):
    """FastAPI answers one generic 400 for each of these; the 422 names the cause."""
    sent = client.post("/batch", content=body, headers={"content-type": "application/json", **headers})
    assert assert_error(sent, 422, detail)["param"] == "body"


@pytest.mark.parametrize("body", [gzip.compress(b'{"regions": []}'), b'{"regions": []}'])
def test_an_encoded_body_is_415_whether_or_not_it_decodes(client, body):
    """The server reads plain JSON only: a compressed body and a plain one sent as compressed
    are refused alike, naming the encoding."""
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    sent = client.post("/batch", content=body, headers=headers)
    detail = "body: Content-Encoding 'gzip' is not accepted; send plain JSON"
    assert assert_error(sent, 415, detail)["param"] == "body"


@pytest.mark.parametrize(
    ("body", "headers", "detail"),
    [
        (b"not json", {"content-type": "application/json"}, "body: not valid JSON at character 0"),
        (b'{"regions": [],}', {"content-type": "application/json"}, "body: not valid JSON at character 15"),
        (
            b'{"regions": []}',
            {},
            "body: expected a JSON object (send it with Content-Type: application/json)",
        ),
    ],
)
def test_a_body_that_is_not_json_is_named_as_the_body(client, body, headers, detail):
    # not "[0]" (pydantic's location of a JSON error is a character offset, not an index)
    answer = assert_error(client.post("/batch", content=body, headers=headers), 422, detail)
    assert answer["param"] == "body"


def test_empty_batch_is_an_empty_stream(client):
    response = client.post("/batch", json={"regions": []})
    assert response.status_code == 200 and response.content == b""
    assert decode_npy_stream(response.content) == []


def test_batch_takes_the_short_category_form_as_the_get_routes_do(client, small_store):
    """``"0,1+2"`` in a batch region is ``[0, [1, 2]]``, as in ``?categories=`` (one parser)."""
    _, truth = small_store
    _, mask = truth[SCAN]
    region = {"scan_id": SCAN, "array": "mask", "roi": "0:5,0:4,0:2"}
    short = client.post("/batch", json={"regions": [{**region, "categories": "0,1+2"}]})
    assert short.status_code == 200, short.text
    (got,) = decode_npy_stream(short.content)
    want = np.stack([mask[:5, :4, :2, 0], mask[:5, :4, :2, 1] + mask[:5, :4, :2, 2]], -1)
    np.testing.assert_array_equal(got, np.minimum(want, 1))


def test_limits_are_enforced_before_reading(small_store):
    root, truth = small_store
    # 10x10x1 voxels of a 4-class mask: the raw read is 400 bytes, all classes + background 500.
    app = InProcess(create_app(Settings(store=root, max_bytes=450, max_body_bytes=2000, max_batch_regions=3)))
    roi = "0:10,0:10,0"
    ok = app.get(f"/scans/{SCAN}/mask", params={"roi": roi})
    assert ok.status_code == 200
    np.testing.assert_array_equal(decode_npy(ok.content), truth[SCAN][1][0:10, 0:10, 0:1])
    assert_error(
        app.get(f"/scans/{SCAN}/mask", params={"roi": roi, "background": "true"}), 413, "500 bytes", "450"
    )
    assert_error(app.get(f"/scans/{SCAN}/image"), 413, "--max-bytes")
    assert app.get(f"/scans/{SCAN}/image", params={"roi": "0:10,0:10,0"}).status_code == 200  # 400 bytes
    two = {"regions": [{"scan_id": SCAN, "roi": "0:10,0:10,0"}] * 2}  # 800 bytes together
    body = assert_error(app.post("/batch", json=two), 413, "2 regions")
    assert body["error"] == "RequestTooLarge"
    many = {"regions": [{"scan_id": SCAN, "roi": "0,0,0"}] * 4}
    assert_error(app.post("/batch", json=many), 413, "4 regions", "limit of 3")
    padded = json.dumps({"regions": [{"scan_id": SCAN, "roi": "0,0,0"}], "pad": "x" * 3000}).encode()
    assert_error(
        app.post("/batch", content=padded, headers={"content-type": "application/json"}), 413, "body"
    )

    async def chunks():  # no Content-Length: the limit still holds
        for _ in range(5):
            yield b" " * 1000

    assert_error(
        app.post("/batch", content=chunks(), headers={"content-type": "application/json"}), 413, "body"
    )


def test_unexpected_errors_are_a_generic_500_without_paths(tmp_path, caplog, monkeypatch):
    from store.source import LocalSource

    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, SCAN, image, mask, {"split": "train"})

    def broken(*_args, **_kwargs):
        raise RuntimeError(f"a bug reading {root}/.versions")  # a message with a path in it

    # the error is answered, not re-raised to the server (which would print it a second time)
    client = InProcess(create_app(Settings(store=root)), raise_app_exceptions=True)
    monkeypatch.setattr(LocalSource, "read_versioned", broken)
    with caplog.at_level(logging.ERROR):
        response = client.get(f"/scans/{SCAN}/image")
    body = assert_error(response, 500, "internal server error", root=tmp_path)
    assert body["error"] == "ServerError"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [
        "internal error while serving a request"
    ]


@pytest.mark.parametrize("refusal", ["file", "tensorstore", "credentials"])
def test_a_store_that_refuses_a_read_is_a_503_without_paths(tmp_path, caplog, monkeypatch, refusal):
    """A shard the server's user may not read, or object storage refusing the server's
    credentials, is the server's store unavailable (503), not a bug (500); the log has it."""
    from store.source import LocalSource

    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, SCAN, image, mask, {"split": "train"})
    shard = f"{root}/.versions/{SCAN}/v/image/c/0/0/0"
    errors = {
        "file": PermissionError(13, "Permission denied", shard),
        "tensorstore": ValueError(f'PERMISSION_DENIED: Error reading "{shard}": Permission denied'),
        "credentials": ValueError("UNAUTHENTICATED: HTTP 403 reading s3://bucket/x"),
    }

    def refused(*_args, **_kwargs):
        raise errors[refusal]

    client = InProcess(create_app(Settings(store=root)), raise_app_exceptions=True)  # answered, once
    monkeypatch.setattr(LocalSource, "read_versioned", refused)
    with caplog.at_level(logging.ERROR):
        response = client.get(f"/scans/{SCAN}/image")
    body = assert_error(response, 503, "store unavailable: it refused a read", root=tmp_path)
    assert body["error"] == "ServerError" and "bucket" not in response.text
    logged = [r.getMessage() for r in caplog.records if "refused a read" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith(
        "the store refused a read (permissions or credentials): "
    )
    assert not any(r.exc_info for r in caplog.records)  # one line in the log, not a traceback


def test_a_store_damaged_after_writing_is_a_500_naming_the_scan_without_paths(tmp_path, caplog):
    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, SCAN, image, mask, {"split": "train"})
    for shard in (root / SCAN / "image").rglob("c/*/*/*"):
        shard.write_bytes(b"not a shard at all" * 10)  # a broken store, not a bad request
    client = InProcess(create_app(Settings(store=root)), raise_app_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="scancache.server"):
        response = client.get(f"/scans/{SCAN}/image")
    body = assert_error(response, 500, f"scan {SCAN!r} is damaged in the store", root=tmp_path)
    assert body["error"] == "ScanDamaged" and "--rebuild" in body["detail"]
    assert any("is damaged" in r.getMessage() for r in caplog.records)  # the operator sees it too


def test_zarr_files_lost_or_unreadable_are_never_a_404(tmp_path, monkeypatch):
    """A Zarr reader takes a 404 for a chunk never written and fills it with the fill value: a
    shard the scan's manifest lists but the store lost is ScanDamaged (500), one the server may
    not read is a 503; a key no manifest lists is still a 404. tensorstore over /zarr/ then
    fails instead of showing zeros as the scan."""
    import tensorstore as ts

    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, SCAN, image, mask, {"split": "train"})
    (shard,) = (root / SCAN / "image").glob("c/*/*/*")
    key = shard.relative_to(root / SCAN).as_posix()
    client = InProcess(create_app(Settings(store=root)))
    assert client.get(f"/zarr/{SCAN}/{key}").status_code == 200
    real_open = os.open

    def refused(path, *args, **kwargs):
        if str(path).endswith(key):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    assert_error(
        client.get(f"/zarr/{SCAN}/{key}"), 503, "store unavailable: it refused a read", root=tmp_path
    )
    monkeypatch.setattr(os, "open", real_open)
    shard.unlink()
    body = assert_error(
        client.get(f"/zarr/{SCAN}/{key}"), 500, f"scan {SCAN!r} is damaged", key, root=tmp_path
    )
    assert body["error"] == "ScanDamaged"
    assert_error(client.get(f"/zarr/{SCAN}/image/c/9/9/9"), 404)  # never written: absent
    assert_error(client.get(f"/zarr/{SCAN}/.zattrs"), 404)  # a Zarr v2 probe
    assert_error(client.get(f"/zarr/{SCAN}/image/c/{'x' * 300}"), 404)  # a name too long: no such file
    with live_server(root) as url:
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "http", "base_url": f"{url}/zarr/{SCAN}/image"},
            # a 5xx is retried with backoff (the default is minutes of it)
            "context": {
                "http_request_retries": {"max_retries": 1, "initial_delay": "10ms", "max_delay": "20ms"}
            },
        }
        array = ts.open(spec, read=True).result()
        with pytest.raises(ValueError):
            array.read().result()


def test_incomplete_scans_and_escapes_are_invisible(tmp_path):
    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=2)
    write_scan(root, SCAN, image, mask, {"split": "train"})
    staged = root / ".staging" / "0000005_V00-Aug00.abc"
    shutil.copytree(root / SCAN, staged)
    (root / "0000006_V00-Aug00" / "image").mkdir(parents=True)  # a directory without zarr.json
    secret = tmp_path / "secret.txt"
    secret.write_text("patient names")
    os.symlink(secret, root / SCAN / "image" / "leak")
    os.symlink(tmp_path, root / SCAN / "up")
    client = InProcess(create_app(Settings(store=root)))
    assert [s["scan_id"] for s in client.get("/scans").json()["scans"]] == [SCAN]
    assert_error(client.get("/scans/0000006_V00-Aug00"), 404)
    for path in [
        ".staging/0000005_V00-Aug00.abc/zarr.json",
        "0000006_V00-Aug00/image",
        f"{SCAN}/image/leak",
        f"{SCAN}/up/secret.txt",
        f"{SCAN}/image",
        f"{SCAN}/image/c/9/9/9",
    ]:
        response = client.get(f"/zarr/{path}")
        assert_error(response, 404, root=tmp_path)
        assert "patient" not in response.text
    assert client.get(f"/zarr/{SCAN}/image/zarr.json").status_code == 200


def test_republished_scan_gets_a_new_etag(tmp_path):
    root = tmp_path / "store"
    first, _ = make_volume((8, 8, 4), 1, seed=3)
    write_scan(root, SCAN, first, None, {"split": "train"})
    client = InProcess(create_app(Settings(store=root)))
    url = f"/scans/{SCAN}/image?roi=0:4"
    one = client.get(url)
    etag = one.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    second = first + 1
    write_scan(root, SCAN, second, None, {"split": "train"})
    two = client.get(url, headers={"If-None-Match": etag})
    assert two.status_code == 200 and two.headers["etag"] != etag
    np.testing.assert_array_equal(decode_npy(two.content), second[0:4])


# -- no client input causes a 5xx --------------------------------------------------------------

roi_text = st.one_of(
    st.text(alphabet="0123456789:,- -x", max_size=24),
    st.text(max_size=12),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 6) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
scan_ids = st.one_of(
    st.sampled_from([SCAN, IMAGE_ONLY, "0000002_V00-Aug00", "..", ".staging"]), st.text(max_size=12)
)
fuzz = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(
    scan_id=scan_ids,
    roi=roi_text,
    categories=st.one_of(st.none(), st.text(max_size=10), json_values.map(json.dumps)),
)
def test_fuzzed_region_queries_never_5xx(client, store_root, scan_id, roi, categories):
    for array in ("image", "mask"):
        params = {"roi": roi} if categories is None else {"roi": roi, "categories": categories}
        response = client.get(f"/scans/{quote(scan_id, safe='')}/{array}", params=params)
        assert response.status_code in (200, 400, 404, 405, 413, 422), response.text
        if response.status_code != 200:
            assert "detail" in response.json() and str(store_root) not in response.text


@fuzz
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "regions": st.lists(
                    st.fixed_dictionaries(
                        {"scan_id": scan_ids, "roi": st.one_of(st.none(), roi_text)},
                        optional={
                            "array": st.sampled_from(["image", "mask", "x"]),
                            "categories": json_values,
                            "background": json_values,
                        },
                    ),
                    max_size=4,
                )
            }
        ),
    )
)
def test_fuzzed_batches_never_5xx(client, store_root, body):
    # json.dumps writes NaN/Infinity, which strict JSON parsers refuse: also a client's mistake
    response = client.post("/batch", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code in (200, 400, 404, 413, 422), response.text
    if response.status_code == 200:
        assert len(decode_npy_stream(response.content)) == len(body["regions"])


@fuzz
@given(path=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="?#"), max_size=30))
def test_fuzzed_zarr_paths_never_5xx(client, store_root, path):
    response = client.get("/zarr/" + quote(path, safe="/."))
    # "/zarr/." and the like normalize to "/zarr/", which redirects to "/zarr" (not an error)
    redirected = response.status_code == 307 and posixpath.normpath("/" + path) == "/"
    assert response.status_code in (200, 400, 404) or redirected, response.text
    assert str(store_root) not in response.text


def test_large_files_stream_in_chunks_exactly(small_store, monkeypatch):
    from service.server import zarr_http

    monkeypatch.setattr(zarr_http, "READ_AT_ONCE", 100)  # force the streaming path on small shards
    monkeypatch.setattr(zarr_http, "STREAM_CHUNK", 333)
    root = small_store[0]
    shard = next((root / SCAN / "mask" / "c").rglob("*/*/*/*"))
    data = shard.read_bytes()
    assert len(data) > 1000
    client = InProcess(create_app(Settings(store=root)))
    url = f"/zarr/{shard.relative_to(root).as_posix()}"
    assert client.get(url).content == data
    part = client.get(url, headers={"Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == data[10:]
    head = client.request("HEAD", url)
    assert head.content == b"" and head.headers["content-length"] == str(len(data))


def test_cors_for_browser_readers(small_store):
    app = create_app(Settings(store=small_store[0], token="tok", cors_origins=("https://viewer.example",)))
    client = InProcess(app)
    preflight = client.request(
        "OPTIONS",
        "/zarr/zarr.json",
        headers={
            "Origin": "https://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,range",
        },
    )
    assert preflight.status_code == 200  # answered before authentication: browsers send no token here
    assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"
    got = client.get(
        "/zarr/zarr.json", headers={"Origin": "https://viewer.example", "Authorization": "Bearer tok"}
    )
    assert got.status_code == 200 and "Content-Range" in got.headers["access-control-expose-headers"]
    assert client.get("/zarr/zarr.json", headers={"Origin": "https://viewer.example"}).status_code == 401


def test_health_reports_a_missing_store(tmp_path):
    root = tmp_path / "store"
    image, _ = make_volume((4, 4, 2), 1, seed=4)
    write_scan(root, SCAN, image, None, {})
    client = InProcess(create_app(Settings(store=root)))
    assert client.get("/health").json() == {"status": "ok"}
    (root / "zarr.json").rename(root / "moved.json")
    assert_error(client.get("/health"), 503, "store unavailable", root=tmp_path)
    # the listing and a scan say so too, not "no scans" or "no such scan" (a client retries a 503)
    root.rename(tmp_path / "moved")
    assert_error(client.get("/scans"), 503, "store unavailable", root=tmp_path)
    assert_error(client.get(f"/scans/{SCAN}"), 503, "store unavailable", root=tmp_path)
    assert_error(client.get(f"/scans/{SCAN}/image"), 503, "store unavailable", root=tmp_path)
    # and the Zarr tree: a 404 would tell Zarr readers "no such node", which they do not retry
    assert_error(client.get("/zarr/zarr.json"), 503, "store unavailable", root=tmp_path)
    assert_error(client.get(f"/zarr/{SCAN}/zarr.json"), 503, "store unavailable", root=tmp_path)
    assert client.request("HEAD", "/zarr/zarr.json").status_code == 503


@pytest.mark.parametrize(
    ("url", "param"),
    [
        (f"/scans/{SCAN}/preview.png?z=1_0", "z"),
        (f"/scans/{SCAN}/image?channel=0_0", "channel"),
        ("/scans?subject_id=0_1", "subject_id"),
        ("/scans?subject_id=1&subject_id=\u00b2", "subject_id"),
    ],
)
def test_integer_parameters_take_plain_digits_as_roi_does(client, url, param):
    """int() takes "1_0" as 10 (and pydantic with it): the same refusal as roi's bounds."""
    body = assert_error(client.get(url), 422, "is not an integer")
    assert body["param"] == param
    assert_error(client.get("/scans?has_class=" + "9" * 19), 422, "has more than 18 digits")
    assert body["param"] == param


def test_integer_parameters_still_take_signs_and_spaces(client):
    assert client.get(f"/scans/{SCAN}/preview.png?z=+1").status_code == 200
    assert client.get("/scans?subject_id=%201").status_code == 200


def test_a_batch_whose_scan_is_republished_between_plan_and_read_is_read_at_the_new_version(
    tmp_path, monkeypatch
):
    """A batch names no version: a re-publish between the server's plan and its read gave a 409
    telling a plain HTTP client to "rebuild the loader"; it is read again at the current version,
    which the versions header names (a loader that planned with another checks it)."""
    from store.source import LocalSource

    root = tmp_path / "store"
    first, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, SCAN, first, mask, {"split": "train"})
    second = first + 100.0
    real = LocalSource.read_versioned
    calls = []

    def republished_first(self, requests):
        if not calls:
            write_scan(root, SCAN, second, mask, {"split": "train"})  # the job publishes meanwhile
        calls.append([r.version for r in requests])
        return real(self, requests)

    monkeypatch.setattr(LocalSource, "read_versioned", republished_first)
    client = InProcess(create_app(Settings(store=root)))
    body = {"regions": [{"scan_id": SCAN, "array": "image", "roi": ":,:,1:3"}]}
    response = client.post("/batch", json=body)
    assert response.status_code == 200, response.text
    (got,) = decode_npy_stream(response.content)
    np.testing.assert_array_equal(got, second[:, :, 1:3])
    assert len(calls) == 2 and calls[0] != calls[1]  # planned at the old version, read at the new
    assert calls[1][0] in response.headers["x-scancache-versions"]

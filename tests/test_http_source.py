"""What only ``HttpSource`` has, against a real server: tokens, batches split or refused by the
server's byte limit, retries of unreachable servers, 5xx answers and timeouts. (The behaviour
it shares with ``LocalSource`` is tests/test_source_contract.py.)
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time

import numpy as np
import pytest
from live_server import live_server

from client.http import HttpSource
from client.wire import encode_npy
from store.errors import RequestTooLarge, ServerError, Unauthorized
from store.protocol import RegionRequest

SCAN = "0000001_V00-Aug00"
INT_SCAN = "0000002_V00-Aug00"


def test_token_from_argument_or_environment(small_store, monkeypatch):
    root, truth = small_store
    monkeypatch.delenv("SCANCACHE_TOKEN", raising=False)
    with live_server(root, token="s3cret") as url:
        with HttpSource(url) as anonymous, pytest.raises(Unauthorized) as refused:
            anonymous.list_scans()
        assert str(refused.value).endswith(
            "(this client sends the token in SCANCACHE_TOKEN, or HttpSource(url, token=...))"
        )
        with HttpSource(url, token="wrong") as wrong, pytest.raises(PermissionError):
            wrong.read_image(SCAN)
        with HttpSource(url, token="s3cret") as given:
            np.testing.assert_array_equal(given.read_image(SCAN, ":,:,0"), truth[SCAN][0][:, :, 0:1])
        monkeypatch.setenv("SCANCACHE_TOKEN", "s3cret")
        with HttpSource(url) as from_env:
            assert len(from_env.list_scans()) == len(truth)


def test_batches_over_the_byte_limit_are_split_or_refused(small_store):
    root, truth = small_store
    image = truth[SCAN][0]
    slice_bytes = image.shape[0] * image.shape[1] * 4
    with live_server(root, max_bytes=3 * slice_bytes) as url, HttpSource(url, regions_per_request=64) as src:
        requests = [RegionRequest(SCAN, "image", f":,:,{z}") for z in range(10)]
        arrays = src.read_regions(requests)  # 10 slices in one request is over: halved until it fits
        for z, arr in enumerate(arrays):
            np.testing.assert_array_equal(arr, image[:, :, z : z + 1])
        with pytest.raises(RequestTooLarge):
            src.read_image(SCAN)


def test_unreachable_server_fails_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with (
        HttpSource(f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as src,
        pytest.raises(ServerError) as err,
    ):
        src.list_scans()
    assert "after 3 attempts" in str(err.value)
    assert isinstance(err.value, ConnectionError)


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then a valid .npy."""

    failures = 2
    seen = 0
    payload = np.arange(24, dtype=np.float32).reshape(2, 3, 4)

    def do_GET(self):
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            body, status, ctype = b'{"detail": "warming up"}', 503, "application/json"
        else:
            body, status, ctype = encode_npy(self.payload), 200, "application/x-npy"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler):
    """A plain HTTP server on loopback answering with ``handler``; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_5xx_is_retried_with_backoff():
    with _serving(FlakyHandler) as url:
        with HttpSource(url, retries=3, backoff=0.01) as src:
            np.testing.assert_array_equal(src.read_image(SCAN), FlakyHandler.payload)
        assert FlakyHandler.seen == 3
        FlakyHandler.seen, FlakyHandler.failures = 0, 10
        with HttpSource(url, retries=1, backoff=0.01) as src, pytest.raises(ServerError, match="503"):
            src.read_image(SCAN)


class SlowFirstHandler(FlakyHandler):
    """Stalls on the first request past the client's read timeout, then answers at once."""

    seen = 0

    def do_GET(self):
        type(self).seen += 1
        if type(self).seen == 1:
            time.sleep(1.0)
        body = encode_npy(self.payload)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-npy")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


def test_timeouts_are_retried():
    with _serving(SlowFirstHandler) as url:
        with HttpSource(url, timeout=0.3, retries=2, backoff=0.01) as src:
            np.testing.assert_array_equal(src.read_image(SCAN, ":,:,0"), FlakyHandler.payload)
        assert SlowFirstHandler.seen == 2


def test_a_url_that_is_no_scancache_server_says_so(tmp_path):
    """A plain web server (an HTML 404 page): one line naming the URL, the request and what
    came back, not `ScanNotFound '<!DOCTYPE HTML>...'`."""
    import functools

    from client.http_errors import NotAScancacheServer

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with _serving(handler) as url:
        source = HttpSource(url, retry_seconds=0)
        for call, path in (
            (source.list_scans, "/scans"),
            (lambda: source.metadata("0000001_V00-Aug00"), "/scans/"),
        ):
            with pytest.raises(NotAScancacheServer) as info:
                call()
            message = str(info.value)
            assert message.startswith(f"{url}: GET {path}") and "answered 404 (text/html)" in message
            assert "not a scancache server's JSON" in message and "\n" not in message
        source.close()

"""HttpSource's retry policy against a real HTTP server that answers 408/429/503 on purpose."""

from __future__ import annotations

import email.utils
import http.server
import threading
import time

import numpy as np
import pytest

from client.http import HttpSource
from client.retries import retry_after_seconds
from client.wire import encode_npy
from store.errors import ServerError

PAYLOAD = np.arange(6, dtype=np.int16).reshape(1, 2, 3)


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers ``script`` statuses in turn (with Retry-After where given), then the payload."""

    script: list[tuple[int, str | None]] = []
    seen: list[float] = []

    def do_GET(self):
        cls = type(self)
        cls.seen.append(time.monotonic())
        if len(cls.seen) <= len(cls.script):
            status, retry_after = cls.script[len(cls.seen) - 1]
            body, ctype = b'{"detail": "not now"}', "application/json"
        else:
            status, retry_after, body, ctype = 200, None, encode_npy(PAYLOAD), "application/x-npy"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    Handler.seen = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_408_and_429_are_retried_not_reported_as_bad_parameters(server):
    Handler.script = [(408, None), (429, None), (503, None)]
    with HttpSource(server, backoff=0.01) as source:
        np.testing.assert_array_equal(source.read_image("0000001_V00-Aug00"), PAYLOAD)
    assert len(Handler.seen) == 4


def test_retry_after_is_honoured(server):
    Handler.script = [(429, "1"), (503, "1")]
    with HttpSource(server, backoff=0.01) as source:
        np.testing.assert_array_equal(source.read_image("0000001_V00-Aug00"), PAYLOAD)
    gaps = [b - a for a, b in zip(Handler.seen, Handler.seen[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.95  # waited the asked second (a lower bound only)


def test_the_time_budget_ends_retries_with_one_line(server):
    Handler.script = [(503, None)] * 10_000
    with HttpSource(server, backoff=0.01, retry_seconds=0.5) as source, pytest.raises(ServerError) as info:
        source.read_image("0000001_V00-Aug00")
    message = str(info.value)
    assert "no good answer from the server for" in message and "HTTP 503" in message and "\n" not in message
    assert len(Handler.seen) > 2


def test_environment_settings(monkeypatch):
    monkeypatch.setenv("SCANCACHE_HTTP_TIMEOUT", "7")
    monkeypatch.setenv("SCANCACHE_RETRY_SECONDS", "90")
    monkeypatch.setenv("SCANCACHE_RETRIES", "5")
    with HttpSource("http://127.0.0.1:9") as source:
        assert (source.timeout, source.retry_seconds, source.retries) == (7.0, 90.0, 5)
    with HttpSource("http://127.0.0.1:9", timeout=3, retry_seconds=10, retries=1) as source:
        assert (source.timeout, source.retry_seconds, source.retries) == (3.0, 10.0, 1)
    monkeypatch.setenv("SCANCACHE_RETRY_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"^SCANCACHE_RETRY_SECONDS: 'soon' is not a number"):
        HttpSource("http://127.0.0.1:9")


def test_retry_after_values():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("\u00b2") is None and retry_after_seconds("9" * 50) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 31


def test_catalog_passes_timeout_and_retries_to_the_url_only(small_store):
    from loaders import DatasetCatalog
    from loaders.catalog import close_shared_sources, shared_source

    url = "http://127.0.0.1:9"
    names = ("opts_a", "opts_b", "opts_c", "opts_local")
    for name in names:
        DatasetCatalog.remove(name)
    close_shared_sources()
    try:
        DatasetCatalog.register("opts_a", url, timeout=5, retries=2, split="train")
        DatasetCatalog.register("opts_b", url, timeout=5, retries=2, split="valid")  # same: fine
        with pytest.raises(ValueError, match="one timeout/retries"):
            DatasetCatalog.register("opts_c", url, timeout=6)
        with pytest.raises(TypeError, match="server URL only"):
            DatasetCatalog.register("opts_local", str(small_store[0]), timeout=5)
        source = shared_source(url)
        assert (source.timeout, source.retries) == (5.0, 2)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
        close_shared_sources()


def test_closing_the_source_ends_a_read_that_is_retrying():
    """A read-ahead thread retrying against a server that is gone must not hold the process for
    the whole retry budget once its source is closed (a loader that is done, interpreter exit)."""
    port = _unused_port()
    source = HttpSource(f"http://127.0.0.1:{port}", timeout=2, retry_seconds=120)
    failures: list[BaseException] = []

    def read() -> None:
        try:
            source.metadata("any")
        except BaseException as err:  # what the read ended with
            failures.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)  # refused, now waiting to retry
    started = time.monotonic()
    source.close()
    reader.join(timeout=10)
    assert not reader.is_alive()
    assert time.monotonic() - started < 5
    assert len(failures) == 1 and isinstance(failures[0], ServerError)
    assert "closed while retrying" in str(failures[0]) and "\n" not in str(failures[0])


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

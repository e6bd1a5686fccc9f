"""Quiet by default: a kept-alive connection the server closed while it sat idle in the pool is an
expected event (uvicorn drops idle ones after 5 s, i.e. between two epochs); HttpSource
reconnects without a word. Against a real HTTP/1.1 server on loopback that drops idle
connections after a fraction of a second."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

import numpy as np
import pytest

from client.http import HttpSource
from client.wire import encode_npy
from store.protocol import RegionRequest

IDLE_S = 0.2  # the server closes a connection idle for this long
REGION = np.arange(24, dtype=np.float32).reshape(2, 3, 4)


class KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: a GET or a batch answered with REGION per region asked."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_S  # an idle connection times out and is closed, as uvicorn does after 5 s
    connections: list[float] = []
    drop = 0  # requests still to drop: connection closed without an answer

    def _dropped(self) -> bool:
        cls = type(self)
        if cls.drop <= 0:
            return False
        cls.drop -= 1
        if self.command == "POST":
            self.rfile.read(int(self.headers["Content-Length"]))
        self.close_connection = True
        return True

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(time.monotonic())

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self._dropped():
            return
        self._send(encode_npy(REGION), "application/x-npy")

    def do_POST(self) -> None:
        if self._dropped():
            return
        document = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(encode_npy(REGION) * len(document["regions"]), "application/x-npy-stream")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    KeepAliveHandler.connections = []
    KeepAliveHandler.drop = 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_connections_the_server_closed_while_idle_are_replaced_silently(url, caplog):
    requests = [RegionRequest("0000001_V00-Aug00", "image", f"0:2,0:3,{z}:{z + 4}") for z in range(8)]
    caplog.set_level(logging.DEBUG, logger="scancache")
    with HttpSource(url, concurrency=4, regions_per_request=2, backoff=0.5) as source:
        for epoch in range(3):
            got = source.read_regions(requests)  # 4 batch requests at once: 4 pooled connections
            assert len(got) == 8 and all(np.array_equal(a, REGION) for a in got)
            np.testing.assert_array_equal(source.read_image("0000001_V00-Aug00"), REGION)
            if epoch < 2:
                time.sleep(IDLE_S * 3)  # the gap between epochs: the server drops every one
    noisy = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("scancache")]
    assert noisy == [], [r.getMessage() for r in noisy]
    assert len(KeepAliveHandler.connections) >= 6  # the server did close them: new ones were made


@pytest.mark.parametrize("read", ["GET", "POST /batch"])
def test_a_connection_closed_just_as_the_request_went_is_resent_at_once_silently(url, caplog, read):
    caplog.set_level(logging.DEBUG, logger="scancache")
    with HttpSource(url, backoff=2.0) as source:
        KeepAliveHandler.drop = 1  # the server closes the connection instead of answering, once
        started = time.monotonic()
        if read == "GET":
            got = source.read_image("0000001_V00-Aug00")
        else:
            (got,) = source.read_regions([RegionRequest("0000001_V00-Aug00", "image", "0:2,0:3,0:4")])
        assert time.monotonic() - started < 1.0  # no backoff (it would be 1-2 s here)
    np.testing.assert_array_equal(got, REGION)
    assert KeepAliveHandler.drop == 0
    noisy = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("scancache")]
    assert noisy == [], [r.getMessage() for r in noisy]

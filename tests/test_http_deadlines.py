"""HttpSource's timeout is the total time of one attempt, whatever the server does: a real socket
server on loopback that trickles its answer a few bytes a second, or declares a body no process
can hold, must end in one clear ``ServerError`` within the time budget (GET and POST /batch)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from client.http import HttpSource
from store.errors import ServerError
from store.protocol import RegionRequest

SCAN = "0000001_V00-Aug00"
GAP = 0.1  # seconds between two trickled bytes: far below the per-read timeout
Reply = Callable[[socket.socket, threading.Event], None]


def _read_request(conn: socket.socket) -> None:
    """The request's headers and its Content-Length body (the client must have sent them)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("client left")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)


def _trickle(conn: socket.socket, stop: threading.Event, data: bytes) -> None:
    for i in range(len(data)):
        if stop.wait(GAP):
            return
        conn.sendall(data[i : i + 1])


def trickled_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy\r\nContent-Length: 5000\r\n\r\n")
    _trickle(conn, stop, b"\x93NUMPY" + b" " * 4994)


def trickled_headers(conn: socket.socket, stop: threading.Event) -> None:
    _trickle(conn, stop, b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"z" * 5000 + b"\r\n\r\n")


def huge_body(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-npy-stream\r\n"
        + f"Content-Length: {2**42}\r\n\r\n".encode()
        + b"\x93NUMPY"
    )
    stop.wait(30)


@contextlib.contextmanager
def misbehaving_server(reply: Reply) -> Iterator[str]:
    """Accepts connections on loopback and answers every request with ``reply``."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while not stop.is_set():
                _read_request(conn)
                reply(conn, stop)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=serve, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(5)
        for thread in threads:
            thread.join(5)


READS = {
    "GET": lambda source: source.read_image(SCAN, "0:2,0:2,0"),
    "POST /batch": lambda source: source.read_regions([RegionRequest(SCAN, "image", "0:2,0:2,0")]),
}


@pytest.mark.parametrize("reply", [trickled_body, trickled_headers], ids=["body", "headers"])
@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_a_trickling_server_cannot_stretch_the_timeout(reply, read):
    with (
        misbehaving_server(reply) as url,
        HttpSource(url, timeout=0.6, retry_seconds=1, backoff=0.05) as source,
    ):
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            read(source)
        elapsed = time.monotonic() - started
    # retry_seconds + one attempt's timeout, and some slack for a loaded machine
    assert elapsed < 1 + 0.6 + 1.5, elapsed
    message = str(info.value)
    assert url in message and "0.6 s timeout" in message and "\n" not in message


def test_a_body_no_process_can_hold_is_one_clear_error():
    with misbehaving_server(huge_body) as url, HttpSource(url, timeout=5, retry_seconds=30) as source:
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            source.read_regions([RegionRequest(SCAN, "image", "0:2,0:2,0")])
        assert time.monotonic() - started < 3  # not retried: the server would say the same again
    message = str(info.value)
    assert f"POST {url}/batch" in message and f"{2**42} bytes (Content-Length)" in message
    assert "\n" not in message


@pytest.mark.parametrize("read", READS.values(), ids=READS.keys())
def test_a_server_that_always_hangs_up_is_retried_with_backoff_not_at_once_forever(read):
    """A closed keep-alive connection is sent again once, at once; a server that hangs up on
    every request is a failure like any other: backoff, then one line when the budget ends."""
    hangups: list[float] = []

    def hang_up(conn: socket.socket, stop: threading.Event) -> None:
        hangups.append(time.monotonic())
        conn.shutdown(socket.SHUT_RDWR)
        raise OSError("hung up")  # ends this connection's loop in misbehaving_server

    with misbehaving_server(hang_up) as url, HttpSource(url, backoff=0.05, retry_seconds=1.5) as source:
        started = time.monotonic()
        with pytest.raises(ServerError) as info:
            read(source)
        took = time.monotonic() - started
    assert "no good answer from the server" in str(info.value) and "\n" not in str(info.value)
    assert took < 10 and 3 <= len(hangups) <= 40  # paced by the backoff, ended by the budget

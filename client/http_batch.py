"""Plain-HTTP POSTs whose response body is read straight into one buffer (the batch hot path).

httpx parses a body through h11 in 64 KiB pieces and joins them, three copies and a lot of
Python per megabyte; a 2D batch is tens of megabytes. ``http.client`` with ``readinto`` puts
the body into one preallocated ``bytearray`` from the socket (the ``.npy`` stream is then
decoded as views of it), which measured about a third less time per batch request on
loopback (docs/tuning.md). Only ``http://`` URLs that no proxy applies to use it; everything
else (TLS, proxies, metadata requests) stays with httpx. Keep-alive connections come from one
bounded pool shared by all threads: Keras starts a new thread pool every epoch, and a connection
per thread ever seen would grow without end. Every socket operation is bounded by the calling
thread's attempt deadline (``client.deadline``), so a server that trickles bytes cannot hold a
request longer than its timeout.
"""

from __future__ import annotations

import http.client
import select
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping

from client.deadline import DeadlineSocket, time_left
from store.errors import ServerError, one_line

# What a broken or reset connection raises here (retried like httpx's TransportError).
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# What sending on a kept-alive connection that the server has closed raises.
STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def direct_http(url: str) -> bool:
    """Whether ``url`` is plain http and not routed through a proxy from the environment."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))


class _Connection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose connect and socket I/O keep to the thread's deadline."""

    def connect(self) -> None:
        timeout = time_left(self.timeout)
        assert timeout is not None
        self.timeout = timeout  # the connect may take only what the deadline leaves
        try:
            super().connect()
        finally:
            self.timeout = self.io_timeout
        assert self.sock is not None
        self.sock = DeadlineSocket.adopt(self.sock, self.io_timeout)

    def __init__(self, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.io_timeout = timeout


def _closed_by_peer(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection is readable: the server has closed it (or sent
    something unasked), so it must not be used again."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class BatchPoster:
    """POST JSON, get ``(status, headers, body)``; thread-safe, at most ``max_connections``
    connections open at once (more threads wait for one), idle ones reused last-in first-out."""

    def __init__(
        self, url: str, headers: Mapping[str, str], timeout: float, max_connections: int = 16
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"{url!r} has no host")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.headers = dict(headers)
        self.timeout = timeout
        self.max_connections = max(1, int(max_connections))
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False

    def _checkout(self, fresh: bool = False) -> http.client.HTTPConnection:
        """An idle connection the server has not closed, or a new one (always with ``fresh``);
        the caller holds one of the pool's slots."""
        while not fresh:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if not _closed_by_peer(conn):
                return conn
            conn.close()  # closed while idle (uvicorn drops idle ones after 5 s): expected
        return _Connection(self.host, self.port, self.timeout)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and conn.sock is not None:
                self._idle.append(conn)
                return
        conn.close()

    def idle_connections(self) -> int:
        with self._lock:
            return len(self._idle)

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytearray]:
        headers = {**self.headers, "Content-Type": content_type, "Accept-Encoding": "identity"}
        with self._slots:
            for fresh_retry in (False, True):
                conn = self._checkout(fresh=fresh_retry)
                reused = conn.sock is not None
                try:
                    conn.request("POST", self.prefix + path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = _read_body(response, f"POST http://{self.host}:{self.port}{self.prefix}{path}")
                except STALE_CONNECTION:
                    conn.close()
                    # A kept-alive connection the server closed just as we sent (the check in
                    # _checkout can miss a close in flight): the read-only POST is safe to send
                    # again, on a new connection (other idle ones may be as stale).
                    if reused and not fresh_retry:
                        continue
                    raise
                except BaseException:
                    conn.close()  # the connection's state is unknown: never reuse it
                    raise
                if response.will_close:
                    conn.close()
                else:
                    self._checkin(conn)
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._idle = self._idle, []
        for conn in conns:
            conn.close()


def _read_body(response: http.client.HTTPResponse, what: str) -> bytearray:
    length = response.length
    if length is None:  # chunked or until close: let http.client assemble it
        return bytearray(response.read())
    try:
        buf = bytearray(length)
    except (MemoryError, OverflowError):
        # Not worth a retry: the same server would declare the same size again.
        raise ServerError(
            one_line(
                f"{what}: the response declares {length} bytes (Content-Length), more than this process can hold"
            )
        ) from None
    view = memoryview(buf)
    got = 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), length - got)
        got += n
    return buf

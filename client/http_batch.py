"""Plain-HTTP POSTs whose response body is read straight into one buffer (the batch hot path).

httpx parses a body through h11 in 64 KiB pieces and joins them, three copies and a lot of
Python per megabyte; a 2D batch is tens of megabytes. ``http.client`` with ``readinto`` puts
the body into one preallocated ``bytearray`` from the socket (the ``.npy`` stream is then
decoded as views of it), which measured about a third less time per batch request on
loopback (docs/tuning.md). Only ``http://`` URLs that no proxy applies to use it; everything
else (TLS, proxies, metadata requests) stays with httpx. Keep-alive connections come from one
bounded pool shared by all threads: Keras starts a new thread pool every epoch, and a connection
per thread ever seen would grow without end.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping

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

    def _checkout(self) -> http.client.HTTPConnection:
        """An idle connection or a new one; the caller holds one of the pool's slots."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

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
                conn = self._checkout()
                reused = conn.sock is not None
                try:
                    conn.request("POST", self.prefix + path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = _read_body(response)
                except STALE_CONNECTION:
                    conn.close()
                    # A kept-alive connection the server closed meanwhile (uvicorn drops idle
                    # ones after 5 s): the read-only POST is safe to send again on a new one.
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


def _read_body(response: http.client.HTTPResponse) -> bytearray:
    length = response.length
    if length is None:  # chunked or until close: let http.client assemble it
        return bytearray(response.read())
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), length - got)
        got += n
    return buf

"""A total deadline for one HTTP attempt, enforced at every socket read and write.

A socket timeout bounds one ``recv``: a server (or a proxy) that sends a byte a second never
trips it, and a request would block for as long as the server likes. Here each attempt of
``HttpSource`` runs under ``attempt_deadline(timeout)``; every read, write and connect of that
thread gets at most the time left, and once it is spent the next one raises a timeout (which
the retry loop treats like any other). Both transports carry it: httpx through an httpcore
network backend (``DeadlineBackend``), the plain-HTTP batch path through the socket itself
(``DeadlineSocket``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import typing
from collections.abc import Iterator

import httpcore

_local = threading.local()


class DeadlinePassed(TimeoutError):
    """The attempt's total time is spent (a subclass of ``TimeoutError``, an ``OSError``)."""


@contextlib.contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Every socket operation of this thread inside the block ends by ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = (time.monotonic() + seconds, seconds)
    try:
        yield
    finally:
        _local.deadline = previous


def passed() -> DeadlinePassed | None:
    """The error to raise if the thread's deadline has passed, else None."""
    current = getattr(_local, "deadline", None)
    if current is None or current[0] > time.monotonic():
        return None
    return DeadlinePassed(f"no complete response within the {current[1]:g} s timeout")


def time_left(timeout: float | None) -> float | None:
    """``timeout`` capped at what the thread's deadline leaves; raises once it has passed."""
    current = getattr(_local, "deadline", None)
    if current is None:
        return timeout
    left = current[0] - time.monotonic()
    if left <= 0:
        raise DeadlinePassed(f"no complete response within the {current[1]:g} s timeout")
    return left if timeout is None else min(timeout, left)


# -- httpx / httpcore -----------------------------------------------------------------------
class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            left = time_left(timeout)
        except DeadlinePassed as exc:
            raise httpcore.ReadTimeout(str(exc)) from None
        try:
            return self._inner.read(max_bytes, left)
        except httpcore.ReadTimeout:
            late = passed()  # say which timeout: the attempt's, not one read's
            if late is None:
                raise
            raise httpcore.ReadTimeout(str(late)) from None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            left = time_left(timeout)
        except DeadlinePassed as exc:
            raise httpcore.WriteTimeout(str(exc)) from None
        try:
            self._inner.write(buffer, left)
        except httpcore.WriteTimeout:
            late = passed()
            if late is None:
                raise
            raise httpcore.WriteTimeout(str(late)) from None

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            left = time_left(timeout)
        except DeadlinePassed as exc:
            raise httpcore.ConnectTimeout(str(exc)) from None
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with every stream under the thread's deadline."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self._inner = inner if inner is not None else httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            left = time_left(timeout)
        except DeadlinePassed as exc:
            raise httpcore.ConnectTimeout(str(exc)) from None
        return DeadlineStream(self._inner.connect_tcp(host, port, left, local_address, socket_options))

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            left = time_left(timeout)
        except DeadlinePassed as exc:
            raise httpcore.ConnectTimeout(str(exc)) from None
        return DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(transport: object) -> bool:
    """Put ``DeadlineBackend`` under an ``httpx.HTTPTransport``'s connection pool (proxies
    included). httpx has no argument for it, so this reaches its ``_pool``, present in every
    httpx since 0.18; an httpx without it keeps per-read timeouts only (returns False)."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if backend is None:
        return False
    if not isinstance(backend, DeadlineBackend):
        pool._network_backend = DeadlineBackend(backend)  # type: ignore[union-attr]
    return True


# -- http.client ------------------------------------------------------------------------------
class DeadlineSocket(socket.socket):
    """A socket whose reads and writes take at most ``timeout`` and never pass the thread's
    deadline (``http.client`` reads through ``recv_into`` and writes with ``sendall``)."""

    io_timeout: float | None = None

    @classmethod
    def adopt(cls, sock: socket.socket, timeout: float | None) -> DeadlineSocket:
        fresh = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        fresh.io_timeout = timeout
        return fresh

    def _bounded(self) -> None:
        left = time_left(self.io_timeout)
        self.settimeout(None if left is None else max(left, 1e-3))

    def recv_into(self, buffer: typing.Any, nbytes: int = 0, flags: int = 0) -> int:
        self._bounded()
        try:
            return super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            raise passed() or TimeoutError("timed out") from None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._bounded()
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:
            raise passed() or TimeoutError("timed out") from None

    def sendall(self, data: typing.Any, flags: int = 0) -> None:
        self._bounded()  # sendall's timeout is for the whole call (Python >= 3.5)
        try:
            super().sendall(data, flags)
        except TimeoutError:
            raise passed() or TimeoutError("timed out") from None

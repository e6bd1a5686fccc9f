"""uvicorn's h11 protocol with deadlines for request headers and request bodies.

uvicorn closes idle keep-alive connections, but a connection that sends part of a request line
or of its headers and then nothing is kept open forever (300 such connections stayed open), each
holding a socket and a file descriptor; so is one that sends its headers and never the body they
announce (its request waits in ``receive()`` for good). Here every connection must complete its
request headers within ``header_timeout`` seconds of opening, or of its previous response, and
then the request's body within ``header_timeout`` seconds of its headers; otherwise it is closed.
A request being answered is never cut by these deadlines (they only close a connection still
waiting for the client's bytes).

The other direction has a deadline too: a client that stops reading its response keeps the
transport's write buffer full, and the response (its array, its share of the in-flight budget)
waits for it for as long as the socket stays open. When the buffer has not drained below its
low-water mark for ``send_timeout`` seconds the connection is aborted: what the client never
took is dropped, the response's coroutine returns at once and releases what it held.
Header size is bounded too: h11 refuses (400) headers still incomplete past ``MAX_HEADER_BYTES``,
and the path guard answers 431 to complete ones over it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.server.guards import MAX_HEADER_BYTES
from service.server.settings import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
    ENV_HEADER_TIMEOUT,
    ENV_SEND_TIMEOUT,
    env_setting,
)
from store.units import parse_seconds

# For ``--workers N`` uvicorn imports the protocol in each worker process by name.
PROTOCOL_IMPORT = "service.server.http_protocol:GuardedH11Protocol"


@functools.cache
def deadlines_from_env() -> tuple[float, float]:
    """(header timeout, send timeout) of a worker process, from ``SCANCACHE_HEADER_TIMEOUT`` and
    ``SCANCACHE_SEND_TIMEOUT`` (``Settings.to_env`` wrote them): read once a process, not on
    every connection."""
    return (
        env_setting(os.environ, ENV_HEADER_TIMEOUT, parse_seconds, DEFAULT_HEADER_TIMEOUT),
        env_setting(os.environ, ENV_SEND_TIMEOUT, parse_seconds, DEFAULT_SEND_TIMEOUT),
    )


class GuardedH11Protocol(H11Protocol):
    """H11Protocol that closes connections whose request does not arrive in time, or whose
    client stops taking its response."""

    header_timeout: float | None = None  # None: $SCANCACHE_HEADER_TIMEOUT or the default
    send_timeout: float | None = None  # None: $SCANCACHE_SEND_TIMEOUT or the default

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._awaiting_body = False
        super().connection_made(transport)
        self._arm_header_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.SEND_BODY and not self._awaiting_body:
            # The headers are in and a body is announced: it gets a deadline of its own.
            self._awaiting_body = True
            self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        self._cancel_send_deadline()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: the client is behind."""
        super().pause_writing()
        if self._send_deadline is None:
            seconds = self.send_timeout if self.send_timeout is not None else deadlines_from_env()[1]
            self._send_deadline = self.loop.call_later(seconds, self._on_send_deadline)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_deadline()

    def _cancel_send_deadline(self) -> None:
        handle = getattr(self, "_send_deadline", None)
        if handle is not None:
            handle.cancel()
            self._send_deadline = None

    def _on_send_deadline(self) -> None:
        self._send_deadline = None
        # abort, not close: close() would wait (for ever) to flush what the client does not read
        self.transport.abort()

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._awaiting_body = self.conn.their_state is h11.SEND_BODY
        seconds = self.header_timeout if self.header_timeout is not None else deadlines_from_env()[0]
        self._header_deadline = self.loop.call_later(seconds, self._on_header_deadline)

    def _cancel_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _on_header_deadline(self) -> None:
        self._header_deadline = None
        # IDLE: the client has not finished a request line and headers since the last response;
        # SEND_BODY: it has sent the headers but not all of the body they announced.
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.transport.get_write_buffer_size():
            # The tail of the last response is still untaken: close() (uvicorn's keep-alive
            # timeout's too) would wait for it for as long as the client does not read.
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(
    seconds: float, send_timeout: float = DEFAULT_SEND_TIMEOUT
) -> type[GuardedH11Protocol]:
    """The protocol class with fixed deadlines (one process: no import by name needed)."""
    deadlines = {"header_timeout": float(seconds), "send_timeout": float(send_timeout)}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), deadlines)


def uvicorn_options(
    header_timeout: float, workers: int = 1, send_timeout: float = DEFAULT_SEND_TIMEOUT
) -> dict[str, Any]:
    """The uvicorn keywords every way of starting the server uses (CLI, tests); worker
    processes read both deadlines from the environment (``Settings.to_env``)."""
    protocol: Any = PROTOCOL_IMPORT if workers > 1 else with_header_timeout(header_timeout, send_timeout)
    return {"http": protocol, "h11_max_incomplete_event_size": MAX_HEADER_BYTES}

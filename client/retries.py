"""How a client request is retried: connection errors, timeouts, 408, 429 and 5xx again with
exponential backoff and full jitter for up to ``retry_seconds`` in all, honouring
``Retry-After``; other 4xx become typed errors at once (``client.http_errors``).

Every request a scancache client sends is a read (GET, or the read-only batch POST), so sending
one again is always safe. A restarted server takes seconds to answer; a training run should
ride that out, saying so every ``RETRY_WARN_EVERY`` seconds, and stop at once when its source
is closed.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx

from client import deadline
from client.http_batch import STALE_CONNECTION, TRANSPORT_ERRORS
from client.http_errors import is_damaged_scan, raise_client_error, response_detail
from store.errors import ScanCacheError, ServerError, one_line
from store.units import parse_seconds, parse_whole

R = TypeVar("R")
log = logging.getLogger("scancache.client")

TIMEOUT_ENV = "SCANCACHE_HTTP_TIMEOUT"
RETRY_SECONDS_ENV = "SCANCACHE_RETRY_SECONDS"
RETRIES_ENV = "SCANCACHE_RETRIES"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRY_SECONDS = 120.0
RETRY_WARN_EVERY = 15.0  # seconds between two "still retrying" warnings of one request
MAX_BACKOFF = 8.0  # the longest pause between two attempts (Retry-After may ask for more)
# What a request on a connection the server has just closed fails with (not a timeout, not
# "connection refused"): retried once at once, silently.
CLOSED_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, *STALE_CONNECTION)
# Statuses that say "try again later" rather than "this request is wrong".
RETRY_STATUSES = frozenset({408, 429})

# Retry jitter from a private generator: training code seeds the global `random` (Keras
# shuffles with it), and a retry must not shift that stream.
_JITTER = random.Random()


def env_number(
    name: str,
    value: float | None,
    default: float | None,
    argument: str = "",
    whole: bool = False,
    positive: bool = False,
) -> float | None:
    """``value`` if given (checked as the variable is, naming ``argument``), else the
    environment variable ``name`` (``store.units``' one parser of whole numbers and of
    seconds, naming the variable; ``positive``: 0 refused), else ``default``."""
    if value is not None:
        label = argument or name
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{label}: must be a number, not negative, got {value!r}")
        if whole and value != int(value):
            raise ValueError(f"{label}: must be a whole number, got {value!r}")
        return float(value)
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if whole:
        return float(parse_whole(text, name, minimum=0))
    return parse_seconds(text, name, zero_ok=not positive)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (delay-seconds or an HTTP-date) as seconds from now, or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """``timeout``: one attempt in all, connect to last byte; ``retry_seconds``: how long one
    request keeps being retried; ``retries``: at most this many retries (None: no limit within
    ``retry_seconds``); ``backoff``: the first pause, doubled each attempt up to MAX_BACKOFF."""

    timeout: float
    retry_seconds: float
    retries: int | None
    backoff: float

    @classmethod
    def from_settings(
        cls, timeout: float | None, retry_seconds: float | None, retries: int | None, backoff: float
    ) -> RetryPolicy:
        """Arguments, else the environment (SCANCACHE_HTTP_TIMEOUT, SCANCACHE_RETRY_SECONDS,
        SCANCACHE_RETRIES), else the defaults."""
        most = env_number(RETRIES_ENV, retries, None, "retries", whole=True)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout: must be more than 0 seconds, got {timeout!r}")  # 0 was 30
        return cls(
            # an attempt's timeout of 0 would end every request at once: refused, as timeout=0 is
            timeout=env_number(TIMEOUT_ENV, timeout, DEFAULT_TIMEOUT, "timeout", positive=True)
            or DEFAULT_TIMEOUT,
            retry_seconds=env_number(RETRY_SECONDS_ENV, retry_seconds, DEFAULT_RETRY_SECONDS, "retry_seconds")
            or 0.0,
            retries=None if most is None else int(most),
            backoff=float(backoff),
        )

    def run(
        self,
        where: str,
        send: Callable[[], tuple[int, R, httpx.Response | None]],
        closed: threading.Event,
    ) -> R:
        """``send()`` -> (status, result, response for errors), until a good answer, a typed
        refusal, the budget's end (ServerError) or ``closed``. ``where``: "METHOD URL" for messages."""
        attempt = 0
        started = time.monotonic()
        last_warned = -RETRY_WARN_EVERY
        reconnected = False
        while True:
            wait_at_least = 0.0
            answered = False  # the last attempt's failure: an answer (the server runs) or none
            try:
                with deadline.attempt_deadline(self.timeout):
                    status, result, response = send()
            except ScanCacheError:  # already one clear line (ServerError is an OSError too)
                raise
            except (httpx.TransportError, *TRANSPORT_ERRORS) as exc:  # timeouts, refused, reset
                failure = f"{type(exc).__name__}: {exc}"
                if attempt == 0 and not reconnected and isinstance(exc, CLOSED_CONNECTION):
                    # Most likely a kept-alive connection the server closed as we sent on it
                    # (uvicorn drops idle ones after 5 s; the pools skip those already closed):
                    # expected, so once, at once and without a word, on a new connection.
                    reconnected = True
                    log.debug("%s: %s; sending again", where, failure)
                    continue
            else:
                if status < 400:
                    return result
                assert response is not None
                if (status < 500 and status not in RETRY_STATUSES) or is_damaged_scan(response):
                    raise_client_error(response)  # the same answer again: no retries
                failure = f"HTTP {status} {response_detail(response)}"
                answered = status not in (502, 504)  # a proxy's: the server behind it may be down
                if status in (429, 503):
                    wait_at_least = retry_after_seconds(response.headers.get("retry-after")) or 0.0
            elapsed = time.monotonic() - started
            # Full jitter keeps many clients from retrying in lockstep after a server restart.
            delay = min(self.backoff * (2**attempt), MAX_BACKOFF) * (0.5 + _JITTER.random() / 2)
            delay = min(max(delay, wait_at_least), self.retry_seconds - elapsed)
            if (self.retries is not None and attempt >= self.retries) or delay <= 0:
                raise ServerError(
                    one_line(
                        f"{where}: no good answer from the server for {elapsed:.0f} s"
                        f" (after {attempt + 1} attempts; last: {failure}); "
                        + (
                            "the server runs, but could not answer: its log says why"
                            if answered
                            else "is `scancache serve` running?"
                        )
                        + " (retry budget: SCANCACHE_RETRY_SECONDS or retry_seconds=)",
                        500,
                    )
                )
            # Long waits show progress; a closed source ends at the wait below, unannounced.
            if not closed.is_set() and elapsed - last_warned >= RETRY_WARN_EVERY:
                last_warned = elapsed
                log.warning(
                    "%s: %s; retrying for up to %.0f s more",
                    where,
                    one_line(failure, 200),
                    self.retry_seconds - elapsed,
                )
            if closed.wait(delay):
                raise ServerError(f"{where}: the source was closed while retrying ({one_line(failure, 200)})")
            attempt += 1

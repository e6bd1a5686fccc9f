"""The server's settings, and how they travel to uvicorn worker processes.

With ``--workers N`` uvicorn starts the app from an import string in fresh processes, so the
settings go through environment variables (``SCANCACHE_*``). The server keeps no other state:
every worker (or replica) opens the same store and keeps only its own caches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from store.reader_share import DEFAULT_CACHE_BYTES
from store.storage import parse_location
from store.units import parse_bytes

DEFAULT_MAX_BYTES = 1 << 30  # one response (or batch) of at most 1 GiB of array data
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a batch request body: thousands of regions fit in 4 MiB
DEFAULT_MAX_BATCH_REGIONS = 4096
# Bytes all requests of one worker process may hold at once (regions being read, merged and
# sent); past it requests wait up to INFLIGHT_WAIT seconds, then get 503 with Retry-After.
DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30

ENV_STORE = "SCANCACHE_STORE"
ENV_TOKEN = "SCANCACHE_TOKEN"
ENV_CACHE_BYTES = "SCANCACHE_CACHE_BYTES"
ENV_MAX_BYTES = "SCANCACHE_MAX_BYTES"
ENV_MAX_BODY_BYTES = "SCANCACHE_MAX_BODY_BYTES"
ENV_MAX_BATCH_REGIONS = "SCANCACHE_MAX_BATCH_REGIONS"
ENV_COMPRESS_MASKS = "SCANCACHE_COMPRESS_MASKS"
ENV_CORS_ORIGINS = "SCANCACHE_CORS_ORIGINS"
ENV_MAX_INFLIGHT_BYTES = "SCANCACHE_MAX_INFLIGHT_BYTES"
ENV_HEADER_TIMEOUT = "SCANCACHE_HEADER_TIMEOUT"  # read by service.server.http_protocol too
DEFAULT_HEADER_TIMEOUT = 10.0
# Seconds a client may leave its response's bytes untaken (the server's write buffer full)
# before the connection is dropped: what a stalled reader holds is bounded in time.
ENV_SEND_TIMEOUT = "SCANCACHE_SEND_TIMEOUT"  # read by service.server.http_protocol too
DEFAULT_SEND_TIMEOUT = 10.0
ENV_PREDICTIONS = "SCANCACHE_PREDICTIONS"


def _positive_int(name: str, value: str | int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not an integer") from None
    if number <= 0:
        raise ValueError(f"{name}: must be positive, got {number}")
    return number


def _size(name: str, value: str | int) -> int:
    """A positive byte size: ``512M`` works in the environment as on the command line."""
    number = parse_bytes(value, name)
    if number <= 0:
        raise ValueError(f"{name}: must be positive, got {number}")
    return number


def positive_seconds(name: str, value: str | float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {str(value)[:40]!r} is not a number of seconds") from None
    if not number > 0:
        raise ValueError(f"{name}: must be positive, got {str(value)[:40]!r}")
    return number


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    """Everything ``create_app`` needs. ``token`` None means no authentication."""

    store: Path | str  # a folder, or s3://BUCKET/PREFIX (store.storage.parse_location)
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_bytes: int = DEFAULT_MAX_BYTES
    token: str | None = field(default=None, repr=False)  # never printed in logs or reprs
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch_regions: int = DEFAULT_MAX_BATCH_REGIONS
    # gzip (level 1) single mask regions for clients that accept it: binary masks shrink 5-200x
    # at several hundred MB/s, while float images barely shrink and are never compressed.
    compress_masks: bool = True
    # Browser readers such as neuroglancer need CORS; empty means no CORS headers.
    cors_origins: tuple[str, ...] = ()
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds to send the request headers
    send_timeout: float = DEFAULT_SEND_TIMEOUT  # seconds a client may stop taking its response
    inflight_wait: float = 5.0  # seconds a request may queue for the in-flight budget, then 503
    # A predictions store (loaders.write_predictions) served beside the scans; None: none.
    predictions: Path | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", parse_location(self.store))
        if self.predictions is not None:
            object.__setattr__(self, "predictions", parse_location(self.predictions))
        for name in ("header_timeout", "send_timeout"):
            object.__setattr__(self, name, positive_seconds(name, getattr(self, name)))
        for name in ("cache_bytes", "max_bytes", "max_body_bytes", "max_inflight_bytes"):
            object.__setattr__(self, name, _size(name, getattr(self, name)))
        object.__setattr__(
            self, "max_batch_regions", _positive_int("max_batch_regions", self.max_batch_regions)
        )
        if self.token is not None and not self.token.strip():
            object.__setattr__(self, "token", None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``SCANCACHE_*`` variables (how worker processes receive them)."""
        env = os.environ if env is None else env
        if not env.get(ENV_STORE):
            raise ValueError(f"{ENV_STORE} is not set: which store should the server serve?")
        base = cls(store=parse_location(env[ENV_STORE]))
        origins = tuple(o.strip() for o in env.get(ENV_CORS_ORIGINS, "").split(",") if o.strip())
        return cls(
            store=base.store,
            cache_bytes=_size(ENV_CACHE_BYTES, env.get(ENV_CACHE_BYTES, base.cache_bytes)),
            max_bytes=_size(ENV_MAX_BYTES, env.get(ENV_MAX_BYTES, base.max_bytes)),
            token=env.get(ENV_TOKEN) or None,
            max_body_bytes=_size(ENV_MAX_BODY_BYTES, env.get(ENV_MAX_BODY_BYTES, base.max_body_bytes)),
            max_batch_regions=_positive_int(
                ENV_MAX_BATCH_REGIONS, env.get(ENV_MAX_BATCH_REGIONS, base.max_batch_regions)
            ),
            compress_masks=_flag(env.get(ENV_COMPRESS_MASKS, "1")),
            cors_origins=origins,
            max_inflight_bytes=_size(
                ENV_MAX_INFLIGHT_BYTES, env.get(ENV_MAX_INFLIGHT_BYTES, base.max_inflight_bytes)
            ),
            header_timeout=positive_seconds(
                ENV_HEADER_TIMEOUT, env.get(ENV_HEADER_TIMEOUT, base.header_timeout)
            ),
            send_timeout=positive_seconds(ENV_SEND_TIMEOUT, env.get(ENV_SEND_TIMEOUT, base.send_timeout)),
            predictions=parse_location(env[ENV_PREDICTIONS]) if env.get(ENV_PREDICTIONS) else None,
        )

    def to_env(self) -> dict[str, str]:
        """The inverse of :meth:`from_env`."""
        env = {
            ENV_STORE: str(self.store),
            ENV_CACHE_BYTES: str(self.cache_bytes),
            ENV_MAX_BYTES: str(self.max_bytes),
            ENV_MAX_BODY_BYTES: str(self.max_body_bytes),
            ENV_MAX_BATCH_REGIONS: str(self.max_batch_regions),
            ENV_COMPRESS_MASKS: "1" if self.compress_masks else "0",
            ENV_CORS_ORIGINS: ",".join(self.cors_origins),
            ENV_MAX_INFLIGHT_BYTES: str(self.max_inflight_bytes),
            ENV_HEADER_TIMEOUT: str(self.header_timeout),
            ENV_SEND_TIMEOUT: str(self.send_timeout),
        }
        if self.token:
            env[ENV_TOKEN] = self.token
        if self.predictions is not None:
            env[ENV_PREDICTIONS] = str(self.predictions)
        return env

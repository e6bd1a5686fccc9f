"""The server's settings: the one place where ``scancache serve``'s flags, the ``SCANCACHE_*``
environment variables and the defaults are merged (:meth:`Settings.resolve`), and how they
travel to uvicorn worker processes.

With ``--workers N`` uvicorn starts the app from an import string in fresh processes, so the
settings go through environment variables (``SCANCACHE_*``, :meth:`Settings.to_env`). The server
keeps no other state: every worker (or replica) opens the same store and keeps only its own caches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from store.reader_share import DEFAULT_CACHE_BYTES
from store.storage import parse_location
from store.units import format_seconds, parse_bytes, parse_port, parse_seconds, parse_token, parse_whole

T = TypeVar("T")

DEFAULT_MAX_BYTES = 1 << 30  # one response (or batch) of at most 1 GiB of array data
DEFAULT_MAX_BODY_BYTES = 4 << 20  # a batch request body: thousands of regions fit in 4 MiB
DEFAULT_MAX_BATCH_REGIONS = 4096
# Bytes all requests of one worker process may hold at once (regions being read, merged and
# sent); past it requests wait up to INFLIGHT_WAIT seconds, then get 503 with Retry-After.
DEFAULT_MAX_INFLIGHT_BYTES = 1 << 30

ENV_STORE = "SCANCACHE_STORE"
ENV_HOST = "SCANCACHE_HOST"
ENV_PORT = "SCANCACHE_PORT"
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
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
NO_STORE = f"give the STORE to serve, or set {ENV_STORE}"


def positive_size(value: str | int, name: str) -> int:
    """A byte size more than 0: ``512M`` works in the environment as on the command line."""
    return parse_bytes(value, name, positive=True)


def positive_whole(value: str | int, name: str) -> int:
    return parse_whole(value, name, minimum=1)


def _flag(value: str, name: str = "") -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _origins(value: str, name: str = "") -> tuple[str, ...]:
    return tuple(o.strip() for o in value.split(",") if o.strip())


def _text(value: str, name: str = "") -> str | None:
    return value.strip() or None  # set but empty: as if unset


def _port(value: str, name: str) -> int | None:
    # Kubernetes sets SCANCACHE_PORT=tcp://10.0.0.7:8000 in every pod of a namespace with a
    # Service named "scancache" (its docker-link variables): that is no setting of ours
    if value.strip().lower().startswith(("tcp://", "udp://", "sctp://")):
        return None
    return parse_port(value, name)


def _location(value: str, name: str = "") -> Path | str | None:
    return parse_location(value) if value.strip() else None


# Each environment variable, the field it sets and its parser (``parse(text, variable)``; a
# refusal names the variable). A variable set to "" is a value like any other, except for the
# texts (``_text``, ``_location``), for which it means "not set".
ENV_FIELDS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "store": (ENV_STORE, _location),
    "host": (ENV_HOST, _text),
    "port": (ENV_PORT, _port),
    "token": (ENV_TOKEN, parse_token),
    "cache_bytes": (ENV_CACHE_BYTES, positive_size),
    "max_bytes": (ENV_MAX_BYTES, positive_size),
    "max_body_bytes": (ENV_MAX_BODY_BYTES, positive_size),
    "max_batch_regions": (ENV_MAX_BATCH_REGIONS, positive_whole),
    "compress_masks": (ENV_COMPRESS_MASKS, _flag),
    "cors_origins": (ENV_CORS_ORIGINS, _origins),
    "max_inflight_bytes": (ENV_MAX_INFLIGHT_BYTES, positive_size),
    "header_timeout": (ENV_HEADER_TIMEOUT, parse_seconds),
    "send_timeout": (ENV_SEND_TIMEOUT, parse_seconds),
    "predictions": (ENV_PREDICTIONS, _location),
}


def env_setting(env: Mapping[str, str], name: str, parse: Callable[[str, str], T], default: T) -> T:
    """The variable ``name`` of ``env`` parsed by ``parse`` (naming it), else ``default``."""
    text = env.get(name)
    return default if text is None else parse(text, name)


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

    # Where to listen (``scancache serve --host/--port``); create_app does not use them.
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        """Checks of values set from Python (``Settings(store=..., max_bytes=...)``); text from
        the command line and the environment is parsed by :meth:`resolve`, naming its flag or
        variable."""
        object.__setattr__(self, "store", parse_location(self.store))
        if self.predictions is not None:
            object.__setattr__(self, "predictions", parse_location(self.predictions))
        for name in ("header_timeout", "send_timeout"):
            object.__setattr__(self, name, parse_seconds(getattr(self, name), name))
        for name in ("cache_bytes", "max_bytes", "max_body_bytes", "max_inflight_bytes"):
            object.__setattr__(self, name, positive_size(getattr(self, name), name))
        object.__setattr__(
            self, "max_batch_regions", positive_whole(self.max_batch_regions, "max_batch_regions")
        )
        object.__setattr__(self, "port", parse_port(self.port, "port"))
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"host: {self.host!r} is not an address to listen on")
        object.__setattr__(self, "token", parse_token(self.token, "token"))

    @classmethod
    def resolve(cls, flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
        """The one merge of settings: each field from ``flags`` (values already parsed by the
        command line's types, or given to ``service.server.run``; None: not given), else from its
        ``SCANCACHE_*`` variable in ``env`` (parsed here, a refusal naming the variable), else
        its default. A flag given wins and its variable is not read at all (a bad one in the
        environment must not stop a command line that sets it right)."""
        env = os.environ if env is None else env
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flags) - known)
        if unknown:
            raise TypeError(f"Settings.resolve: unknown settings {', '.join(unknown)}")
        values: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
        for name, (variable, parse) in ENV_FIELDS.items():
            if name not in values:
                value = env_setting(env, variable, parse, None)
                if value is not None:
                    values[name] = value
        if "store" not in values:
            raise ValueError(NO_STORE)
        return cls(**values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``SCANCACHE_*`` variables (how worker processes receive them)."""
        env = os.environ if env is None else env
        if not env.get(ENV_STORE, "").strip():
            raise ValueError(f"{ENV_STORE} is not set: which store should the server serve?")
        return cls.resolve({}, env)

    def to_env(self) -> dict[str, str]:
        """The inverse of :meth:`from_env`."""
        env = {
            ENV_STORE: str(self.store),
            ENV_HOST: self.host,
            ENV_PORT: str(self.port),
            ENV_CACHE_BYTES: str(self.cache_bytes),
            ENV_MAX_BYTES: str(self.max_bytes),
            ENV_MAX_BODY_BYTES: str(self.max_body_bytes),
            ENV_MAX_BATCH_REGIONS: str(self.max_batch_regions),
            ENV_COMPRESS_MASKS: "1" if self.compress_masks else "0",
            ENV_CORS_ORIGINS: ",".join(self.cors_origins),
            ENV_MAX_INFLIGHT_BYTES: str(self.max_inflight_bytes),
            ENV_HEADER_TIMEOUT: format_seconds(self.header_timeout),
            ENV_SEND_TIMEOUT: format_seconds(self.send_timeout),
        }
        if self.token:
            env[ENV_TOKEN] = self.token
        if self.predictions is not None:
            env[ENV_PREDICTIONS] = str(self.predictions)
        return env

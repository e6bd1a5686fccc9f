"""``run(...)``: start uvicorn for one store (what ``scancache serve`` calls)."""

from __future__ import annotations

import dataclasses
import errno
import os

import uvicorn

from service.server.app import close_app, create_app
from service.server.http_protocol import uvicorn_options
from service.server.settings import (
    ENV_CACHE_BYTES,
    ENV_HEADER_TIMEOUT,
    ENV_MAX_BYTES,
    ENV_MAX_INFLIGHT_BYTES,
    ENV_PREDICTIONS,
    ENV_SEND_TIMEOUT,
    ENV_STORE,
    ENV_TOKEN,
    Settings,
)
from store.storage import parse_location

APP_FACTORY = "service.server.app:app_from_env"


def check_port_free(host: str, port: int) -> None:
    """One line, before anything starts, when the address is taken (uvicorn would say
    "Application startup complete", then fail with errno 98 and exit 3)."""
    import socket

    # the family uvicorn binds (IPv6 for an address with a colon), so "localhost" is 127.0.0.1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"{host}:{port} is already in use (another server?): choose another --port"
                ) from None
            # another cause (no such address here, a name that does not resolve): uvicorn's
            # own start says it, as before


def run(
    store: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    cache_bytes: int | None = None,
    max_bytes: int | None = None,
    token: str | None = None,
    log_level: str = "info",
    max_inflight_bytes: int | None = None,
    header_timeout: float | None = None,
    send_timeout: float | None = None,
    predictions: str | os.PathLike[str] | None = None,
) -> None:
    """Serve ``store`` until interrupted.

    ``token`` defaults to ``SCANCACHE_TOKEN`` (keep secrets out of command lines); the other
    ``SCANCACHE_*`` variables (``service.server.settings``) apply too, e.g. ``cache_bytes``
    None is ``SCANCACHE_CACHE_BYTES`` if set, else 512 MiB; a value given here wins. Each of the ``workers``
    processes has its own chunk cache of ``cache_bytes`` and in-flight budget of
    ``max_inflight_bytes``; they share nothing else.
    """
    if workers < 1:
        raise ValueError(f"--workers: must be at least 1, got {workers}")
    # Options without a keyword here (CORS, body limits, mask compression) come from SCANCACHE_*.
    # A value given here wins over its variable, which is then not read at all (a bad one in
    # the environment must not stop a command line that sets it right).
    given = {
        ENV_CACHE_BYTES: cache_bytes, ENV_MAX_BYTES: max_bytes, ENV_TOKEN: token,
        ENV_MAX_INFLIGHT_BYTES: max_inflight_bytes, ENV_HEADER_TIMEOUT: header_timeout,
        ENV_SEND_TIMEOUT: send_timeout, ENV_PREDICTIONS: predictions,
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if given.get(k) is None}
    base = Settings.from_env({**env, ENV_STORE: str(parse_location(store))})
    settings = dataclasses.replace(
        base,
        cache_bytes=cache_bytes if cache_bytes is not None else base.cache_bytes,
        max_bytes=max_bytes if max_bytes is not None else base.max_bytes,
        token=token if token is not None else base.token,
        max_inflight_bytes=max_inflight_bytes if max_inflight_bytes is not None else base.max_inflight_bytes,
        header_timeout=header_timeout if header_timeout is not None else base.header_timeout,
        send_timeout=send_timeout if send_timeout is not None else base.send_timeout,
        predictions=parse_location(predictions) if predictions is not None else base.predictions,
    )
    options = uvicorn_options(settings.header_timeout, workers, settings.send_timeout)
    app = create_app(settings)  # fails here, once, with a clear message (bad store, format)
    try:
        check_port_free(host, port)
    except ValueError:
        close_app(app)
        raise
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level, **options)  # lifespan closes it
        return
    close_app(app)  # only the check: each worker process builds its own app
    os.environ.update(settings.to_env())  # worker processes inherit the settings
    uvicorn.run(
        APP_FACTORY, factory=True, host=host, port=port, workers=workers, log_level=log_level, **options
    )

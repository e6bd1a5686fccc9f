"""``run(...)``: start uvicorn for one store (what ``scancache serve`` calls)."""

from __future__ import annotations

import errno
import os

import uvicorn

from service.server.app import close_app, create_app
from service.server.http_protocol import uvicorn_options
from service.server.settings import Settings

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
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
    cache_bytes: int | None = None,
    max_bytes: int | None = None,
    token: str | None = None,
    log_level: str = "info",
    max_inflight_bytes: int | None = None,
    header_timeout: float | None = None,
    send_timeout: float | None = None,
    predictions: str | os.PathLike[str] | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``store`` until interrupted (``access_log``: a line per request).

    ``token`` defaults to ``SCANCACHE_TOKEN`` (keep secrets out of command lines); the other
    ``SCANCACHE_*`` variables (``service.server.settings``) apply too, e.g. ``cache_bytes``
    None is ``SCANCACHE_CACHE_BYTES`` if set, else 512 MiB; ``host`` None is ``SCANCACHE_HOST``,
    else 127.0.0.1; a value given here wins (``Settings.resolve``). Each of the ``workers``
    processes has its own chunk cache of ``cache_bytes`` and in-flight budget of
    ``max_inflight_bytes``; they share nothing else.
    """
    flags = {
        "store": store, "host": host, "port": port, "cache_bytes": cache_bytes, "max_bytes": max_bytes,
        "token": token, "max_inflight_bytes": max_inflight_bytes, "header_timeout": header_timeout,
        "send_timeout": send_timeout, "predictions": predictions,
    }  # fmt: skip
    serve(Settings.resolve(flags), workers=workers, log_level=log_level, access_log=access_log)


def serve(settings: Settings, workers: int = 1, log_level: str = "info", access_log: bool = False) -> None:
    """Serve with ``settings`` (``Settings.resolve``: what ``scancache serve`` builds once)
    until interrupted; ``workers`` > 1 processes receive them through ``SCANCACHE_*``. Quiet in
    normal operation: start, stop, warnings and errors; ``access_log``: a line per request too."""
    if workers < 1:
        raise ValueError(f"--workers: must be at least 1, got {workers}")
    host, port = settings.host, settings.port
    options = uvicorn_options(settings.header_timeout, workers, settings.send_timeout)
    app = create_app(settings)  # fails here, once, with a clear message (bad store, format)
    try:
        check_port_free(host, port)
    except ValueError:
        close_app(app)
        raise
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, **options)
        return
    close_app(app)  # only the check: each worker process builds its own app
    os.environ.update(settings.to_env())  # worker processes inherit the settings (the token too)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=access_log,
        **options,
    )

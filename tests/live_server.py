"""A real uvicorn server on 127.0.0.1 for tests: ``with live_server(store) as url: ...``.

By default the server runs in a thread of the test process (fast to start, real sockets, real
HTTP). ``process=True`` starts it the way users do, through ``service.server.run`` in a child
process (needed for ``workers > 1``). Either way it is always shut down on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"


def _wait_healthy(url: str, alive: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server at {url} exited before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not answer /health within {timeout}s: {last}")


@contextlib.contextmanager
def _thread_server(store: Path, token: str | None, settings: dict[str, Any], timeout: float) -> Iterator[str]:
    import uvicorn

    from service.server import Settings, create_app
    from service.server.http_protocol import uvicorn_options

    port = settings.pop("port", 0)  # a fixed port: another server at the same address
    app = create_app(Settings(store=store, token=token, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))  # 0: the kernel picks a free port; no race with other tests
    port = sock.getsockname()[1]
    # The protocol options `scancache serve` uses (header deadline, header size bound).
    chosen = app.state.scancache.settings
    options = uvicorn_options(chosen.header_timeout, send_timeout=chosen.send_timeout)
    # log_config=None: uvicorn's own logging set-up (dictConfig) closes every handler in the
    # process, absl's among them (TensorFlow's), whose stream is the capture file pytest had as
    # stderr when TensorFlow was imported; a later test then found stderr closed ("lost sys.stderr").
    config = uvicorn.Config(
        app, host=HOST, port=port, log_level="warning", log_config=None, lifespan="on", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}"
    )
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        _wait_healthy(url, thread.is_alive, timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn thread for {url} did not stop")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process_server(
    store: Path, token: str | None, settings: dict[str, Any], timeout: float
) -> Iterator[str]:
    port = settings.pop("port", None) or _free_port()  # a fixed port: restart tests
    kwargs = {"store": str(store), "host": HOST, "port": port, "log_level": "warning", **settings}
    code = textwrap.dedent(
        f"""
        from service.server import run
        run(**{kwargs!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    if token:
        env["SCANCACHE_TOKEN"] = token  # the way users pass it: never on the command line
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    # A session of its own, so the uvicorn supervisor and its workers stop together.
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        _wait_healthy(url, lambda: proc.poll() is None, timeout)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a crash
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def live_server(
    store: str | os.PathLike[str],
    token: str | None = None,
    *,
    process: bool = False,
    timeout: float = 60.0,
    **settings: Any,
) -> Iterator[str]:
    """Serve ``store`` on a free loopback port; yields the base URL (no trailing slash).

    ``settings`` are ``Settings`` fields (``max_bytes=...``) and ``port`` (default: a free one);
    with ``process=True`` they are ``service.server.run`` keywords instead (``workers=2``,
    ``cache_bytes=...``).
    """
    from store.storage import parse_location

    start = _process_server if process or settings.get("workers", 1) > 1 else _thread_server
    with start(parse_location(str(store)), token, settings, timeout) as url:
        yield url

"""Servers on loopback for the benchmarks: ``scancache serve`` and a static-file baseline.

Both are real uvicorn processes started the way an operator would (the CLI, ``python -m
uvicorn``), in their own session so that every process they spawn stops with them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HOST = "127.0.0.1"
_SESSIONS: dict[str, int] = {}  # url of a running server -> its session id (the first pid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not start within {timeout}s")


@contextlib.contextmanager
def _process(cmd: list[str], url: str, probe: str, env: dict[str, str] | None = None) -> Iterator[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "SCANCACHE_TOKEN"}
    full_env.update(env or {})
    # the server's own log (access lines included) would drown the report's progress lines
    proc = subprocess.Popen(
        cmd, env=full_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait(url, proc, probe)
        _SESSIONS[url] = proc.pid
        yield url
    finally:
        _SESSIONS.pop(url, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def server_cpu_s(url: str) -> float:
    """CPU seconds (user + kernel) used so far by the server at ``url``: every live process of
    its session, with the children they reaped (Linux ``/proc``; NaN elsewhere). Subtract two
    readings for the CPU a measurement cost the server."""
    sid, total = _SESSIONS[url], 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return float("nan")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        if int(fields[3]) == sid:  # field 6, the session
            total += sum(int(n) for n in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def scancache_server(
    store: Path, workers: int = 1, cache_bytes: str = "512M"
) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", str(store), "--host", HOST, "--port", str(port),
           "--workers", str(workers), "--cache-bytes", cache_bytes]  # fmt: skip
    return _process(cmd, f"http://{HOST}:{port}", "/health")


def static_server(directory: Path, workers: int = 1) -> contextlib.AbstractContextManager[str]:
    """Starlette ``StaticFiles`` under uvicorn: the same HTTP stack, no decoding, no Python work."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.static_app:app", "--host", HOST, "--port", str(port),
           "--workers", str(workers), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    return _process(cmd, f"http://{HOST}:{port}", "/", {"BENCH_STATIC_DIR": str(directory)})

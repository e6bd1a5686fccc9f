"""Issue 21 item 10, the server and CLI side: /docs offline, ``.../zarr/`` with its slash,
``SCANCACHE_CACHE_BYTES`` / ``SCANCACHE_MAX_BYTES`` honoured by ``scancache serve``, ``scancache
--version``, and the demo's closing command runnable without an activated environment."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
import zarr
from live_server import HOST, _free_port, _wait_healthy, live_server

ROOT = Path(__file__).resolve().parents[1]
SCAN = "0000001_V00-Aug00"


@contextlib.contextmanager
def cli_server(store, *flags, **env_vars):
    """``scancache serve STORE FLAGS`` in a subprocess, as a user starts it, with ``env_vars``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env.update(env_vars, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "service.cli", "serve", str(store), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    url = f"http://{HOST}:{port}"
    try:
        _wait_healthy(url, lambda: proc.poll() is None, 60)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        if proc.stderr:
            proc.stderr.close()


def cache_limit(url):
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^scancache_chunk_cache_limit_bytes (\S+)$", text, re.M).group(1))


def test_serve_honours_cache_and_max_bytes_from_the_environment_and_the_flag_wins(small_store):
    root = small_store[0]
    with cli_server(root, SCANCACHE_CACHE_BYTES="64M", SCANCACHE_MAX_BYTES="20K") as url:
        assert cache_limit(url) == 64 * 2**20
        small = httpx.get(f"{url}/scans/{SCAN}/image", params={"roi": "0:8,0:8,0:2"})
        assert small.status_code == 200
        whole = httpx.get(f"{url}/scans/{SCAN}/image")  # 40*36*12 float32 = 69 KB > 20K
        assert whole.status_code == 413 and "max" in whole.json()["detail"].lower()
    with cli_server(root, "--cache-bytes", "32M", "--max-bytes", "1M", SCANCACHE_CACHE_BYTES="64M",
                    SCANCACHE_MAX_BYTES="20K") as url:  # fmt: skip
        assert cache_limit(url) == 32 * 2**20
        assert httpx.get(f"{url}/scans/{SCAN}/image").status_code == 200
    # the flag wins even over a variable that does not parse: the variable is not read at all
    with cli_server(
        root,
        "--cache-bytes",
        "32M",
        "--max-bytes",
        "1M",
        SCANCACHE_CACHE_BYTES="garbage",
        SCANCACHE_MAX_BYTES="",
    ) as url:
        assert cache_limit(url) == 32 * 2**20


def test_a_bad_size_in_the_environment_is_one_line_naming_it(small_store):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env.update(SCANCACHE_CACHE_BYTES="lots", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", str(small_store[0]), "--port", str(_free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.strip().startswith("scancache serve: error: SCANCACHE_CACHE_BYTES")
    assert len(run.stderr.strip().splitlines()) == 1


def test_docs_pages_load_their_scripts_from_the_server_itself(small_store):
    with live_server(small_store[0]) as url:
        for page, assets in (("/docs", 2), ("/redoc", 1)):
            html = httpx.get(f"{url}{page}").text
            sources = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
            assert len([s for s in sources if s.startswith("/docs/assets/")]) >= assets, sources
            assert not [s for s in sources if "//" in s], f"{page} loads from elsewhere: {sources}"
            for source in sources:
                got = httpx.get(f"{url}{source}")
                assert got.status_code == 200 and len(got.content) > 100, source
        bundle = httpx.get(f"{url}/docs/assets/swagger-ui-bundle.js")
        assert (
            bundle.headers["content-type"].startswith("text/javascript")
            and b"SwaggerUIBundle" in bundle.content
        )
        assert httpx.get(f"{url}/docs/assets/../zarr.json").status_code in (400, 404)
        assert httpx.get(f"{url}/docs/assets/__init__.py").status_code == 404
        assert httpx.get(f"{url}/openapi.json").json()["info"]["version"] == metadata.version("scancache")
    with live_server(small_store[0], token="s3cret") as url:  # no data in them: no token needed
        assert httpx.get(f"{url}/docs/assets/swagger-ui.css").status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 401


def test_zarr_tree_opens_with_the_trailing_slash(small_store):
    root, truth = small_store
    with live_server(root) as url:
        for base in (f"{url}/zarr/", f"{url}/zarr"):
            group = zarr.open_group(base, mode="r")
            assert list(group.group_keys()) == []  # folders are not listed: open scans by id
            np.testing.assert_array_equal(group[SCAN]["image"][...], truth[SCAN][0])
        for folder in ("/zarr/", "/zarr//", f"/zarr/{SCAN}/", f"/zarr/{SCAN}/image/"):
            got = httpx.get(f"{url}{folder}")
            assert got.status_code == 404 and got.json()["error"] == "NotInStore", folder
        assert httpx.get(f"{url}/zarr//etc/passwd").status_code == 400


def test_version_comes_from_the_package_metadata():
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == f"scancache {metadata.version('scancache')}"


def test_the_demos_closing_command_runs_without_an_activated_environment():
    from examples.demo import scancache_command

    command = shlex.split(scancache_command())
    assert Path(command[0]).is_absolute()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env.update(PATH="/usr/bin:/bin", PYTHONPATH=str(ROOT))  # no .venv/bin on PATH
    run = subprocess.run([*command, "serve", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]
    assert "--predictions" in run.stdout


def test_serve_takes_its_store_from_scancache_store_as_its_other_settings(small_store):
    root = small_store[0]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env.update(SCANCACHE_STORE=str(root), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        url = f"http://{HOST}:{port}"
        _wait_healthy(url, lambda: proc.poll() is None, 60)
        assert SCAN in [s["scan_id"] for s in httpx.get(f"{url}/scans").json()["scans"]]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    del env["SCANCACHE_STORE"]
    run = subprocess.run([*cmd[:-2]], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr == "scancache serve: error: give the STORE to serve, or set SCANCACHE_STORE\n"


@pytest.mark.parametrize("flag", ["--cache-bytes", "--max-bytes"])
def test_serve_help_names_the_environment_variable(flag):
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    variable = {"--cache-bytes": "SCANCACHE_CACHE_BYTES", "--max-bytes": "SCANCACHE_MAX_BYTES"}[flag]
    assert variable in " ".join(run.stdout.split())


def test_a_taken_port_is_one_line_before_anything_starts(small_store):
    import socket

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags in ((), ("--workers", "2")):
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "serve",
                    str(small_store[0]),
                    "--port",
                    str(port),
                    *flags,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 1 and result.stderr.strip() == (
                f"scancache serve: error: {HOST}:{port} is already in use (another server?): choose another --port"
            ), result.stderr


def test_serve_takes_its_address_from_scancache_host_and_port(small_store):
    """The Docker image's HEALTHCHECK reads SCANCACHE_PORT: serve listens there too."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env.update(SCANCACHE_PORT=str(port), SCANCACHE_HOST=HOST, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "service.cli", "serve", str(small_store[0])]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(f"http://{HOST}:{port}", lambda: proc.poll() is None, 60)
        assert httpx.get(f"http://{HOST}:{port}/scans").status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    refused = subprocess.run(
        cmd, env={**env, "SCANCACHE_PORT": "abc"}, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == "scancache serve: error: SCANCACHE_PORT: 'abc' is not a port number"

"""Remote training rides out a server restart: the real ``scancache serve`` is killed mid-epoch
and started again seconds later on the same port; every batch read across it is exact (compared
with numpy reads of the store's Zarr arrays), none lost, duplicated or out of order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import zarr

from client.http import HttpSource
from loaders import Config, DatasetCatalog, build_loader
from loaders.catalog import close_shared_sources
from store.errors import ServerError
from store.protocol import RegionRequest

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [0, [1, 2], 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(store: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "service.cli", "serve", str(store), "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "scancache serve exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


class Restartable:
    """The real server in a child process, killed with SIGKILL and restarted on its port."""

    def __init__(self, store: Path) -> None:
        self.store, self.port = store, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(store, self.port)
        self.restarted = threading.Event()
        wait_healthy(self.url, self.proc)

    def kill_and_restart_after(self, seconds: float) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

        def later() -> None:
            time.sleep(seconds)
            self.proc = start_server(self.store, self.port)
            self.restarted.set()

        threading.Thread(target=later, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def server(small_store):
    srv = Restartable(small_store[0])
    yield srv
    srv.restarted.wait(30)
    srv.stop()


def reference(store: Path, req: RegionRequest) -> np.ndarray:
    """numpy of the store's Zarr arrays, read with zarr-python (not scancache's reader)."""
    scan = zarr.open_group(store, mode="r")[req.scan_id]
    region = tuple(req.roi)
    if req.array == "image":
        return np.asarray(scan["image"][region])
    mask = np.asarray(scan["mask"][region])
    return np.stack([mask[..., [g] if isinstance(g, int) else g].sum(-1) for g in CATEGORIES], -1).astype(
        np.uint8
    )


def batches(store: Path) -> list[list[RegionRequest]]:
    out = []
    for scan_id in ("0000001_V00-Aug00", "0000001_V01-Aug00", "0000002_V00-Aug00"):
        depth = zarr.open_group(store, mode="r")[scan_id]["image"].shape[2]
        for z in range(depth):
            roi = (slice(None), slice(None), slice(z, z + 1))
            out.append(
                [RegionRequest(scan_id, "image", roi), RegionRequest(scan_id, "mask", roi, CATEGORIES)]
            )
    return out


def test_batches_ride_out_a_server_restart(server, small_store):
    store = small_store[0]
    plan = batches(store)
    kill_at = len(plan) // 3
    got: list[list[np.ndarray]] = []
    with HttpSource(server.url, retry_seconds=60, backoff=0.1) as source:
        for i, requests in enumerate(plan):
            if i == kill_at:
                server.kill_and_restart_after(3.0)
            got.append(source.read_regions(requests))
        assert server.restarted.is_set()  # the reads after the kill waited for the new server
    assert len(got) == len(plan)
    for requests, arrays in zip(plan, got, strict=True):
        assert len(arrays) == len(requests)
        for req, arr in zip(requests, arrays, strict=True):
            expected = reference(store, RegionRequest(req.scan_id, req.array, _concrete(store, req)))
            assert arr.dtype == expected.dtype
            np.testing.assert_array_equal(arr, expected)


def _concrete(store: Path, req: RegionRequest) -> tuple[slice, ...]:
    shape = zarr.open_group(store, mode="r")[req.scan_id]["image"].shape
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(req.roi, shape, strict=True))


def test_a_loader_epoch_rides_out_a_restart(server, small_store):
    store = small_store[0]
    names = ("restart_local", "restart_http")
    for name in names:
        DatasetCatalog.remove(name)
    close_shared_sources()
    DatasetCatalog.register(names[0], str(store), split="train")
    DatasetCatalog.register(names[1], server.url, timeout=10, retry_seconds=60, split="train")
    try:
        # SHUFFLE_BLOCKS=0: every batch reads from the server (blocks would serve the second
        # half of this small epoch from memory, never meeting the outage)
        cfg = Config(
            SEED=3,
            CATEGORIES=(0, (1, 2), 3),
            INCLUDE_BACKGROUND=True,
            TAG="DefaultDataLoader",
            SHUFFLE_BLOCKS=0,
        )
        local, remote = (
            build_loader(cfg, n, batch_size=4, is_test=False, shuffle=True, drop_last=False) for n in names
        )
        assert remote.scans[0].source.retry_seconds == 60 and remote.scans[0].source.timeout == 10
        assert len(local) == len(remote) >= 4
        for b in range(len(remote)):
            if b == len(remote) // 2:
                server.kill_and_restart_after(2.0)
            for a, r in zip(local[b], remote[b], strict=True):
                np.testing.assert_array_equal(a, r)
        assert server.restarted.is_set()
    finally:
        for name in names:
            DatasetCatalog.remove(name)
        close_shared_sources()


def test_past_the_budget_the_error_says_the_server_is_gone(server):
    with HttpSource(server.url, retry_seconds=1.0, backoff=0.05) as source:
        assert source.list_scans()
        server.kill_and_restart_after(0.0)
        server.restarted.wait(10)
        server.proc.send_signal(signal.SIGKILL)  # and gone again, for good
        server.proc.wait(10)
        with pytest.raises(ServerError) as info:
            source.list_scans()
    message = str(info.value)
    assert "no good answer from the server for 1 s" in message and "\n" not in message
    assert "scancache serve" in message

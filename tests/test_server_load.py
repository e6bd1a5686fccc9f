"""Bounded resources under load, against real servers.

* The batch client's connections stay bounded across threads and epochs (Keras starts a new
  thread pool every epoch).
* 32 concurrent clients for LOAD_SECONDS (60 s; SCANCACHE_LOAD_TEST_SECONDS to change) against
  ``scancache serve`` in its own process: zero errors, every answer exact, and the server's RSS
  grows by at most ``--cache-bytes`` + ``--max-inflight-bytes`` + RSS_MARGIN over its idle RSS;
  a reader that stops reading its response does not stall the others.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from conftest import build_store
from live_server import live_server

from client.http import HttpSource
from store.protocol import RegionRequest

SCANS = [(f"000001{i}_V00-Aug00", (128, 128, 32), 3, "train", 10 + i, 0, 0, np.float32) for i in range(4)]
LOAD_SECONDS = float(os.environ.get("SCANCACHE_LOAD_TEST_SECONDS", "60"))
CLIENTS = 32
CACHE_BYTES = 16 * 2**20
INFLIGHT_BYTES = 64 * 2**20
RSS_MARGIN = 192 * 2**20  # interpreter heap growth, per-connection buffers, allocator slack


@pytest.fixture(scope="module")
def load_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("load") / "store"
    return root, build_store(root, scans=SCANS, image_only=())


def client_sockets(port: int) -> int:
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_batch_connections_stay_bounded_across_thread_pools(load_store):
    root, truth = load_store
    scan = SCANS[0][0]
    requests = [RegionRequest(scan, "image", (slice(None), slice(None), slice(z, z + 1))) for z in range(4)]
    with live_server(root) as url, HttpSource(url, max_connections=3, regions_per_request=1) as source:
        port = int(url.rsplit(":", 1)[1])
        for _epoch in range(8):  # a fresh pool of 6 threads each epoch, as Keras does
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda _: source.read_regions(requests), range(12)))
            for arrays in results:
                for z, arr in enumerate(arrays):
                    np.testing.assert_array_equal(arr, truth[scan][0][:, :, z : z + 1])
            assert source._poster is not None and source._poster.idle_connections() <= 3
            assert client_sockets(port) <= 3 + 3  # batch pool + httpx pool, both bounded by 3


def reference(truth, req: RegionRequest) -> np.ndarray:
    image, mask = truth[req.scan_id]
    return image[req.roi] if req.array == "image" else mask[req.roi]


def one_client(url: str, truth, seed: int, stop: threading.Event, done: list[int], errors: list[str]) -> None:
    rng = random.Random(seed)
    with HttpSource(url, retry_seconds=0) as source:  # no retries: any failure is an error here
        while not stop.is_set():
            scan = rng.choice(SCANS)[0]
            z = rng.randrange(0, 28)
            y, x = rng.randrange(0, 64), rng.randrange(0, 64)
            roi = (slice(y, y + 64), slice(x, x + 64), slice(z, z + 4))
            reqs = [RegionRequest(scan, "image", roi), RegionRequest(scan, "mask", roi)]
            try:
                if rng.random() < 0.2:
                    got = [source.read_image(scan, roi)]
                    reqs = reqs[:1]
                else:
                    got = source.read_regions(reqs)
                for req, arr in zip(reqs, got, strict=True):
                    if not np.array_equal(arr, reference(truth, req)):
                        errors.append(f"wrong voxels for {req}")
                done[seed] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return


def test_32_clients_for_a_while_zero_errors_and_bounded_rss(load_store):
    root, truth = load_store
    with live_server(root, process=True, cache_bytes=CACHE_BYTES, max_inflight_bytes=INFLIGHT_BYTES) as url:
        port = int(url.rsplit(":", 1)[1])
        server = next(p for p in psutil.Process().children(recursive=True) if _listens(p, port))
        idle_rss = server.memory_info().rss
        peak = [idle_rss]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.2)

        done, errors = [0] * CLIENTS, []
        threads = [threading.Thread(target=watch, daemon=True)]
        threads += [
            threading.Thread(target=one_client, args=(url, truth, i, stop, done, errors), daemon=True)
            for i in range(CLIENTS)
        ]
        for t in threads:
            t.start()
        # a slow reader: asks for a whole scan's mask and reads nothing for half the run
        slow = socket.create_connection(("127.0.0.1", port))
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(f"GET /scans/{SCANS[0][0]}/image HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(LOAD_SECONDS / 2)
        during_stall = sum(done)
        slow.close()
        time.sleep(LOAD_SECONDS / 2)
        stop.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:5]
        assert during_stall > CLIENTS  # the others kept being served while one reader stalled
        assert all(n > 0 for n in done)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        growth = peak[0] - idle_rss
        print(
            f"load: {sum(done)} requests by {CLIENTS} clients in {LOAD_SECONDS:.0f} s; RSS +{growth / 2**20:.0f} MiB"
        )
        assert growth <= CACHE_BYTES + INFLIGHT_BYTES + RSS_MARGIN, f"RSS grew {growth / 2**20:.0f} MiB"


def _listens(proc: psutil.Process, port: int) -> bool:
    try:
        return any(
            c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
            for c in proc.net_connections()
        )
    except psutil.Error:
        return False

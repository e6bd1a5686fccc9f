"""The server-wide budget of bytes in flight: queued in order, 503 + Retry-After past the wait,
released when a response has been sent, or when its client has stopped reading for
``send_timeout`` seconds and been cut off; every route that builds a body in memory counts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import build_store
from live_server import live_server

from client.http import HttpSource
from service.server.errors import ServerBusy
from service.server.inflight import InflightBudget

BIG = "0000009_V00-Aug00"


def test_budget_admits_in_order_and_refuses_after_the_wait():
    async def scenario() -> list[str]:
        budget = InflightBudget(100, wait_s=0.2)
        order: list[str] = []
        first = await budget.acquire(80)
        assert budget.used == 80

        async def later(name: str, cost: int) -> None:
            release = await budget.acquire(cost)
            order.append(name)
            release()

        waiting = [asyncio.create_task(later("a", 50)), asyncio.create_task(later("b", 10))]
        await asyncio.sleep(0.05)
        assert order == []  # b would fit, but does not overtake a
        first()
        first()  # idempotent
        await asyncio.gather(*waiting)
        assert budget.used == 0
        hold = await budget.acquire(10**9)  # bigger than the budget: runs alone
        assert budget.used == 100
        with pytest.raises(ServerBusy) as info:
            await budget.acquire(1)
        assert info.value.retry_after >= 1
        hold()
        assert budget.used == 0 and not budget._waiters
        return order

    assert asyncio.run(scenario()) == ["a", "b"]


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("inflight") / "store"
    truth = build_store(root, scans=[(BIG, (256, 256, 64), 2, "train", 9, 0, 0, np.float32)], image_only=())
    return root, truth


def slow_request(url: str, path: str) -> socket.socket:
    """Send a GET and read nothing: the response stays in flight on the server."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n".encode())
    return sock


def drain(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(1 << 20):
        total += len(chunk)
        if total >= 16 * 2**20:  # the 16 MiB image and its headers
            break
    sock.close()
    return total


def test_past_the_budget_requests_get_503_with_retry_after_and_the_client_retries(big_store):
    root, truth = big_store
    small = f"/scans/{BIG}/image?roi=0:4,0:4,0"
    with (
        live_server(root, max_inflight_bytes=8 * 2**20, inflight_wait=0.5) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        assert client.get(small).status_code == 200
        hog = slow_request(url, f"/scans/{BIG}/image")
        try:
            deadline = time.monotonic() + 30
            while True:  # until the big read holds the whole budget
                busy = client.get(small)
                if busy.status_code == 503 or time.monotonic() > deadline:
                    break
            assert busy.status_code == 503, busy.text
            assert busy.headers["retry-after"] == "1" and "--max-inflight-bytes" in busy.json()["detail"]
            # HttpSource rides it out: the hog is drained a moment later, releasing the budget
            threading.Timer(1.0, drain, args=(hog,)).start()
            with HttpSource(url, retry_seconds=30) as source:
                got = source.read_image(BIG, "0:4,0:4,0")
            np.testing.assert_array_equal(got, truth[BIG][0][0:4, 0:4, 0:1])
            assert client.get(small).status_code == 200
        finally:
            hog.close()


def wait_for_503(client: httpx.Client, path: str, timeout: float = 30) -> httpx.Response:
    """Ask ``path`` until the budget is held by someone else (the hog being read)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = client.get(path)
        if busy.status_code == 503 or time.monotonic() > deadline:
            return busy
        time.sleep(0.02)


def test_a_client_that_stops_reading_is_cut_off_and_releases_the_budget(big_store):
    root, truth = big_store
    small = f"/scans/{BIG}/image?roi=0:4,0:4,0"
    with (
        live_server(root, max_inflight_bytes=8 * 2**20, inflight_wait=0.3, send_timeout=1.0) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        hog = slow_request(url, f"/scans/{BIG}/image")  # 16 MiB, never read
        try:
            assert wait_for_503(client, small).status_code == 503
            held_since = time.monotonic()
            deadline = held_since + 10
            while client.get(small).status_code != 200:  # others are served again ...
                assert time.monotonic() < deadline, "the stalled reader kept the budget"
            assert time.monotonic() - held_since < 5  # ... about send_timeout after the stall
            # ... while the stalled client's socket is still open: the server dropped it
            hog.settimeout(10)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := hog.recv(1 << 20):
                    got += len(chunk)
            assert got < truth[BIG][0].nbytes
        finally:
            hog.close()


@pytest.fixture(scope="module")
def predicted_store(tmp_path_factory):
    """BIG with 4 classes and its stored prediction (256 x 256 x 64 x 5 float16: 40 MiB)."""
    from test_predictions import softmax_model

    from loaders import Config, DatasetCatalog, build_loader, write_predictions

    base = tmp_path_factory.mktemp("inflight-pred")
    root, pred = base / "store", base / "pred"
    build_store(root, scans=[(BIG, (256, 256, 64), 4, "train", 9, 0, 0, np.float32)], image_only=())
    DatasetCatalog.remove("inflight_pred")
    DatasetCatalog.register("inflight_pred", str(root))
    try:
        cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)
        loader = build_loader(
            cfg, "inflight_pred", batch_size=16, is_test=True, shuffle=False, drop_last=False
        )
        write_predictions(loader, softmax_model, pred)
    finally:
        DatasetCatalog.remove("inflight_pred")
    return root, pred


def test_prediction_and_preview_routes_hold_their_bytes_in_flight(predicted_store):
    root, pred = predicted_store
    small = {
        "prediction": f"/scans/{BIG}/prediction?roi=0:4,0:4,0",
        "label_map": f"/scans/{BIG}/prediction/label_map?roi=0:4,0:4,0",
        "preview": f"/scans/{BIG}/preview.png?overlay=prediction",
        "image": f"/scans/{BIG}/image?roi=0:4,0:4,0",
    }
    with (
        live_server(root, predictions=pred, max_inflight_bytes=8 * 2**20, inflight_wait=0.3) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for path in small.values():
            assert client.get(path).status_code == 200
        hog = slow_request(url, f"/scans/{BIG}/prediction")  # 40 MiB, not read for now
        try:
            assert wait_for_503(client, small["image"]).status_code == 503  # the hog holds it all
            for name, path in small.items():
                busy = client.get(path)
                assert busy.status_code == 503, (name, busy.status_code)
                assert "--max-inflight-bytes" in busy.json()["detail"]
            # a file of the Zarr tree is a body in memory too; small bodies never wait
            shard = f"/zarr/{BIG}/image/c/0/0/0"
            assert client.get(shard, headers={"Range": "bytes=0-99999"}).status_code == 503
            assert client.get(shard, headers={"Range": "bytes=0-99"}).status_code == 206
            assert client.get("/scans").status_code == 200
            assert drain(hog) > 0  # reads 16 MiB and hangs up: the server lets go of the rest
            deadline = time.monotonic() + 10
            for name, path in small.items():
                while (status := client.get(path).status_code) == 503 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert status == 200, name
        finally:
            hog.close()

"""The measurements behind the real-scale "why": CPU split, page faults, server CPU, copy ceiling."""

import httpx
import numpy as np

from benchmarks.realscale import why
from benchmarks.servers import scancache_server, server_cpu_s
from benchmarks.timing import copy_ceiling, cpu_usage


def test_cpu_usage_counts_user_time_and_first_touches_of_fresh_memory():
    before = cpu_usage()
    total = 0
    for _ in range(200_000):  # pure Python: user time
        total += 1
    pages = bytearray(32 << 20)  # calloc'd: the kernel maps each page on its first write
    pages[::4096] = b"\1" * len(pages[::4096])
    after = cpu_usage()
    assert total == 200_000 and pages[4096] == 1
    assert after["user_s"] + after["sys_s"] > before["user_s"] + before["sys_s"]
    assert after["faults"] - before["faults"] >= (32 << 20) // 4096 // 2  # at least half the pages


def test_server_cpu_grows_with_the_requests_it_serves(small_store):
    with scancache_server(small_store[0]) as url:
        start = server_cpu_s(url)
        with httpx.Client(base_url=url) as client:
            for _ in range(40):
                assert client.get("/scans").status_code == 200
        assert server_cpu_s(url) > start >= 0


def test_copy_ceiling_is_a_positive_rate_that_falls_with_the_bytes():
    small = copy_ceiling([[4, 32, 32, 1], [4, 32, 32, 2]], batches=4, repeats=2)
    large = copy_ceiling([[4, 256, 256, 5], [4, 256, 256, 5]], batches=4, repeats=2)
    assert np.isfinite(small) and small > large > 0


def test_why_states_the_measured_cpu_split_and_the_ceiling():
    local = {
        "wall_s": 2.0, "batches": 40, "read_s": 1.0, "bytes_decoded": 100e6, "bytes_returned": 200e6,
        "rate": 320.0, "cpu": {"user_s": 1.0, "sys_s": 0.5, "faults": 150_000.0},
        "stats": {"copy_s": 0.4, "wait_s": 1.9},
    }  # fmt: skip
    text = why(local, False, ceiling=3200.0, baseline=100.0)
    assert "CPU 1.00 s in user space and 0.50 s in the kernel (150k page faults" in text
    assert "3200/s here (32.0x the baseline; this run reached 10% of it)" in text
    remote = {**local, "cpu": {"user_s": 0.6, "sys_s": 0.1, "faults": 4000.0}, "server_cpu_s": 1.6}
    text = why(remote, True, local=local)
    assert "the server 1.60 s more" in text
    assert "together used 2.30 s of CPU where reading locally used 1.50 s (1.5x)" in text


def test_a_pass_why_states_the_split_the_cpu_and_the_ceiling():
    from benchmarks.train2d import pass_why

    result = {
        "warm": 800.0, "items": 480, "batch_shapes": [[16, 32, 32, 1], [16, 32, 32, 5]],
        "warm_stats": {"source_read_s": 0.1, "copy_s": 0.3, "wait_s": 0.5},
        "warm_cpu": {"user_s": 0.7, "sys_s": 0.2, "faults": 1000.0},
    }  # fmt: skip
    text = pass_why(result, "warm", baseline=100.0)
    assert text.startswith("20 ms a batch with every chunk in the decoded-chunk cache")
    assert "source read 0.10 s, copy 0.30 s, wait 0.50 s" in text
    assert "CPU 0.70 s in user space and 0.20 s in the kernel (1k page faults" in text
    assert "(x, and y of 5 channels) runs at" in text and "x the baseline" in text
    over_http = pass_why(result, "warm", server_cpu=1.25)
    assert "the server 1.25 s more over both passes" in over_http and "runs at" not in over_http


def test_one_scans_conversion_is_split_into_phases_within_its_time(tmp_path):
    from benchmarks.conversion import PHASES, scan_split
    from service.sample_data import write_sample_data

    write_sample_data(tmp_path / "src", subjects=1, visits=1, shape=(32, 28, 12), num_classes=3)
    seconds, split = scan_split(tmp_path / "src", tmp_path / "store", None)
    assert set(split) == set(PHASES) and seconds > 0
    assert all(v > 0 for v in split.values()), split  # each phase ran and was found by name
    assert sum(split.values()) <= 1.5 * seconds  # profiled parts of one conversion, not more
    assert not (tmp_path / "store").exists()

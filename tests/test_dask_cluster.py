"""The job on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from h5_sources import assert_store_matches, run_cli, start_cli

from service.preprocess import run_preprocess
from service.sample_data import write_sample_data

pytestmark = pytest.mark.slow
DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args, log):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# --no-dashboard alone still opens the scheduler's HTTP routes on :8787 (every interface, and
# "Port 8787 is already in use" next to another cluster): a free loopback port instead
QUIET_HTTP = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")


def _stop(procs):
    """Each process group ended: SIGTERM, then SIGKILL for any still there after 20 s."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _start_scheduler(log_path):
    """A `dask scheduler` on a free loopback port: its address and a list holding its process."""
    port = _free_port()
    with open(log_path, "w") as log:
        proc = _spawn([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), *QUIET_HTTP], log)
    return f"tcp://127.0.0.1:{port}", [proc]


def _worker_cmd(address, name, directory):
    return [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
            "--no-dashboard", "--name", name, "--local-directory", str(directory)]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """Scheduler + 2 single-threaded workers; all killed (process groups) when the module ends.
    The workers inherit the AWS_* settings of the test S3 server (``s3_server``)."""
    logs = tmp_path_factory.mktemp("dask-logs")
    address, procs = _start_scheduler(logs / "scheduler.log")
    try:
        for i in range(2):
            with open(logs / f"worker{i}.log", "w") as log:
                procs.append(_spawn(_worker_cmd(address, f"w{i}", logs / f"w{i}"), log))
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            workers = set(client.scheduler_info()["workers"])
        yield address, workers
    finally:
        _stop(procs)


def test_job_runs_on_the_external_cluster(cluster, tmp_path):
    address, workers = cluster
    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=4, visits=3, shape=(32, 32, 8), num_classes=3, seed=2)
    write_sample_data(tmp_path / "vol", subjects=1, visits=2, shape=(24, 24, 6), fmt="3d", splits=("test",))
    for h5 in (tmp_path / "vol" / "test").iterdir():  # 3D scans with their own names, beside the 2D ones
        h5.rename(source / "test" / f"vol_{h5.name}")
    summary = run_preprocess(source, store, scheduler=address, progress=False)
    assert summary.failed == 0, summary.failures()
    assert summary.converted == 14
    # every task ran on the cluster's workers, none in this process
    ran_on = {r.worker for r in summary.results}
    assert ran_on and ran_on <= workers, (ran_on, workers)
    _truth, stored = assert_store_matches(store, source)
    assert len(stored) == 14
    assert stored["vol_0000001_V01-Aug00"][0]["spacing"] == pytest.approx([0.365, 0.365, 0.7])


def test_cli_scheduler_option_rerun_skips(cluster, tmp_path):
    address, _ = cluster
    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=2, visits=1, shape=(16, 16, 4), num_classes=2)
    first = run_cli("preprocess", source, store, "--scheduler", address)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "scans: 2 converted, 0 skipped, 0 failed" in first.stdout
    assert f"scans to check and convert on {address}" in first.stderr
    second = run_cli("preprocess", source, store, "--scheduler", address)
    assert "scans: 0 converted, 2 skipped, 0 failed" in second.stdout
    assert run_cli("verify", source, store).returncode == 0


def test_cluster_workers_write_their_scans_straight_to_s3(cluster, tmp_path, s3_url):
    from s3_reading import assert_s3_store_matches

    address, workers = cluster
    source = tmp_path / "source"
    write_sample_data(source, subjects=3, visits=2, shape=(24, 24, 6), num_classes=2, seed=8)
    summary = run_preprocess(source, s3_url, scheduler=address, progress=False)
    assert summary.failed == 0 and summary.converted == 6, summary.failures()
    assert {r.worker for r in summary.results} <= workers
    _truth, stored = assert_s3_store_matches(s3_url, source)
    assert len(stored) == 6
    again = run_cli("preprocess", source, s3_url, "--scheduler", address)
    assert "scans: 0 converted, 6 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    assert run_cli("verify", source, s3_url).returncode == 0


def test_unreachable_scheduler_is_one_line(tmp_path):
    source = tmp_path / "source"
    write_sample_data(source, subjects=1, visits=1, shape=(8, 8, 2), num_classes=1)
    port = _free_port()  # nothing listens there
    result = run_cli(
        "preprocess",
        source,
        tmp_path / "store",
        "--scheduler",
        f"tcp://127.0.0.1:{port}",
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"scancache preprocess: error: --scheduler tcp://127.0.0.1:{port}: cannot reach the Dask scheduler "
        "(Connection refused); is it running, and is the address the one it printed?\n"
    )
    assert not (tmp_path / "store").exists()  # checked before the store was made


def test_a_job_without_workers_says_so_and_a_lost_scheduler_ends_it_in_one_line(tmp_path):
    """A scheduler with no worker: the job says so (Dask waits silently, the store locked), and
    goes on when one connects. Then the scheduler killed mid-job: one line, not a failure per
    scan, and a re-run completes the store exactly."""
    from distributed import Client

    from service.cluster_watch import warn_without_workers

    address, procs = _start_scheduler(tmp_path / "scheduler.log")
    try:
        said: list[str] = []
        with (
            Client(address, timeout="60s") as client,
            warn_without_workers(client, address, said.append, 0.2, 0.6),
        ):
            deadline = time.monotonic() + 60
            while not said and time.monotonic() < deadline:
                time.sleep(0.2)
            assert said == [
                f"no Dask worker is connected to {address} (for 1 s): the job waits for one; "
                f"start workers with `dask worker {address}`"
            ] or said[0].startswith(f"no Dask worker is connected to {address} (for "), said
            with open(tmp_path / "worker.log", "w") as log:
                procs.append(_spawn(_worker_cmd(address, "w0", tmp_path / "w0"), log))
            client.wait_for_workers(1, timeout=120)
            deadline = time.monotonic() + 30
            while len(said) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert said[-1] == "1 Dask worker connected: going on", said
        source, store = tmp_path / "source", tmp_path / "store"
        write_sample_data(source, subjects=6, visits=8, shape=(48, 48, 16), num_classes=3, seed=7)
        job = start_cli("preprocess", source, store, "--scheduler", address)
        progress = job.stderr.readline()  # "preprocess: 48 scans to check and convert on tcp://..."
        assert "scans to check and convert" in progress, progress
        os.killpg(procs[0].pid, signal.SIGKILL)  # the scheduler, mid-job
        _, err = job.communicate(timeout=240)
        last = err.strip().splitlines()[-1]
        assert job.returncode == 1 and last.startswith(
            f"scancache preprocess: error: lost the Dask scheduler {address}: "
        ), f"rc={job.returncode}\n{err}"
        assert "(worker)" not in err and err.count("\n") < 10, err
    finally:
        _stop(procs)
    rerun = run_cli("preprocess", source, store, "--workers", "2", "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert_store_matches(store, source)

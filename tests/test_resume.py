"""Nothing partial, nothing redone: SIGKILL the job mid-run, re-run it, verify; then change a source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import psutil
import pytest
from h5_sources import assert_store_matches, published, run_cli, start_cli

from service.sample_data import write_sample_data

SCANS = 40  # 20 subjects x 2 visits, one worker: several seconds of work to kill in the middle


def _kill_tree(proc):
    """SIGKILL the job's whole process group (the CLI and its LocalCluster workers)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(children, timeout=30)


def _start_job(source, store):
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "preprocess", str(source), str(store), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill_after_first_publish(source, store):
    """Run the job and SIGKILL it once a scan is published; returns the scans published then."""
    proc = _start_job(source, store)
    try:
        while not published(store):
            if proc.poll() is not None:
                pytest.fail(f"the job ended (exit {proc.returncode}) before it published a scan")
            time.sleep(0.002)
    finally:
        _kill_tree(proc)
    return published(store)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "source"
    write_sample_data(root, subjects=SCANS // 2, visits=2, shape=(32, 32, 6), num_classes=2, seed=3)
    return root


def test_sigkill_then_rerun_completes_and_skips(source, tmp_path):
    store = tmp_path / "store"
    done = _kill_after_first_publish(source, store)
    for _ in range(2):  # the machine may be fast enough to finish first; then try once more, afresh
        if len(done) < SCANS:
            break
        subprocess.run(["rm", "-rf", str(store)], check=True)
        done = _kill_after_first_publish(source, store)
    assert 1 <= len(done) < SCANS, "could not kill the job between its first and last scan"
    print(f"killed with {len(done)} of {SCANS} scans published")
    # every scan a reader can see is complete
    assert_store_matches(store, source, only=done)

    rerun = run_cli("preprocess", source, store, "--workers", "2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"scans: {SCANS - len(done)} converted, {len(done)} skipped, 0 failed" in rerun.stdout
    assert not (store / ".staging").exists()
    assert len(published(store)) == SCANS

    verify = run_cli("verify", source, store)
    assert verify.returncode == 0, verify.stdout
    assert f"verify: {SCANS} ok; store is exact" in verify.stdout
    assert_store_matches(store, source)

    # a changed source file: only its scan is redone, and the store follows the new data
    changed = source / "train" / "0000001_V01-Aug00_004.im"
    with h5py.File(changed, "r+") as f:
        f["data"][...] = np.full(f["data"].shape, 7.5, np.float32)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    again = run_cli("preprocess", source, store, "--workers", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"scans: 1 converted, {SCANS - 1} skipped, 0 failed" in again.stdout
    _truth, stored = assert_store_matches(store, source)
    assert (stored["0000001_V01-Aug00"][1][:, :, 3] == 7.5).all()
    assert run_cli("verify", source, store).returncode == 0


def _signal_the_job(source, store, workers, send):
    """Start the job, wait until it published a scan, ``send(proc)`` a signal; its exit status
    and stderr (the test is skipped if the job finished first)."""
    proc = start_cli("preprocess", source, store, "--workers", workers)
    try:
        while not published(store):
            assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before it published a scan"
            time.sleep(0.002)
        send(proc)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    if proc.returncode == 0:
        pytest.skip("the job finished before the signal reached it")
    return proc.returncode, err


def test_ctrl_c_in_a_terminal_is_one_line_not_a_traceback_per_worker(source, tmp_path):
    """Ctrl-C signals the terminal's whole process group, the local cluster's workers included:
    the job stops with one line (each worker printed a KeyboardInterrupt traceback)."""
    store = tmp_path / "store"
    code, err = _signal_the_job(source, store, 2, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "scancache: interrupted"
    assert run_cli("preprocess", source, store, "--workers", "2", "-q").returncode == 0
    assert_store_matches(store, source)


def test_sigterm_stops_the_job_cleanly_and_a_rerun_completes(source, tmp_path):
    """``docker stop`` sends SIGTERM to the job alone: it unwinds as Ctrl-C does, lock and
    staging removed, every published scan whole; the re-run converts the rest."""
    store = tmp_path / "store"
    code, err = _signal_the_job(source, store, 1, lambda proc: proc.send_signal(signal.SIGTERM))
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "scancache: terminated", err
    assert not (store / ".lock").exists() and not (store / ".staging").exists()
    done = published(store)
    assert_store_matches(store, source, only=done)
    rerun = run_cli("preprocess", source, store, "--workers", "2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"scans: {SCANS - len(done)} converted, {len(done)} skipped, 0 failed" in rerun.stdout


def test_store_modified_behind_our_back_is_caught_by_verify(tmp_path):
    """verify compares voxels, not fingerprints: a damaged chunk or a lost scan fails it."""
    store = tmp_path / "store"
    small = tmp_path / "small"
    write_sample_data(small, subjects=2, visits=1, shape=(16, 16, 4), num_classes=2, seed=4)
    assert run_cli("preprocess", small, store, "--workers", "1", "-q").returncode == 0
    import zarr

    array = zarr.open_array(str(store / "0000001_V00-Aug00" / "image"), mode="r+")
    array[0, 0, 0] = array[0, 0, 0] + 1
    subprocess.run(["rm", "-rf", str(store / "0000002_V00-Aug00")], check=True)
    result = run_cli("verify", small, store)
    assert result.returncode == 1
    # the rewritten shard differs in size from the manifest (TORN) or, by chance, only in voxels
    assert (
        "MISMATCH 0000001_V00-Aug00: image: 1 voxels differ, first at (0, 0, 0)" in result.stdout
        or "TORN     0000001_V00-Aug00: image/c/0/0/0 has " in result.stdout
    )
    assert "MISSING  0000002_V00-Aug00: not in the store" in result.stdout


def test_a_scan_damaged_in_the_store_is_rebuilt_by_name(tmp_path):
    """A stored chunk damaged after it was written keeps its scan's fingerprint, so a re-run
    skips it; verify names the scans and the command, and --rebuild converts them again."""
    import zarr

    store, small = tmp_path / "store", tmp_path / "small"
    write_sample_data(small, subjects=2, visits=1, shape=(16, 16, 4), num_classes=2, seed=5)
    assert run_cli("preprocess", small, store, "--workers", "1", "-q", "--codec", "none").returncode == 0
    scan = "0000001_V00-Aug00"
    shard = store / scan / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    # one inner chunk, its (offset, nbytes, crc32c) index at the end (zarr's sharding codec)
    offset = int.from_bytes(data[-20:-12], "little")
    data[offset] ^= 0xFF  # voxel (0, 0, 0); same size: no manifest check can see it, only the voxels
    shard.write_bytes(bytes(data))
    result = run_cli("verify", small, store)
    assert result.returncode == 1 and f"MISMATCH {scan}: image: 1 voxels differ" in result.stdout
    hint = f"verify: to convert them again: scancache preprocess {small} {store} --rebuild {scan}"
    assert result.stdout.strip().splitlines()[-1] == hint
    rerun = run_cli("preprocess", small, store, "--workers", "1", "--codec", "none")
    assert "scans: 0 converted, 2 skipped, 0 failed" in rerun.stdout
    rebuilt = run_cli("preprocess", small, store, "--workers", "1", "--codec", "none", "--rebuild", scan)
    assert rebuilt.returncode == 0 and "scans: 1 converted, 1 skipped, 0 failed" in rebuilt.stdout
    assert run_cli("verify", small, store).returncode == 0
    want = np.stack(
        [np.asarray(h5py.File(f, "r")["data"])[..., 0] for f in sorted((small).rglob(f"{scan}_*.im"))], -1
    )
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")[scan]["image"][...], want)
    unknown = run_cli("preprocess", small, store, "--workers", "1", "--rebuild", "0000009_V00-Aug00")
    assert unknown.returncode != 0
    assert (
        unknown.stderr.strip()
        .splitlines()[-1]
        .endswith("--rebuild 0000009_V00-Aug00: the source has no scan of that id")
    )


def test_sigterm_twice_as_timeout_sends_it_is_still_one_line(source, tmp_path):
    """``timeout`` signals the job, then its process group: the second SIGTERM came while the
    first unwound, a traceback instead of one line, and lock or staging left behind."""
    store = tmp_path / "store"

    def twice(proc):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # while the first unwinds (back to back, the kernel merges the two)
        os.killpg(proc.pid, signal.SIGTERM)

    code, err = _signal_the_job(source, store, 1, twice)
    assert code == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "scancache: terminated", err
    assert not (store / ".lock").exists() and not (store / ".staging").exists()
    assert_store_matches(store, source, only=published(store))


def test_the_cli_acts_on_the_first_sigterm_only():
    from service import cli

    cli._terminating = False
    with pytest.raises(cli.Terminated):
        cli._terminate(signal.SIGTERM, None)
    cli._terminate(signal.SIGTERM, None)  # the second, while the first unwinds: nothing
    cli._terminating = False

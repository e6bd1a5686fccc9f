"""The preprocessing job's reliability: non-finite voxels, two jobs on one store, torn scans,
removed sources (--prune) and the source edges, each through the real job (Dask, HDF5, Zarr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from service.preprocess import CONVERTED, SKIPPED, run_preprocess
from service.sample_data import write_sample_data
from service.slice_files import load_scan
from service.sources import discover
from store.errors import EmptySource, SourceError
from store.inventory import manifest_problem
from store.lock import JobLock
from store.source import LocalSource
from tests.h5_sources import random_scan, reference, run_cli, write_slice_files, write_volume_file


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _bits_equal(a, b):
    """Exact equality, NaN payloads and signed zeros included."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_non_finite_voxels_are_converted_exactly_and_left_out_of_statistics(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    volume, seg = random_scan((9, 8, 5), 2, seed=1)
    volume[0, 0, 0], volume[1, 2, 3], volume[4, 4, 4] = np.nan, np.inf, -np.inf
    volume[2, 2, 2] = -0.0
    write_volume_file(source / "train" / "0000001_V00-Aug00.h5", volume, seg)
    slices, mask = random_scan((6, 7, 3), 2, seed=2)
    slices[:, :, 1] = np.nan  # a whole slice
    write_slice_files(source / "train", "0000002_V00-Aug00", slices, mask)
    write_volume_file(source / "train" / "0000003_V00-Aug00.h5", np.full((3, 3, 2), np.nan, np.float32))
    summary = run_preprocess(source, store, workers=1, progress=False)
    assert summary.converted == 3 and summary.failed == 0, summary.report()
    report = summary.report()
    assert "0000001_V00-Aug00: 3 non-finite image voxels (NaN/Inf)" in report
    assert "0000002_V00-Aug00: 42 non-finite image voxels" in report
    reader = LocalSource(store)
    for scan, truth, n_bad in (("0000001_V00-Aug00", volume, 3), ("0000002_V00-Aug00", slices, 42)):
        assert _bits_equal(reader.read_image(scan), truth)
        attrs = _strict((store / scan / "zarr.json").read_text())["attributes"]
        finite = truth[np.isfinite(truth)].astype(np.float64)
        assert attrs["non_finite_voxels"] == n_bad
        assert attrs["intensity"]["min"] == finite.min() and attrs["intensity"]["max"] == finite.max()
        assert attrs["intensity"]["mean"] == pytest.approx(finite.mean(), rel=1e-12)
        assert attrs["intensity"]["std"] == pytest.approx(finite.std(), rel=1e-9)
    all_nan = _strict((store / "0000003_V00-Aug00" / "zarr.json").read_text())["attributes"]
    assert all_nan["intensity"] == {"min": None, "max": None, "mean": None, "std": None}
    assert all_nan["non_finite_voxels"] == 18
    # verify compares NaN as equal to NaN: the store is exact
    assert run_cli("verify", source, store).returncode == 0


def test_no_numpy_warnings_reach_stderr(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    volume = np.full((4, 4, 2), np.nan, np.float32)
    volume[0, 0, 0] = np.inf
    write_volume_file(source / "0000001_V00-Aug00.h5", volume)
    result = run_cli("preprocess", source, store, "--workers", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert "0000001_V00-Aug00: 32 non-finite image voxels" in result.stdout


def _wait_for(path, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_job_fails_at_once_or_waits(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=3, visits=1, shape=(16, 16, 4), num_classes=2, seed=3)
    assert run_cli("preprocess", source, store, "--workers", "1", "-q").returncode == 0
    with JobLock(store):  # this test process is "the first job"
        started = time.monotonic()
        result = run_cli("preprocess", source, store, "--workers", "1", "-q")
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "another job is writing this store" in lines[0], result.stderr
        assert f"pid {os.getpid()}" in lines[0] and time.monotonic() - started < 60
        waiting = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "preprocess", str(source), str(store), "--wait", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        assert waiting.poll() is None  # still waiting for us
    out, err = waiting.communicate(timeout=240)
    assert waiting.returncode == 0, err
    assert "waiting for the job holding the lock" in err and "0 converted, 3 skipped" in out


def test_two_jobs_started_together_leave_every_scan_whole(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    data = write_sample_data(source, subjects=4, visits=1, shape=(16, 16, 6), num_classes=2, seed=4)
    command = [sys.executable, "-m", "service.cli", "preprocess", str(source), str(store), "--wait", "-q"]
    command += ["--workers", "1"]
    jobs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"
    ]
    results = [(job.communicate(timeout=300), job.returncode) for job in jobs]
    assert all(code == 0 for _, code in results), results
    outs = sorted(out for (out, _), _ in results)
    assert any("4 converted" in o for o in outs) and any("0 converted, 4 skipped" in o for o in outs), outs
    for scan in data.scans:
        attrs = _strict((store / scan.scan_id / "zarr.json").read_text())["attributes"]
        assert manifest_problem(store, scan.scan_id, attrs) is None
    assert run_cli("verify", source, store).returncode == 0
    assert not (store / ".lock").exists() and not (store / ".staging").exists()


def test_a_torn_scan_is_caught_by_verify_and_redone_by_the_job(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=2, visits=1, shape=(16, 16, 4), num_classes=2, seed=5)
    assert run_preprocess(source, store, workers=1, progress=False).converted == 2
    shard = next(p for p in (store / "0000001_V00-Aug00").resolve().rglob("image/c/*/*/*") if p.is_file())
    with open(shard, "r+b") as f:  # as a power loss after the rename would leave it
        f.truncate(shard.stat().st_size // 2)
    result = run_cli("verify", source, store)
    assert result.returncode == 1
    assert "TORN     0000001_V00-Aug00: image/c/0/0/0 has " in result.stdout, result.stdout
    summary = run_preprocess(source, store, workers=1, progress=False)
    assert {r.scan_id: r.status for r in summary.results} == {
        "0000001_V00-Aug00": CONVERTED,
        "0000002_V00-Aug00": SKIPPED,
    }
    assert run_cli("verify", source, store).returncode == 0


def test_verify_calls_a_lost_or_unreadable_zarr_json_damage_and_goes_on(tmp_path, monkeypatch):
    """A published scan whose group document is gone or not JSON is damaged, not "not in the
    store"; one verify cannot read (permissions) is reported and the run goes on."""
    from service.verify import FAILED, TORN, verify_store
    from store.storage import LocalStorage

    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=3, visits=1, shape=(16, 16, 4), num_classes=2, seed=5)
    assert run_preprocess(source, store, workers=1, progress=False).converted == 3
    ((store / "0000001_V00-Aug00").resolve() / "zarr.json").unlink()
    ((store / "0000002_V00-Aug00").resolve() / "zarr.json").write_text("{not json")
    unreadable = "0000003_V00-Aug00"
    real_read = LocalStorage.read

    def read(self, key):  # as a file the server's user may not read (tests run as root)
        if key.startswith(f".versions/{unreadable}/") and key.endswith("/zarr.json"):
            raise PermissionError(13, "Permission denied")
        return real_read(self, key)

    monkeypatch.setattr(LocalStorage, "read", read)
    lines = {line.scan_id: (line.status, line.detail) for line in verify_store(source, store).lines}
    assert lines == {
        "0000001_V00-Aug00": (TORN, "its zarr.json is missing"),
        "0000002_V00-Aug00": (TORN, "its zarr.json is not JSON"),
        unreadable: (
            FAILED,
            "its stored files cannot be read here (Permission denied): check the store's permissions or credentials",
        ),
    }
    monkeypatch.undo()
    summary = run_preprocess(
        source, store, workers=1, progress=False, rebuild=["0000001_V00-Aug00", "0000002_V00-Aug00"]
    )
    assert summary.converted == 2
    assert run_cli("verify", source, store).returncode == 0


def test_scans_whose_sources_are_gone_are_listed_or_pruned(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=3, visits=1, shape=(12, 12, 3), num_classes=2, seed=6, splits=None)
    assert run_preprocess(source, store, workers=1, progress=False).converted == 3
    for path in source.glob("0000002_V00-Aug00_*"):
        path.unlink()
    summary = run_preprocess(source, store, workers=1, progress=False)
    assert summary.orphans == ["0000002_V00-Aug00"] and not summary.pruned
    assert "1 scan in the store has no source any more (kept; --prune removes them):" in summary.report()
    assert "0000002_V00-Aug00" in LocalSource(store).scan_ids()
    result = run_cli("verify", source, store)
    assert result.returncode == 1 and "EXTRA    0000002_V00-Aug00" in result.stdout
    assert "store is NOT exact" in result.stdout
    result = run_cli("preprocess", source, store, "--workers", "1", "-q", "--prune")
    assert result.returncode == 0 and "removed 1 scan whose sources are gone:" in result.stdout
    assert LocalSource(store).scan_ids() == ["0000001_V00-Aug00", "0000003_V00-Aug00"]
    assert run_cli("verify", source, store).returncode == 0
    # its files stay for readers until the grace period is over; a job with --grace 0 removes them
    assert (store / ".versions" / "0000002_V00-Aug00").is_dir()
    graced = run_cli("preprocess", source, store, "--workers", "1", "-q", "--grace", "0")
    assert graced.returncode == 0 and not (store / ".versions" / "0000002_V00-Aug00").exists()
    assert "old versions: 1 removed (superseded longer than the grace period)" in graced.stdout, graced.stdout


# -- source edges (discovery and reading; no cluster needed) ----------------------------------
def test_zero_length_axes_are_one_line(tmp_path):
    write_volume_file(tmp_path / "0000001_V00-Aug00.h5", np.zeros((0, 4, 4), np.float32))
    write_slice_files(tmp_path, "0000002_V00-Aug00", np.zeros((4, 0, 2), np.float32))
    found = discover(tmp_path)
    for spec in found.scans:
        with pytest.raises(SourceError) as info:
            load_scan(spec)
        assert "has a zero-length axis" in str(info.value) and spec.scan_id in str(info.value)


def test_symlinks_inside_are_followed_outside_refused(tmp_path):
    source, outside = tmp_path / "source", tmp_path / "elsewhere"
    image, mask = random_scan((5, 5, 2), 2, seed=7)
    write_slice_files(source / "data" / "real", "0000001_V00-Aug00", image, mask)
    (source / "train").mkdir()
    os.symlink(source / "data" / "real", source / "train" / "linked")  # a scan folder link inside
    write_volume_file(outside / "0000002_V00-Aug00.h5", image)
    os.symlink(outside / "0000002_V00-Aug00.h5", source / "train" / "0000002_V00-Aug00.h5")
    os.symlink(outside, source / "outside_folder")
    os.symlink(tmp_path / "missing.h5", source / "0000003_V00-Aug00.h5")
    os.symlink(source, source / "data" / "loop")
    os.symlink(source / "0000004_V00-Aug00.h5", source / "0000005_V00-Aug00.h5")  # two links pointing
    os.symlink(source / "0000005_V00-Aug00.h5", source / "0000004_V00-Aug00.h5")  # at each other
    found = discover(source)
    lines = sorted(str(f) for f in found.failures)
    assert any(
        line.startswith("0000002_V00-Aug00: train/0000002_V00-Aug00.h5: symbolic link to outside SOURCE")
        for line in lines
    ), lines
    assert any(
        line.startswith("outside_folder: outside_folder/: symbolic link to outside SOURCE") for line in lines
    )
    assert any(
        line.startswith("0000003_V00-Aug00: 0000003_V00-Aug00.h5: broken symbolic link") for line in lines
    )
    assert any(line.startswith("loop: data/loop/: symbolic link loop") for line in lines), lines
    for key in ("0000004_V00-Aug00", "0000005_V00-Aug00"):  # not "its target does not exist"
        assert f"{key}: {key}.h5: symbolic link loop (the links point at each other); not followed" in lines
    # the scan under the inside link is found once (through whichever path is walked first)
    assert [s.scan_id for s in found.scans] == ["0000001_V00-Aug00"]
    np.testing.assert_array_equal(load_scan(found.scans[0]).image, image)


def test_source_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file.h5").write_bytes(b"")
    with pytest.raises(EmptySource, match="is a file; SOURCE must be the folder holding the scans") as info:
        discover(tmp_path / "file.h5")
    assert "\n" not in str(info.value)


def test_sample_data_both_converts_in_one_run(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    data = write_sample_data(source, subjects=2, visits=2, shape=(8, 8, 3), num_classes=2, fmt="both", seed=8)
    summary = run_preprocess(source, store, workers=1, progress=False)
    assert summary.converted == 4 and summary.failed == 0, summary.report()
    truth = reference(source)  # straight from the .im/.seg and .h5 files with h5py
    reader = LocalSource(store)
    for scan in data.scans:
        split, image, mask = truth[scan.scan_id]
        np.testing.assert_array_equal(reader.read_image(scan.scan_id), image)
        np.testing.assert_array_equal(reader.read_mask(scan.scan_id), mask)
        attrs = json.loads((store / scan.scan_id / "zarr.json").read_text())["attributes"]
        assert (attrs["source_format"], attrs["split"]) == (scan.kind, split)
    assert {s.kind for s in data.scans} == {"2d", "3d"}


def test_a_publish_refused_at_its_link_leaves_no_version_and_staging_no_half_folder(tmp_path, monkeypatch):
    """On a full disk the link switch can fail after the version folder was renamed into
    .versions: that version never became current, so it goes at once (it used to wait out the
    grace period, holding the space a re-run needs); a staging folder whose owner file cannot
    be written goes too."""
    import errno
    from pathlib import Path

    from store import publish

    root = tmp_path / "store"
    root.mkdir()
    staged = publish.new_staging(root, "job")
    (staged / "a").write_bytes(b"x" * 100)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish.os, "symlink", full)
    with pytest.raises(OSError, match="No space left"):
        publish.publish_version(root, "scan1", staged)
    assert list((root / ".versions" / "scan1").iterdir()) == []
    assert not (root / "scan1").exists() and not list(root.glob(".scan1.*.link"))
    monkeypatch.undo()

    real_write = Path.write_text

    def owner_full(self, *args, **kwargs):
        if self.name == publish.OWNER_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", owner_full)
    with pytest.raises(OSError, match="No space left"):
        publish.new_staging(root, "job")
    assert list((root / publish.STAGING_DIR).iterdir()) == []  # (the first went into .versions, then away)


def test_prune_that_fails_for_some_scans_reports_which_were_removed_and_which_kept(tmp_path, monkeypatch):
    """--prune when the store refuses to remove one orphan: the report names the one removed as
    removed and the one kept as kept (it said "kept" for both), then the upkeep failure."""
    import errno

    from store.storage import LocalStorage

    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=3, visits=1, shape=(12, 12, 3), num_classes=2, seed=7, splits=None)
    assert run_preprocess(source, store, workers=1, progress=False).converted == 3
    for scan_id in ("0000002_V00-Aug00", "0000003_V00-Aug00"):
        for path in source.glob(f"{scan_id}_*"):
            path.unlink()
    real = LocalStorage.unpublish

    def refuse_one(self, name):
        if name == "0000003_V00-Aug00":
            raise OSError(errno.EROFS, "Read-only file system", str(self.root / name))
        return real(self, name)

    monkeypatch.setattr(LocalStorage, "unpublish", refuse_one)
    summary = run_preprocess(source, store, workers=1, progress=False, prune=True)
    report = summary.report()
    assert summary.exit_code == 1
    assert "removed 1 scan whose sources are gone:\n  0000002_V00-Aug00" in report
    assert (
        "1 scan whose sources are gone could not be removed (see the store upkeep below):\n  0000003_V00-Aug00"
        in report
    )
    assert (
        "store upkeep failed (1):\n  removing 0000003_V00-Aug00: " in report
        and "Read-only file system" in report
    )
    assert not (store / "0000002_V00-Aug00").exists() and (store / "0000003_V00-Aug00").exists()


def test_old_versions_another_user_owns_are_reported_left_not_failed(tmp_path, monkeypatch):
    """On a shared store an old version in another user's folder cannot be removed: the job
    says so (it was silent, leaking room for ever) and still succeeds, as nothing reads it."""
    import errno
    import shutil

    from store import publish

    source, store = tmp_path / "source", tmp_path / "store"
    write_sample_data(source, subjects=1, visits=1, shape=(12, 12, 3), num_classes=2, seed=8, splits=None)
    assert run_preprocess(source, store, workers=1, progress=False).converted == 1
    scan_id = "0000001_V00-Aug00"
    first = (store / scan_id).resolve()
    real_rmtree = shutil.rmtree

    def refuse(path, ignore_errors=False, onerror=None, onexc=None, **kwargs):
        if str(path) == str(first) and (onerror or onexc):  # another user's folder: left as it is
            # as rmtree reports it: the bare name of the entry it could not remove
            refusal = PermissionError(errno.EACCES, "Permission denied", "zarr.json")
            if onexc is not None:
                onexc(os.unlink, str(path / "zarr.json"), refusal)
            else:
                onerror(os.unlink, str(path / "zarr.json"), (PermissionError, refusal, None))
            return None
        return real_rmtree(path, ignore_errors=ignore_errors, onerror=onerror, **kwargs)

    real_unlink = os.unlink

    def refuse_unlink(path, *args, **kwargs):  # the version's zarr.json goes first, refused too
        if str(path) == str(first / "zarr.json"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(publish.shutil, "rmtree", refuse)
    monkeypatch.setattr(publish.os, "unlink", refuse_unlink)
    summary = run_preprocess(source, store, workers=1, progress=False, rebuild=[scan_id], grace_s=0)
    assert summary.converted == 1 and summary.exit_code == 0
    report = summary.report()
    assert "store upkeep left undone (1; it takes room, nothing reads it):" in report
    named = f"removing old versions: one old version could not be removed: {first / 'zarr.json'}: Permission denied"
    assert named + " (owned by " in report and "; its folder owned by " in report
    assert first.exists() and (store / scan_id).resolve() != first

"""Store format 2: versioned scan folders behind atomic symlinks, readers during a re-publish,
format refusal, old-version removal, bounded reader caches, the job lock and staging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr
from conftest import make_volume

import store.source as local_mod
from store import publish
from store.format import StoreFormatError
from store.inventory import ensure_store
from store.lock import JobLock, StoreLocked
from store.source import LocalSource
from store.writer import write_scan

SCAN = "0000001_V00-Aug00"


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _volume(seed, shape=(12, 10, 6)):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    mask = (rng.random((*shape, 2)) > 0.5).astype(np.uint8)
    return image, mask


def test_scan_is_a_relative_symlink_to_a_complete_version(tmp_path):
    image, mask = _volume(0)
    write_scan(tmp_path, SCAN, image, mask, {"split": "train"})
    link = tmp_path / SCAN
    target = os.readlink(link)
    assert link.is_symlink() and target.startswith(f".versions/{SCAN}/") and not os.path.isabs(target)
    version = publish.current_version(tmp_path, SCAN)
    assert target == f".versions/{SCAN}/{version}"
    root_doc = _strict((tmp_path / "zarr.json").read_text())
    marker = root_doc["attributes"]["scancache"]
    assert marker["format"] == 2 and re.fullmatch(r"[0-9a-f]{32}", marker["store_id"])  # random
    attrs = _strict((link / "zarr.json").read_text())["attributes"]
    assert set(attrs["manifest"]) >= {"image/zarr.json", "mask/zarr.json"}
    # plain zarr-python follows the link
    group = zarr.open_group(str(tmp_path), mode="r")
    np.testing.assert_array_equal(group[SCAN]["image"][...], image)
    np.testing.assert_array_equal(group[SCAN]["mask"][...], mask)
    assert not (tmp_path / ".staging").exists()


def test_republish_under_a_reader_never_mixes_versions(tmp_path):
    versions = [_volume(1), _volume(2)]
    write_scan(tmp_path, SCAN, *versions[0], {})
    source = LocalSource(tmp_path, cache_bytes=0)
    first = publish.current_version(tmp_path, SCAN)
    old_folder = tmp_path / ".versions" / SCAN / first
    np.testing.assert_array_equal(source.read_image(SCAN), versions[0][0])

    seen, problems, stop = set(), [], threading.Event()

    def read_forever():
        while not stop.is_set():
            image, mask = source.read_image(SCAN), source.read_mask(SCAN)
            which = [i for i, (im, _) in enumerate(versions) if np.array_equal(image, im)]
            if len(which) != 1:
                problems.append("image matches no published version (a gap or a mix)")
            if not any(np.array_equal(mask, m) for _, m in versions):
                problems.append("mask matches no published version")
            seen.update(which)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for i in range(8):
            write_scan(tmp_path, SCAN, *versions[(i + 1) % 2], {})
            time.sleep(0.02)
    finally:
        stop.set()
        reader.join()
    assert not problems and seen <= {0, 1}
    # 8 re-publishes: the last is version 0's data again; publish once more for version 1
    write_scan(tmp_path, SCAN, *versions[1], {})
    np.testing.assert_array_equal(source.read_image(SCAN), versions[1][0])
    np.testing.assert_array_equal(source.read_mask(SCAN), versions[1][1])
    # a reader holding the first version (its folder) still reads it exactly
    np.testing.assert_array_equal(zarr.open_array(str(old_folder / "image"), mode="r")[...], versions[0][0])
    assert publish.remove_old_versions(tmp_path, grace_s=3600) == []
    removed = publish.remove_old_versions(tmp_path, grace_s=0)
    assert len(removed) == 9 and not old_folder.exists()
    assert os.listdir(tmp_path / ".versions" / SCAN) == [publish.current_version(tmp_path, SCAN)]
    np.testing.assert_array_equal(LocalSource(tmp_path).read_image(SCAN), versions[1][0])


def test_reads_in_one_call_come_from_one_version(tmp_path):
    """A call resolves the link once: image and mask of one read_regions belong together."""
    from store.protocol import RegionRequest

    versions = [_volume(3), _volume(4)]
    write_scan(tmp_path, SCAN, *versions[0], {})
    source = LocalSource(tmp_path, cache_bytes=0)
    stop, bad = threading.Event(), []

    def publisher():
        i = 1
        while not stop.is_set():
            write_scan(tmp_path, SCAN, *versions[i % 2], {})
            i += 1

    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for _ in range(40):
            image, mask = source.read_regions([RegionRequest(SCAN, "image"), RegionRequest(SCAN, "mask")])
            if not any(np.array_equal(image, im) and np.array_equal(mask, m) for im, m in versions):
                bad.append(1)
    finally:
        stop.set()
        thread.join()
    assert not bad


@pytest.mark.parametrize("found", [1, 3, "2"])
def test_another_format_is_refused_in_one_line(tmp_path, found):
    (tmp_path / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"scancache": {"format": found}}})
    )
    for opener in (LocalSource, ensure_store):
        with pytest.raises(StoreFormatError) as info:
            opener(tmp_path)
        message = str(info.value)
        assert "\n" not in message and str(tmp_path) in message
        assert f"store format {found!r}" in message and "reads format 2" in message  # '2' is text
        assert "re-run `scancache preprocess` into a new store" in message


def test_a_store_id_that_is_no_identifier_is_refused_where_the_store_opens(tmp_path):
    """It goes into every response's headers: a CR/LF in it dropped every connection."""
    from store.format import StoreFormatError

    root = tmp_path / "store"
    image, mask = make_volume((8, 8, 4), 2, seed=1)
    write_scan(root, "0000001_V00-Aug00", image, mask, {"split": "train"})
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["scancache"]["store_id"] = "abc\r\nX-Injected: 1"
    (root / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError) as info:
        LocalSource(root)
    assert (
        str(info.value)
        == f"{root}: its zarr.json's scancache.store_id 'abc\\r\\nX-Injected: 1' is not an identifier"
    )


def test_local_source_caches_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(local_mod, "META_CACHE_ENTRIES", 2)
    monkeypatch.setattr(local_mod, "ARRAY_CACHE_ENTRIES", 3)
    truth = {}
    for i in range(5):
        scan = f"000000{i}_V00-Aug00"
        truth[scan] = _volume(10 + i, shape=(4, 4, 2))
        write_scan(tmp_path, scan, *truth[scan], {})
    source = LocalSource(tmp_path, cache_bytes=0)
    for _ in range(2):
        for scan, (image, mask) in truth.items():
            np.testing.assert_array_equal(source.read_image(scan), image)
            np.testing.assert_array_equal(source.read_mask(scan), mask)
            assert len(source._meta) <= 2 and len(source._arrays) <= 3


def test_unpublished_versions_go_after_the_grace_period(tmp_path):
    write_scan(tmp_path, SCAN, *_volume(5), {})
    assert publish.unpublish(tmp_path, SCAN)
    assert SCAN not in LocalSource(tmp_path).scan_ids()
    assert publish.remove_old_versions(tmp_path, grace_s=3600) == []
    assert len(publish.remove_old_versions(tmp_path, grace_s=0)) == 1
    assert not (tmp_path / ".versions" / SCAN).exists()


def _dead_pid():
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_job_lock_fails_at_once_waits_and_takes_over_stale_locks(tmp_path):
    ensure_store(tmp_path)
    with JobLock(tmp_path):
        lock = _strict((tmp_path / ".lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"] and lock["started"] > 0
        with pytest.raises(StoreLocked) as info:
            JobLock(tmp_path).acquire()
        message = str(info.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and "--wait" in message
    assert not (tmp_path / ".lock").exists()

    held = JobLock(tmp_path)
    held.acquire()
    timer = threading.Timer(0.5, held.release)
    timer.start()
    notes = []
    with JobLock(tmp_path, wait=True, warn=notes.append, poll_s=0.05):
        assert not held.held
    timer.join()
    assert any("waiting" in n for n in notes)

    import socket

    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 1.0}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    notes = []
    with JobLock(tmp_path, warn=notes.append):
        assert _strict((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert any("took over" in n and str(stale["pid"]) in n for n in notes)
    # a container restarted after its job was killed: the new job has the same host and pid
    # (pid 1), which is alive but does not hold the lock
    same_pid = {"host": socket.gethostname(), "pid": os.getpid(), "started": 2.0}
    (tmp_path / ".lock").write_text(json.dumps(same_pid))
    notes = []
    with JobLock(tmp_path, warn=notes.append):
        assert _strict((tmp_path / ".lock").read_text())["started"] > 2.0
    assert any("took over" in n for n in notes)
    # a damaged record naming no possible process of this host (OverflowError before; 0 and -1
    # would have asked about whole process groups)
    for pid in (2**70, 0, -1):
        (tmp_path / ".lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": pid, "started": 1.0})
        )
        notes = []
        with JobLock(tmp_path, warn=notes.append):
            assert _strict((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert any("took over" in n for n in notes)


def test_an_empty_lock_is_taken_over_once_old_an_unreadable_one_never(tmp_path, monkeypatch):
    """An empty lock file (a job of an older version killed between creating and writing it)
    names no owner to check: a young one is respected, an old one taken over. A lock that
    cannot be read here (another user's, a network filesystem's error) may be a running job's:
    never taken over, whatever its age."""
    import errno
    import pathlib
    import socket

    from store import lock as lock_mod

    ensure_store(tmp_path)
    lock = tmp_path / ".lock"
    old = time.time() - lock_mod.UNREADABLE_STALE_S - 1
    lock.write_text("")
    with pytest.raises(StoreLocked, match="unreadable lock file") as held:
        JobLock(tmp_path).acquire()
    # whose it is, on a store several users share (a lock written under umask 077 by another)
    assert re.search(r"\(unreadable lock file, owned by [^:]+:[^,]+, mode 0\d{3}\)", str(held.value))
    os.utime(lock, (old, old))
    notes = []
    with JobLock(tmp_path, warn=notes.append):
        assert _strict(lock.read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and "took over the lock of a job that left it empty" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lock")) == []

    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": 1.0}  # gone: if read
    lock.write_text(json.dumps(stale))
    os.utime(lock, (old, old))
    real_read = pathlib.Path.read_bytes

    def denied(path):
        if path.name == ".lock":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_read(path)

    with monkeypatch.context() as patched:
        patched.setattr(pathlib.Path, "read_bytes", denied)
        with pytest.raises(StoreLocked, match="an unknown job"):
            JobLock(tmp_path).acquire()
    assert json.loads(lock.read_text()) == stale  # left as it was


def test_a_lock_is_written_whole_or_in_place_where_there_are_no_links(tmp_path, monkeypatch):
    """Locks are written whole, then linked into place; on a filesystem without hard links
    (FAT, SMB, object-store mounts) they are created in place. A job that cannot write one
    names the lock file, and leaves neither an empty lock nor a temporary file."""
    import errno

    ensure_store(tmp_path)
    with monkeypatch.context() as patched:

        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        patched.setattr(os, "link", no_links)
        with JobLock(tmp_path):
            assert _strict((tmp_path / ".lock").read_text())["pid"] == os.getpid()
            with pytest.raises(StoreLocked):
                JobLock(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lock")) == []
    with monkeypatch.context() as patched:  # no links, and the lock written in place fails
        patched.setattr(os, "link", no_links)
        written = []

        def full_second_time(fd):
            written.append(fd)
            if len(written) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")

        patched.setattr(os, "fsync", full_second_time)
        with pytest.raises(OSError, match="cannot write its lock file"):
            JobLock(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lock")) == []
    with monkeypatch.context() as patched:

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        patched.setattr(os, "fsync", full)
        with pytest.raises(OSError) as info:
            JobLock(tmp_path).acquire()
    lock = tmp_path / ".lock"
    assert str(info.value) == f"{tmp_path}: cannot write its lock file {lock} (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".lock")) == []


def test_stale_staging_of_dead_writers_only_is_removed(tmp_path):
    ensure_store(tmp_path)
    mine = publish.new_staging(tmp_path, "job")
    dead = publish.new_staging(tmp_path, "job")
    owner = _strict((dead / "owner.json").read_text())
    (dead / "owner.json").write_text(json.dumps({**owner, "pid": _dead_pid()}))
    # an earlier process with this very pid (a restarted container's job): older than this one
    reused = publish.new_staging(tmp_path, "job")
    (reused / "owner.json").write_text(json.dumps({**owner, "started": 1.0}))
    assert publish.clean_stale_staging(tmp_path) == 2
    assert mine.is_dir() and not dead.exists() and not reused.exists()


def test_array_steps_see_every_slab_and_publish_with_the_scan(tmp_path, monkeypatch):
    from store import writer as store_mod

    seen = []

    class SliceSums(store_mod.ArrayStep):
        name = "slice_sums"

        def on_slab(self, z0, image, mask):
            seen.append((z0, image.shape[2]))
            self.sums = getattr(self, "sums", []) + [
                float(image[:, :, k].sum()) for k in range(image.shape[2])
            ]

        def finish(self):
            np.save(self.staged.work / "slice_sums.npy", np.array(self.sums))
            return {"slice_sums": True}

    monkeypatch.setattr(store_mod, "ARRAY_STEPS", [SliceSums])
    image, mask = _volume(6, shape=(8, 8, 20))
    attrs = write_scan(tmp_path, SCAN, image, mask, {})
    assert attrs["slice_sums"] is True and "slice_sums.npy" in attrs["manifest"]
    assert [z0 for z0, _ in seen] == sorted({z0 for z0, _ in seen}) and sum(n for _, n in seen) == 20
    stored = np.load(tmp_path / SCAN / "slice_sums.npy")
    np.testing.assert_array_equal(stored, [float(image[:, :, k].sum()) for k in range(20)])

    class Broken(store_mod.ArrayStep):
        def finish(self):
            raise RuntimeError("derived array failed")

    monkeypatch.setattr(store_mod, "ARRAY_STEPS", [Broken])
    before = publish.current_version(tmp_path, SCAN)
    with pytest.raises(RuntimeError):
        write_scan(tmp_path, SCAN, *_volume(7, shape=(8, 8, 20)), {})
    assert publish.current_version(tmp_path, SCAN) == before
    assert not (tmp_path / ".staging").exists()
    np.testing.assert_array_equal(LocalSource(tmp_path).read_image(SCAN), image)


def test_bounded_lru_keeps_entry_and_byte_bounds():
    from store.lru import BoundedLRU

    by_entries = BoundedLRU(max_entries=2)
    for k in "abc":
        by_entries.put(k, k.upper())
    assert by_entries.get("a") is None and by_entries.get("b") == "B" and len(by_entries) == 2
    by_entries.put("d", "D")  # "c" is now the least recently used
    assert by_entries.get("c") is None and by_entries.get("b") == "B"
    by_bytes = BoundedLRU(max_bytes=10, sizeof=len)
    by_bytes.put("x", "123456")
    by_bytes.put("y", "1234")
    by_bytes.put("z", "12")  # 12 bytes > 10: "x" goes
    assert by_bytes.get("x") is None and by_bytes.nbytes == 6
    by_bytes.put("huge", "0" * 11)  # larger than the whole cache: not kept
    assert by_bytes.get("huge") is None and by_bytes.nbytes == 6


def test_a_scan_folder_copied_without_links_is_named_by_every_command(tmp_path):
    """A store copied without its links (cp -rL, rsync without -l), or written into by a
    scancache older than format 2, holds plain folders where links into .versions belong:
    scans, verify and preprocess name the folder and what to do; preprocess leaves no version."""
    import shutil

    from h5_sources import random_scan, run_cli, write_volume_file

    source, store = tmp_path / "src", tmp_path / "store"
    scan = "0000001_V00-Aug00"
    write_volume_file(source / "train" / f"{scan}.h5", *random_scan((12, 10, 3), 2, seed=1))
    assert run_cli("preprocess", source, store, "--workers", "1").returncode == 0
    resolved = (store / scan).resolve()
    (store / scan).unlink()
    shutil.copytree(resolved, store / scan)  # what cp -rL makes of the link
    versions = sorted(os.listdir(store / ".versions" / scan))
    why = f"{store / scan} is a folder, not a link into .versions/"

    listed = run_cli("scans", store)
    assert listed.returncode == 0 and "0 scans" in listed.stdout
    assert listed.stderr.startswith(f"scancache scans: warning: {why}") and listed.stderr.count("\n") == 1
    checked = run_cli("verify", source, store)
    assert checked.returncode == 1 and f"MISSING  {scan}: {why}" in checked.stdout
    again = run_cli("preprocess", source, store, "--workers", "1")
    assert again.returncode == 1 and why in again.stdout and "Traceback" not in again.stderr
    assert sorted(os.listdir(store / ".versions" / scan)) == versions  # no orphan version

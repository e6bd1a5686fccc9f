"""Bad input: each bad scan fails with one line naming scan, file and why; good scans still
convert; the job exits non-zero; no traceback reaches the user."""

from __future__ import annotations

import os
import sys
import textwrap

import h5py
import numpy as np
import pytest
from h5_sources import (
    assert_store_matches,
    published,
    random_scan,
    run_cli,
    write_slice_files,
    write_volume_file,
)

from service.slice_files import load_scan
from service.sources import discover
from store.errors import EmptySource, SourceError

GOOD = ("0000001_V00-Aug00", "0000001_V01-Aug00", "0000009_V00-Aug00")


def _scan(shape=(16, 16, 4), classes=2, seed=0, dtype=np.float32):
    return random_scan(shape, classes, seed, dtype)


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def build_bad_source(root):
    """Good scans plus one scan per kind of bad input; returns {scan: (file, why fragment)}."""
    train, valid = root / "train", root / "valid"
    image, mask = _scan(seed=1)
    write_slice_files(train, GOOD[0], image, mask)
    write_slice_files(train, GOOD[1], *_scan(seed=2))
    write_slice_files(valid, GOOD[2], _scan(seed=3)[0], None)  # image-only is fine
    expected = {}

    key = "0000002_V00-Aug00"  # truncated HDF5
    write_slice_files(train, key, *_scan(seed=4))
    _truncate(train / f"{key}_003.im")
    expected[key] = (f"train/{key}_003.im", "unreadable HDF5")

    key = "0000003_V00-Aug00"  # not HDF5 at all
    write_slice_files(train, key, *_scan(seed=5))
    (train / f"{key}_002.seg").write_bytes(b"this is not an HDF5 file" * 10)
    expected[key] = (f"train/{key}_002.seg", "unreadable HDF5")

    key = "0000004_V00-Aug00"  # missing slice 3
    write_slice_files(train, key, *_scan(seed=6))
    (train / f"{key}_003.im").unlink()
    (train / f"{key}_003.seg").unlink()
    expected[key] = (f"train/{key}_003.im", "missing slice 3")

    key = "0000005_V00-Aug00"  # duplicate slice number: _002 and _02
    write_slice_files(train, key, *_scan(seed=7))
    (train / f"{key}_02.im").write_bytes((train / f"{key}_002.im").read_bytes())
    expected[key] = (f"{key}_0", "duplicate slice")

    key = "0000006_V00-Aug00"  # slices of different shapes
    image, mask = _scan(seed=8)
    write_slice_files(train, key, image, None)
    with h5py.File(train / f"{key}_004.im", "w") as f:
        f.create_dataset("data", data=np.zeros((16, 12, 1), np.float32))
    expected[key] = (f"train/{key}_004.im", "slice shape (16, 12) differs")

    key = "0000007_V00-Aug00"  # slices of different dtypes
    write_slice_files(train, key, _scan(seed=9)[0], None)
    with h5py.File(train / f"{key}_002.im", "w") as f:
        f.create_dataset("data", data=np.zeros((16, 16, 1), np.int16))
    expected[key] = (f"train/{key}_002.im", "dtype int16 differs")

    key = "0000008_V00-Aug00"  # a mask slice missing
    write_slice_files(train, key, *_scan(seed=10))
    (train / f"{key}_002.seg").unlink()
    expected[key] = (f"train/{key}_002.seg", "mask slice 2 missing")

    key = "0000010_V00-Aug00"  # a mask slice of another shape
    write_slice_files(train, key, *_scan(seed=11))
    with h5py.File(train / f"{key}_003.seg", "w") as f:
        f.create_dataset("data", data=np.zeros((8, 16, 1, 2), np.uint8))
    expected[key] = (f"train/{key}_003.seg", "mask slice shape (8, 16) differs")

    key = "0000011_V00-Aug00"  # non-binary mask values
    image, mask = _scan(seed=12)
    mask[3, 4, 1, 0] = 2
    write_slice_files(train, key, image, mask)
    expected[key] = (f"train/{key}_002.seg", "not binary (found 2)")

    key = "0000012_V00-Aug00"  # the same scan under two split folders
    write_slice_files(train, key, *_scan(seed=13))
    write_slice_files(valid, key, *_scan(seed=13))
    expected[key] = (f"valid/{key}_001.im", "two splits")

    key = "0000013_V00-Aug00"  # 3D file without a volume dataset
    with h5py.File(valid / f"{key}.h5", "w") as f:
        f.create_dataset("seg", data=np.zeros((4, 4, 4, 1), np.uint8))
    expected[key] = (f"valid/{key}.h5", "no dataset 'volume'")

    key = "0000014_V00-Aug00"  # 3D seg of another shape
    volume, seg = _scan(seed=14)
    write_volume_file(valid / f"{key}.h5", volume, seg[:, :, :2])
    expected[key] = (f"valid/{key}.h5", "seg has shape")

    huge = (2**20, 2**20)  # 4 TiB a float32 slice: a damaged header (the file holds no data)
    key = "0000015_V00-Aug00"  # 2D: slice 1 declares a huge shape (image-only: nothing else differs)
    write_slice_files(train, key, _scan(seed=15)[0], None)
    with h5py.File(train / f"{key}_001.im", "w") as f:
        f.create_dataset("data", shape=(*huge, 1), dtype=np.float32, chunks=(64, 64, 1))
    expected[key] = (f"train/{key}_001.im", "declares shape (1048576, 1048576, 1)")

    key = "0000016_V00-Aug00"  # 3D: the volume declares a huge shape
    with h5py.File(valid / f"{key}.h5", "w") as f:
        f.create_dataset("volume", shape=(*huge, 4), dtype=np.float32, chunks=(64, 64, 4))
    expected[key] = (f"valid/{key}.h5", "dataset 'volume' declares shape (1048576, 1048576, 4)")

    key = "0000017_V00-Aug00"  # 3D: NaN spacing (it failed in the store's strict JSON)
    write_volume_file(valid / f"{key}.h5", *_scan(seed=17), spacing=[0.5, float("nan"), 1.0])
    expected[key] = (f"valid/{key}.h5", "spacing [0.5, nan, 1.0] is not positive finite")

    key = "0000018_V00-Aug00"  # 2D: an infinite spacing on slice 1
    write_slice_files(train, key, *_scan(seed=18))
    with h5py.File(train / f"{key}_001.im", "a") as f:
        f.attrs["spacing"] = [0.5, 0.5, float("inf")]
    expected[key] = (f"train/{key}_001.im", "spacing [0.5, 0.5, inf] is not positive finite")

    key = "0000019_V00-Aug00"  # 3D: two numbers (it failed in the store, naming no file)
    write_volume_file(valid / f"{key}.h5", *_scan(seed=19), spacing=[1.0, 2.0])
    expected[key] = (
        f"valid/{key}.h5",
        "spacing [1.0, 2.0] is not three numbers (voxel size in mm along y, x, z)",
    )

    key = "0000020_V00-Aug00"  # 2D: text (it was dropped: the scan stored at 1 mm)
    write_slice_files(train, key, *_scan(seed=20))
    with h5py.File(train / f"{key}_001.im", "a") as f:
        f.attrs["spacing"] = "1,1,1"
    expected[key] = (f"train/{key}_001.im", "spacing '1,1,1' is not numbers")

    (train / "scan-one_slice2.im").write_bytes(b"")  # a name that does not parse
    expected["scan-one_slice2"] = ("train/scan-one_slice2.im", "does not parse")
    (train / "notes.txt").write_text("ignored")
    return expected


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    expected = build_bad_source(root / "source")
    result = run_cli("preprocess", root / "source", root / "store", "--workers", "2")
    return root, expected, result


def test_good_scans_converted_bad_scans_reported(bad_run):
    root, expected, result = bad_run
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"scans: {len(GOOD)} converted, 0 skipped, {len(expected)} failed" in result.stdout
    lines = [line.strip() for line in result.stdout.splitlines()]
    for scan, (file, why) in expected.items():
        matching = [line for line in lines if line.startswith(f"{scan}: ")]
        assert len(matching) == 1, (scan, output)
        assert file in matching[0] and why in matching[0], (matching[0], file, why)
    assert published(root / "store") == sorted(GOOD)
    assert_store_matches(root / "store", root / "source", only=GOOD)


def test_verify_reports_good_and_bad(bad_run):
    root, expected, _ = bad_run
    result = run_cli("verify", root / "source", root / "store")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    for scan in GOOD:
        assert f"OK       {scan}" in result.stdout
    lines = result.stdout.splitlines()
    for scan, (file, why) in expected.items():  # one line each, naming the file and why
        matching = [line for line in lines if line.startswith(f"FAILED   {scan}: ")]
        assert len(matching) == 1 and file in matching[0] and why in matching[0], (scan, result.stdout)
    assert f"verify: {len(GOOD)} ok, {len(expected)} failed; store is NOT exact" in result.stdout


@pytest.mark.parametrize("make", ["empty", "missing", "only_other_files"])
def test_empty_source_is_a_clear_error(tmp_path, make):
    source = tmp_path / "source"
    if make != "missing":
        source.mkdir()
    if make == "only_other_files":
        (source / "train").mkdir()
        (source / "train" / "notes.txt").write_text("x")
    with pytest.raises(EmptySource):
        discover(source)
    result = run_cli("preprocess", source, tmp_path / "store")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().startswith("scancache preprocess: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_one_split_given_as_source_is_warned_of_naming_the_parent(tmp_path):
    """``src/train`` of ``src/{train,valid}`` stores its scans without splits: preprocess and
    verify warn in one line naming ``src``, and verify then offers no repair command (which
    would re-publish them so). A store of one split alone stays possible."""
    source = tmp_path / "src"
    write_slice_files(source / "train", GOOD[0], *_scan())
    write_slice_files(source / "valid", GOOD[1], *_scan(seed=1))
    warning = (
        f"{source / 'train'} is the 'train' split of {source} (beside valid): its scans have no "
        f"split here; give {source} as SOURCE to keep each scan's split"
    )
    assert run_cli("preprocess", source, tmp_path / "store").returncode == 0
    checked = run_cli("verify", source / "train", tmp_path / "store")
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert checked.stderr.strip() == f"verify: warning: {warning}"
    assert "MISMATCH 0000001_V00-Aug00: split 'train', source None" in checked.stdout
    assert "--rebuild" not in checked.stdout
    assert checked.stdout.strip().endswith("verify: see the warning above before converting anything again")
    # damage the warning does not explain still gets its repair command
    shard = next(p for p in (tmp_path / "store" / GOOD[0]).resolve().rglob("image/c/*/*/*") if p.is_file())
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    torn = run_cli("verify", source / "train", tmp_path / "store")
    assert f"TORN     {GOOD[0]}: image/c/0/0/0 has " in torn.stdout
    assert torn.stdout.strip().endswith(f"--rebuild {GOOD[0]}")
    alone = run_cli("preprocess", source / "train", tmp_path / "train-store")
    assert alone.returncode == 0 and f"preprocess: warning: {warning}" in alone.stderr
    assert [s.split for s in discover(source / "train").scans] == [None]
    # a flat folder of another name is not one split
    flat = tmp_path / "cohort"
    write_slice_files(flat, GOOD[0], *_scan())
    assert discover(flat).notes == []


def test_store_that_is_not_a_store_is_refused(tmp_path):
    source = tmp_path / "source"
    write_slice_files(source, GOOD[0], *_scan())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "thesis.pdf").write_text("precious")
    result = run_cli("preprocess", source, tmp_path / "elsewhere")
    assert result.returncode == 1 and "not a scancache store" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "elsewhere" / "thesis.pdf").exists()


def test_load_scan_errors_are_source_errors(tmp_path):
    """The same checks in-process: SourceError carries scan, file and why separately."""
    expected = build_bad_source(tmp_path)
    found = discover(tmp_path)
    errors = {err.scan: err for err in found.failures}
    for spec in found.scans:
        if spec.scan_id in GOOD:
            load_scan(spec)
            continue
        with pytest.raises(SourceError) as info:
            load_scan(spec)
        errors[spec.scan_id] = info.value
    assert set(errors) == set(expected)
    for scan, (file, why) in expected.items():
        err = errors[scan]
        assert err.scan == scan and file in err.file and why in err.why, (str(err), file, why)
        assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("check", "bad"),
    [
        ("scan id", "0000001_V00-Aug00\n"),
        ("channel array", "image_c1\n"),
        ("bucket", "s3://bucket\n/prefix"),
        ("slice file", "0000001_V00-Aug00_001\n"),
    ],
)
def test_names_with_a_final_newline_are_refused(check, bad):
    """A regular expression's "$" also matches before a final newline: every name check is a
    full match, so a name ending in a newline is refused (it broke response headers)."""
    from service.sources import _SLICE_NAME
    from store.errors import InvalidPath
    from store.format import channel_of, validate_scan_id
    from store.s3_errors import parse_s3_url

    if check == "scan id":
        with pytest.raises(InvalidPath):
            validate_scan_id(bad)
    elif check == "channel array":
        assert channel_of(bad) is None and channel_of(bad.strip()) == 1
    elif check == "bucket":
        with pytest.raises(ValueError, match="not a valid S3 bucket name"):
            parse_s3_url(bad)
    else:
        assert _SLICE_NAME.fullmatch(bad) is None and _SLICE_NAME.fullmatch(bad.strip()) is not None


def test_a_source_name_with_a_newline_fails_in_one_line(tmp_path):
    """A source file whose name ends in a newline fails that scan alone, in one line that
    shows the name quoted, and nothing of it is published."""
    source, store = tmp_path / "src", tmp_path / "store"
    image, mask = _scan(seed=11)
    write_volume_file(source / "train" / f"{GOOD[0]}.h5", image, mask)
    write_volume_file(source / "train" / f"{GOOD[1]}\n.h5", image, mask)
    result = run_cli("preprocess", source, store)
    assert result.returncode == 1, result.stderr
    failure = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "scan id" in line]
    assert failure == [
        f"  '{GOOD[1]}\\n': 'train/{GOOD[1]}\\n.h5': not usable as a scan id (letters, digits, '.', '_', '-' only)"
    ]
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [GOOD[0], "zarr.json"]


def _as_a_user(*args):
    """``scancache ARGS`` with file permissions applied as to any user: root's overrides
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped where the tests run as root."""
    import sys

    return _unprivileged([sys.executable, "-m", "service.cli", *map(str, args)])


def _unprivileged(command):
    import shutil
    import subprocess

    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"] if setpriv else []
        # a rootless container may not let root drop capabilities (CAP_SETPCAP)
        if not prefix or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("running as root without a way to drop its file-permission overrides")
        command = [*prefix, *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def _two_splits(tmp_path):
    source, store = tmp_path / "src", tmp_path / "store"
    for split, scan_id in (("train", "0000001_V00-Aug00"), ("valid", "0000002_V00-Aug00")):
        image, mask = _scan(seed=int(scan_id[6]))
        write_slice_files(source / split, scan_id, image, mask)
    first = run_cli("preprocess", source, store, "--workers", "1", "-q")
    assert first.returncode == 0, first.stderr
    return source, store


def test_a_source_that_cannot_be_listed_is_refused_in_one_line(tmp_path):
    source, store = _two_splits(tmp_path)
    source.chmod(0)
    try:
        again = _as_a_user("preprocess", source, store, "--workers", "1", "-q", "--prune")
    finally:
        source.chmod(0o755)
    assert again.returncode == 1, again.stdout + again.stderr
    assert again.stderr == (
        f"scancache preprocess: error: {source}/: cannot list this folder (Permission denied); "
        "nothing was converted or pruned\n"
    )
    assert sorted(published(store)) == ["0000001_V00-Aug00", "0000002_V00-Aug00"]


def test_a_split_folder_that_cannot_be_listed_fails_its_scans_and_withholds_prune(tmp_path):
    """os.walk skipped it in silence, and --prune then removed its scans: now one failure line
    names it, the other folders convert, and --prune removes nothing (its scans are not gone)."""
    source, store = _two_splits(tmp_path)
    (source / "lost+found").mkdir()  # a file system's own folder: never read, never a failure
    (source / "lost+found").chmod(0)
    (source / "train").chmod(0)
    try:
        again = _as_a_user("preprocess", source, store, "--workers", "1", "-q", "--prune")
    finally:
        (source / "train").chmod(0o755)
    assert again.returncode == 1, again.stdout + again.stderr
    assert (
        "  train: train/: cannot list this folder (Permission denied); its scans are not read" in again.stdout
    )
    assert "(kept: --prune waits until every source folder is read; see the failures)" in again.stdout
    assert "lost+found" not in again.stdout + again.stderr
    assert sorted(published(store)) == ["0000001_V00-Aug00", "0000002_V00-Aug00"]


def test_a_folder_name_that_is_no_text_fails_naming_it_and_withholds_prune(tmp_path):
    """A split folder named by bytes that are not UTF-8: one failure line naming it (it failed
    a scan with a UnicodeEncodeError blamed on the store), and since its scans were not read,
    --prune removes none of them."""
    source, store = tmp_path / "src", tmp_path / "store"
    image, mask = _scan(seed=3)
    write_slice_files(source / "train", "0000001_V00-Aug00", image, mask)
    write_slice_files(source / "valid", "0000002_V00-Aug00", image, mask)
    assert run_cli("preprocess", source, store, "--workers", "1", "-q").returncode == 0
    odd = os.fsdecode(b"tr\xffain")
    os.rename(source / "train", source / odd)
    result = run_cli("preprocess", source, store, "--workers", "1", "-q", "--prune")
    assert result.returncode == 1
    shown = repr(odd)
    assert f"  {shown}: {odd + '/'!r}: folder name is not UTF-8 text (its scans are not read); rename it" in (
        result.stdout
    ), result.stdout
    assert "(kept: --prune waits until every source folder is read; see the failures)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(published(store)) == ["0000001_V00-Aug00", "0000002_V00-Aug00"]


def test_only_folders_whose_scans_went_unread_withhold_prune(tmp_path):
    """A link to a folder already read (its scans are read through the other path) fails but
    withholds nothing; a symbolic link named by bytes that are not UTF-8 is refused by name too."""
    source = tmp_path / "src"
    image, mask = _scan(seed=4)
    write_slice_files(source / "train", "0000001_V00-Aug00", image, mask)
    os.symlink(source, source / "train" / "up")  # back to a folder already read
    found = discover(source)
    assert [str(f) for f in found.failures] == [
        "up: train/up/: symbolic link loop (points to a folder already read); not followed"
    ]
    assert [s.scan_id for s in found.scans] == ["0000001_V00-Aug00"] and found.unread_folders == []
    odd = os.fsdecode(b"li\xffnk")
    os.symlink(source / "train", source / odd)
    found = discover(source)
    assert f"{odd}/" in found.unread_folders
    assert any("folder name is not UTF-8 text" in str(f) for f in found.failures)


def test_a_scan_folder_that_became_unreadable_is_reported_not_called_damaged(tmp_path):
    """A store folder whose permissions changed: preprocess still reports every scan (the
    upkeep that failed is one more line, not an error in place of the report), scans lists the
    others, verify says the files cannot be read (no --rebuild advice), and a reader gets a
    PermissionError (the server's 503), never ScanDamaged's "is missing"."""
    source, store = _two_splits(tmp_path)
    versions = store / ".versions" / "0000001_V00-Aug00"
    versions.chmod(0)
    try:
        again = _as_a_user("preprocess", source, store, "--workers", "1", "-q")
        listed = _as_a_user("scans", store)
        checked = _as_a_user("verify", source, store)
    finally:
        versions.chmod(0o755)
    assert again.returncode == 1
    assert "scans: 0 converted, 1 skipped, 1 failed" in again.stdout
    assert "store upkeep failed (1):\n  removing old versions: " in again.stdout
    assert "Permission denied" in again.stdout and "Traceback" not in again.stderr
    assert listed.returncode == 0 and "0000002_V00-Aug00" in listed.stdout, listed.stderr
    assert (
        "FAILED   0000001_V00-Aug00: its stored files cannot be read here (Permission denied)"
        in checked.stdout
    )
    assert "--rebuild" not in checked.stdout and "TORN" not in checked.stdout
    image = next(p for p in versions.iterdir() if p.is_dir()) / "image"
    image.chmod(0)
    try:
        probe = textwrap.dedent(
            f"""
            from store.source import LocalSource
            try:
                LocalSource({str(store)!r}).read_image("0000001_V00-Aug00")
            except Exception as err:
                print(type(err).__name__)
            """
        )
        read = _unprivileged([sys.executable, "-c", probe])
    finally:
        image.chmod(0o755)
    assert read.stdout.strip() == "PermissionError", read.stdout + read.stderr

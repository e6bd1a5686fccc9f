"""Discovery, naming, fingerprints and reading of MedSegPy inputs (no Dask)."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from h5_sources import random_scan, reference, write_slice_files, write_volume_file
from hypothesis import given, settings
from hypothesis import strategies as st

from service.slice_files import load_scan
from service.sources import _SLICE_NAME, discover, fingerprint
from store.errors import SourceError
from store.format import ChunkLayout


@settings(max_examples=60, deadline=None)
@given(
    subject=st.integers(0, 9_999_999),
    visit=st.integers(0, 99),
    aug=st.integers(0, 99),
    number=st.integers(1, 999),
    width=st.integers(1, 4),
)
def test_slice_names_parse_back(subject, visit, aug, number, width):
    name = f"{subject:07d}_V{visit:02d}-Aug{aug:02d}_{number:0{width}d}"
    match = _SLICE_NAME.fullmatch(name)
    assert match is not None
    assert match["key"] == f"{subject:07d}_V{visit:02d}-Aug{aug:02d}"
    assert (int(match["subject"]), int(match["visit"]), int(match["aug"]), int(match["slice"])) == (
        subject,
        visit,
        aug,
        number,
    )


@pytest.mark.parametrize(
    "name",
    [
        "0000001_V00-Aug00",
        "0000001_V00_001",
        "x_V00-Aug00_001",
        "1_V0-Aug0_1a",
        "1_V0-Aug0_1\n",
        "1_V0-Aug0_\u0661",
    ],
)
def test_names_that_do_not_parse(name):
    assert _SLICE_NAME.fullmatch(name) is None


def test_discover_groups_slices_splits_and_volumes(tmp_path):
    image, mask = random_scan((8, 8, 3), 2, seed=0)
    write_slice_files(tmp_path / "train", "0000007_V01-Aug02", image, mask)
    write_slice_files(tmp_path / "train" / "nested", "0000008_V00-Aug00", image, None)
    write_slice_files(tmp_path, "0000009_V00-Aug00", image, mask)  # no split folder
    write_volume_file(tmp_path / "test" / "case_a.h5", image, mask)
    (tmp_path / "train" / "labels.csv").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    write_slice_files(tmp_path / ".hidden", "0000010_V00-Aug00", image, None)
    found = discover(tmp_path)
    assert found.failures == []
    by_id = {spec.scan_id: spec for spec in found.scans}
    assert sorted(by_id) == ["0000007_V01-Aug02", "0000008_V00-Aug00", "0000009_V00-Aug00", "case_a"]
    spec = by_id["0000007_V01-Aug02"]
    assert (spec.split, spec.subject_id, spec.time_point, spec.augmentation, spec.kind) == (
        "train",
        7,
        1,
        2,
        "2d",
    )
    assert spec.image_files == tuple(f"train/0000007_V01-Aug02_{n:03d}.im" for n in (1, 2, 3))
    assert spec.mask_files == tuple(f"train/0000007_V01-Aug02_{n:03d}.seg" for n in (1, 2, 3))
    assert by_id["0000008_V00-Aug00"].split == "train" and by_id["0000008_V00-Aug00"].mask_files == ()
    assert by_id["0000009_V00-Aug00"].split is None
    volume = by_id["case_a"]
    assert (volume.kind, volume.split, volume.subject_id) == ("3d", "test", None)


def test_slices_are_ordered_by_number_not_by_name(tmp_path):
    """Unpadded numbers (``_2``, ``_10``) sort as numbers; the stacked volume follows them."""
    image, mask = random_scan((6, 5, 12), 3, seed=1)
    write_slice_files(tmp_path, "0000001_V00-Aug00", image, mask, width=1)
    (spec,) = discover(tmp_path).scans
    loaded = load_scan(spec)
    np.testing.assert_array_equal(loaded.image, image)
    np.testing.assert_array_equal(loaded.mask, mask)
    assert loaded.mask.dtype == np.uint8


@pytest.mark.parametrize("dtype", ["float32", ">f4", "int16", ">i2", "uint8", "float64", "bool"])
def test_load_scan_keeps_dtype_in_native_order(tmp_path, dtype):
    image = random_scan((7, 9, 4), 1, seed=2, dtype=np.int16)[0]
    image = (image > 0) if dtype == "bool" else image.astype(dtype)
    write_slice_files(tmp_path, "0000001_V00-Aug00", image)
    (spec,) = discover(tmp_path).scans
    loaded = load_scan(spec)
    assert loaded.image.dtype == np.dtype(dtype).newbyteorder("=")
    assert loaded.image.dtype.isnative
    np.testing.assert_array_equal(loaded.image, image)
    assert loaded.mask is None


def test_mask_values_as_float_or_bool_are_accepted(tmp_path):
    image, mask = random_scan((5, 5, 2), 2, seed=3)
    write_slice_files(tmp_path / "a", "0000001_V00-Aug00", image, mask.astype(np.float32))
    write_slice_files(tmp_path / "a", "0000002_V00-Aug00", image, mask.astype(bool))
    for spec in discover(tmp_path).scans:
        np.testing.assert_array_equal(load_scan(spec).mask, mask)


def test_volume_spacing_and_image_only(tmp_path):
    volume, seg = random_scan((6, 7, 5), 2, seed=4)
    write_volume_file(tmp_path / "0000004_V03-Aug01.h5", volume, seg, spacing=[0.3, 0.3, 1.0])
    write_volume_file(tmp_path / "plain.h5", volume)
    by_id = {spec.scan_id: spec for spec in discover(tmp_path).scans}
    spec = by_id["0000004_V03-Aug01"]
    assert (spec.subject_id, spec.time_point, spec.augmentation) == (4, 3, 1)
    loaded = load_scan(spec)
    assert loaded.spacing == pytest.approx([0.3, 0.3, 1.0])
    np.testing.assert_array_equal(loaded.mask, seg)
    plain = load_scan(by_id["plain"])
    assert plain.mask is None and plain.spacing is None
    truth = reference(tmp_path)
    np.testing.assert_array_equal(plain.image, truth["plain"][1])


def test_2d_and_3d_with_the_same_key_is_an_error(tmp_path):
    image, mask = random_scan((5, 5, 2), 1, seed=5)
    write_slice_files(tmp_path, "0000001_V00-Aug00", image, mask)
    write_volume_file(tmp_path / "0000001_V00-Aug00.h5", image, mask)
    found = discover(tmp_path)
    assert found.scans == []
    (err,) = found.failures
    assert err.file == "0000001_V00-Aug00.h5" and "also given as 2D slices" in err.why


def test_slice_zero_and_orphan_masks(tmp_path):
    image, mask = random_scan((5, 5, 2), 1, seed=6)
    write_slice_files(tmp_path, "0000001_V00-Aug00", image, mask)
    with h5py.File(tmp_path / "0000001_V00-Aug00_000.im", "w") as f:
        f.create_dataset("data", data=image[:, :, :1])
    write_slice_files(tmp_path / "x", "0000002_V00-Aug00", image, mask)
    (tmp_path / "x" / "0000002_V00-Aug00_001.im").unlink()
    (tmp_path / "x" / "0000002_V00-Aug00_002.im").unlink()
    write_slice_files(tmp_path / "y", "0000003_V00-Aug00", image, mask)
    with h5py.File(tmp_path / "y" / "0000003_V00-Aug00_003.seg", "w") as f:
        f.create_dataset("data", data=mask[:, :, :1])
    why = {err.scan: err.why for err in discover(tmp_path).failures}
    assert "1-indexed" in why["0000001_V00-Aug00"]
    assert "without any image slice" in why["0000002_V00-Aug00"]
    assert "no matching image slice" in why["0000003_V00-Aug00"]


def test_fingerprint_follows_size_mtime_and_layout(tmp_path):
    image, mask = random_scan((6, 6, 3), 2, seed=7)
    write_slice_files(tmp_path, "0000001_V00-Aug00", image, mask)
    (spec,) = discover(tmp_path).scans
    layout = ChunkLayout()
    fp, size = fingerprint(spec, layout)
    assert size == sum(os.path.getsize(tmp_path / rel) for rel in spec.files)
    assert fingerprint(spec, layout) == (fp, size)  # stable
    assert fingerprint(spec, ChunkLayout.parse("32,32,4"))[0] != fp
    path = tmp_path / spec.image_files[1]
    st_ = os.stat(path)
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1))
    assert fingerprint(spec, layout)[0] != fp
    path.unlink()
    with pytest.raises(SourceError, match="cannot stat"):
        fingerprint(spec, layout)


def test_volume_names_that_cannot_be_scan_ids(tmp_path):
    volume = random_scan((4, 4, 2), 1, seed=8)[0]
    write_volume_file(tmp_path / "knee scan (copy).h5", volume)
    write_volume_file(tmp_path / "fine-name.v2.h5", volume)
    found = discover(tmp_path)
    assert [spec.scan_id for spec in found.scans] == ["fine-name.v2"]
    (err,) = found.failures
    assert err.file == "knee scan (copy).h5" and "scan id" in err.why

"""Synthetic knee phantoms: formats, splits, shells, determinism."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from h5_sources import reference
from hypothesis import given
from hypothesis import strategies as st

from service.sample_data import SPACING, assign_splits, phantom, write_sample_data


@given(
    subjects=st.integers(1, 30),
    splits=st.lists(st.sampled_from("abcdefg"), min_size=0, max_size=5, unique=True),
)
def test_assign_splits_covers_every_subject_and_split(subjects, splits):
    assigned = assign_splits(subjects, splits)
    assert len(assigned) == subjects
    if not splits:
        assert assigned == [None] * subjects
    else:
        assert set(assigned) == set(splits[: min(subjects, len(splits))])


def test_phantom_shells_are_disjoint_classes_with_distinct_intensity():
    image, mask = phantom((48, 48, 16), 4, np.random.default_rng(0))
    assert image.dtype == np.float32 and mask.dtype == np.uint8 and mask.shape == (48, 48, 16, 4)
    assert set(np.unique(mask)) == {0, 1}
    assert mask.sum(axis=-1).max() == 1  # one class per voxel at most
    per_class = mask.sum(axis=(0, 1, 2))
    assert (per_class > 0).all()
    background = image[mask.sum(axis=-1) == 0].mean()
    means = [image[mask[..., k] == 1].mean() for k in range(4)]
    assert all(abs(m - background) > 0.05 for m in means)
    fg_per_slice = mask.sum(axis=(0, 1, 3))
    assert fg_per_slice[0] == 0 and fg_per_slice[-1] == 0 and fg_per_slice[8] > 0  # ends hold no knee


def test_later_visits_have_thinner_shells():
    thick = phantom((48, 48, 16), 3, np.random.default_rng(5), thinning=0.0)[1].sum()
    thin = phantom((48, 48, 16), 3, np.random.default_rng(5), thinning=0.2)[1].sum()
    assert thin < thick


def test_2d_layout_names_and_splits(tmp_path):
    data = write_sample_data(tmp_path, subjects=5, visits=2, shape=(16, 12, 5), num_classes=3, seed=1)
    assert data.root == tmp_path and {s.kind for s in data.scans} == {"2d"}
    assert len(data.scans) == 10
    ims = sorted(tmp_path.rglob("*.im"))
    segs = sorted(tmp_path.rglob("*.seg"))
    assert len(ims) == len(segs) == 10 * 5
    assert (tmp_path / "train" / "0000001_V00-Aug00_001.im").is_file()
    assert (tmp_path / "test" / "0000005_V01-Aug00_005.seg").is_file()
    with h5py.File(ims[0], "r") as f:
        assert f["data"].shape == (16, 12, 1) and f["data"].dtype == np.float32
    with h5py.File(segs[0], "r") as f:
        assert f["data"].shape == (16, 12, 1, 3) and f["data"].dtype == np.uint8
    splits = {}
    for scan in data.scans:
        splits.setdefault(scan.subject_id, set()).add(scan.split)
    assert all(len(s) == 1 for s in splits.values())  # no subject in two splits
    assert {s.split for s in data.scans} == {"train", "valid", "test"}


def test_both_mixes_slice_and_volume_subjects_in_one_folder(tmp_path):
    args = dict(subjects=3, visits=2, shape=(10, 10, 4), num_classes=2, dtype="int16", seed=7)
    data = write_sample_data(tmp_path / "both", fmt="both", **args)
    kinds = {s.scan_id: s.kind for s in data.scans}
    assert kinds == {
        f"{subject:07d}_V{visit:02d}-Aug00": "2d" if subject % 2 else "3d"
        for subject in (1, 2, 3)
        for visit in (0, 1)
    }
    assert (data.count("2d"), data.count("3d")) == (4, 2)
    assert {p.name for p in (tmp_path / "both").iterdir()} == {"train", "valid", "test"}
    mixed = reference(tmp_path / "both")
    assert sorted(mixed) == sorted(kinds)  # every scan once, in one of the two forms
    assert len(list((tmp_path / "both").rglob("*.h5"))) == 2
    assert len(list((tmp_path / "both").rglob("*.im"))) == 4 * 4
    # each scan holds the same voxels as the single-format output of the same seed
    single = {
        kind: reference(write_sample_data(tmp_path / kind, fmt=kind, **args).root) for kind in ("2d", "3d")
    }
    for scan_id, kind in kinds.items():
        split, image, mask = mixed[scan_id]
        assert split == single[kind][scan_id][0] and image.dtype == np.int16
        np.testing.assert_array_equal(image, single[kind][scan_id][1])
        np.testing.assert_array_equal(mask, single[kind][scan_id][2])
    with h5py.File(next((tmp_path / "both").rglob("*.h5")), "r") as f:
        assert list(f.attrs["spacing"]) == pytest.approx(SPACING)


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = reference(write_sample_data(tmp_path / "a", subjects=1, visits=1, shape=(8, 8, 3), seed=4).root)
    b = reference(write_sample_data(tmp_path / "b", subjects=1, visits=1, shape=(8, 8, 3), seed=4).root)
    c = reference(write_sample_data(tmp_path / "c", subjects=1, visits=1, shape=(8, 8, 3), seed=5).root)
    key = "0000001_V00-Aug00"
    np.testing.assert_array_equal(a[key][1], b[key][1])
    assert not np.array_equal(a[key][1], c[key][1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fmt": "4d"},
        {"shape": (8, 8)},
        {"shape": (8, 0, 2)},
        {"subjects": 0},
        {"num_classes": 0},
        {"fmt": "both", "subjects": 1},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_sample_data(tmp_path, **kwargs)


def test_a_sample_data_run_that_fails_leaves_dir_as_it_was_and_runs_again(tmp_path, monkeypatch, capsys):
    """Stopped or failed midway (a full disk, Ctrl-C), it left DIR/train behind, and the same
    command then refused ("is not empty"). A shape no memory holds is refused before writing,
    naming it; a negative --seed names --seed."""
    import service.sample_data as sample_data
    from service import cli

    written = sample_data._write_slices
    calls = []

    def fails_at_the_third_scan(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        written(*args, **kwargs)

    monkeypatch.setattr(sample_data, "_write_slices", fails_at_the_third_scan)
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        calls.clear()
        assert cli.main(["sample-data", str(folder), "--shape", "8,8,2"]) == 1
        assert "No space left on device" in capsys.readouterr().err
        assert folder.exists() == (folder == empty) and (not folder.exists() or not any(folder.iterdir()))
    monkeypatch.setattr(sample_data, "_write_slices", written)
    assert cli.main(["sample-data", str(new), "--shape", "8,8,2"]) == 0
    assert "wrote 8 2D scans" in capsys.readouterr().out
    huge = tmp_path / "huge"
    assert cli.main(["sample-data", str(huge), "--shape", "100000,100000,1000"]) == 1
    assert "shape (100000, 100000, 1000): one scan takes" in capsys.readouterr().err and not huge.exists()
    with pytest.raises(SystemExit):
        cli.main(["sample-data", str(huge), "--seed", "-1"])
    assert "argument --seed: '-1' must be at least 0" in capsys.readouterr().err

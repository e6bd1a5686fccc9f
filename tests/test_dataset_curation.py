"""Choosing the scans of an experiment: filters given as Python users hold them (numpy arrays,
ranges, numpy scalars), values that select nothing said rather than dropped, augmented copies
in a test loader said, and a subject in two splits said by the job."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from loaders import Config, DatasetCatalog, build_loader, close_shared_sources, get_dataset_dicts


@pytest.fixture
def catalog(small_store):
    root, _ = small_store
    names: list[str] = []

    def register(name, **filters):
        names.append(name)
        DatasetCatalog.register(name, str(root), **filters)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
    close_shared_sources()


def _ids(name):
    return sorted(d["scan_id"] for d in get_dataset_dicts(name, filter_empty=False))


def test_filters_take_numpy_arrays_ranges_and_numpy_scalars_as_lists(catalog):
    want = _ids(catalog("listed", subject_id=[1, 2]))
    assert want == ["0000001_V00-Aug00", "0000001_V01-Aug00", "0000002_V00-Aug00"]
    assert _ids(catalog("array", subject_id=np.array([1, 2]))) == want
    assert _ids(catalog("range", subject_id=range(1, 3))) == want
    assert _ids(catalog("generator", subject_id=(k for k in (1, 2)))) == want
    assert _ids(catalog("scalar", subject_id=np.int64(2))) == ["0000002_V00-Aug00"]


def test_true_is_no_augmentation_index(small_store):
    root, _ = small_store
    with pytest.raises(
        ValueError, match=r"^dataset 'flag': augmentation=True: expected an integer or a list of them$"
    ):
        DatasetCatalog.register("flag", str(root), augmentation=True)
    assert "flag" not in DatasetCatalog.list()


def test_values_of_a_list_that_select_nothing_are_said(catalog):
    name = catalog("typo", split="train", subject_id=[1, 99, "7"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ids(name) == ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    said = [str(w.message) for w in caught if "no scan of the store" in str(w.message)]
    assert said == ["dataset 'typo': subject_id 99, 7 match no scan of the store (left out of the dataset)"]
    # a value that selects scans the other filters leave out is no typo: nothing said
    quiet = catalog("quiet", split="train", subject_id=[1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ids(quiet)
    assert not [w for w in caught if "no scan of the store" in str(w.message)]


def test_a_test_loader_over_augmented_copies_says_so(catalog):
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3))
    every = catalog("with_copies", split=["valid", "test"])
    with pytest.warns(
        UserWarning,
        match=r"1 of its 2 scans are augmented copies \(augmentation > 0, e.g. '0000003_V00-Aug01'\)",
    ):
        build_loader(cfg, every, 4, True, False, False)
    originals = catalog("originals", split=["valid", "test"], augmentation=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = build_loader(cfg, originals, 4, True, False, False)
    assert [s.scan_id for s in loader.scans] == ["0000002_V00-Aug00"]
    assert not [w for w in caught if "augmented copies" in str(w.message)]


def test_a_subject_in_two_splits_is_said_by_the_job(tmp_path):
    from h5_sources import run_cli, write_slice_files

    from service.sources import discover

    image = np.zeros((6, 5, 2), np.float32)
    mask = np.zeros((6, 5, 2, 2), np.uint8)
    write_slice_files(tmp_path / "src" / "train", "0000001_V00-Aug00", image, mask)
    write_slice_files(tmp_path / "src" / "valid", "0000001_V01-Aug00", image, mask)
    write_slice_files(tmp_path / "src" / "train", "0000002_V00-Aug00", image, mask)
    write_slice_files(tmp_path / "src" / "valid", "0000003_V00-Aug00", image, mask)
    line = (
        f"{tmp_path / 'src'}: 1 subject has scans in more than one split: subject 1 (train, valid); a model "
        "is then scored on a subject it trained on (one split folder per subject avoids it)"
    )
    assert line in discover(tmp_path / "src").notes
    result = run_cli("preprocess", tmp_path / "src", tmp_path / "store", "--workers", "1", "-q")
    assert result.returncode == 0 and "subject 1 (train, valid)" in result.stderr, result.stderr


def test_scancache_scans_filters_as_the_catalog_does(small_store, catalog):
    from h5_sources import run_cli

    root, truth = small_store

    def listed(*args):
        result = run_cli("scans", root, "--json", *args)
        assert result.returncode == 0, result.stderr
        return [row["scan_id"] for row in __import__("json").loads(result.stdout)["scans"]]

    assert listed() == sorted(truth)
    assert listed("--split", "valid", "--split", "test") == _ids(catalog("vt", split=["valid", "test"]))
    assert listed("--subject-id", "1", "--time-point", "1") == ["0000001_V01-Aug00"]
    assert listed("--augmentation", "1") == ["0000003_V00-Aug01"]
    assert listed("--has-class", "3") == _ids(catalog("c3", has_class=3))
    table = run_cli("scans", root, "--split", "train")
    header = table.stdout.splitlines()[0].split()
    assert header[:5] == ["SCAN", "SPLIT", "SUBJECT", "VISIT", "AUG"], table.stdout
    assert table.stdout.splitlines()[1].split()[:5] == ["0000001_V00-Aug00", "train", "1", "0", "0"]
    bad = run_cli("scans", root, "--subject-id", "1_0")
    assert bad.returncode == 2 and "--subject-id" in bad.stderr and "'1_0' is not an integer" in bad.stderr


def test_a_sharded_test_loader_says_it_skips_the_left_over_examples(catalog):
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3))
    name = catalog("sharded_test", split="train")  # 12 + 9 slices: 21 examples
    with pytest.warns(
        UserWarning,
        match=r"sharded over 2 ranks skips the 1 example\(s\) left over by their equal shares of 21",
    ):
        build_loader(cfg, name, 4, True, False, False, num_replicas=2, rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_loader(cfg, name, 4, True, False, False, num_replicas=2, rank=1)  # said once, by rank 0
        build_loader(cfg, name, 4, True, False, False, num_replicas=3, rank=0)  # 21 = 3 x 7: none left
    assert not [w for w in caught if "left over" in str(w.message)]


def test_ids_as_the_file_names_write_them_and_absent_attributes(catalog, small_store):
    from store.scan_filters import matches, why_nothing_matches
    from store.source import LocalSource

    # "0000001" is subject 1, as the server reads ?subject_id=0000001
    assert _ids(catalog("padded", subject_id=["0000001"])) == ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    metas = LocalSource(small_store[0]).list_scans()
    no_split = metas[0].__class__.from_attrs({**metas[0].attrs, "split": None})
    assert not matches(no_split, {"split": "None"})  # the text "None" is no absent split
    assert why_nothing_matches(metas, {"has_class": 7}) == "has_class=7: the scans have 4 classes (0 to 3)"

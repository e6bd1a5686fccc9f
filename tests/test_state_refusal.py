"""Issue 21 item 5: a refused ``load_state_dict`` changes nothing, and a state names its data set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loaders import Config, DatasetCatalog, LoaderCheckpoint, build_loader
from store.writer import write_scan

SHAPE = (12, 10, 6)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """Two data sets of two scans each, same shapes: the same number of batches."""
    root = tmp_path_factory.mktemp("refusal") / "store"
    rng = np.random.default_rng(5)
    for i, split in enumerate(("train", "train", "valid", "valid")):
        image = rng.normal(0, 1, size=SHAPE).astype(np.float32)
        labels = rng.integers(-1, 2, size=SHAPE)
        mask = np.stack([labels == k for k in range(2)], -1).astype(np.uint8)
        write_scan(root, f"{i:07d}_V00-Aug00", image, mask, {"split": split, "subject_id": i})
    for split in ("train", "valid"):
        DatasetCatalog.remove(f"refusal_{split}")
        DatasetCatalog.register(f"refusal_{split}", str(root), split=split)
    yield {"train": "refusal_train", "valid": "refusal_valid", "root": root}
    for split in ("train", "valid"):
        DatasetCatalog.remove(f"refusal_{split}")


def loader_for(name, batch_size=4, **cfg):
    config = Config(**{"SEED": None, "CATEGORIES": (0, 1), "IMG_SIZE": (12, 10, 1), **cfg})
    return build_loader(config, name, batch_size, is_test=False, shuffle=True, drop_last=True)


def where(loader):
    """Everything a state would change, and the batches still to come."""
    return (loader.seed, loader.epoch, loader.state_dict()["position"], loader.remaining_batches())


def rest(loader):
    """Copies of the batches still to come (the loader's own arrays are reused)."""
    return [
        tuple(np.array(a) for a in batch)
        for _, batch in loader.batches_of(loader.epoch, loader.remaining_batches())
    ]


def advanced(name, **kw):
    """A loader in epoch 1, two batches in."""
    loader = loader_for(name, **kw)
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    return loader


def test_a_state_of_another_data_set_with_as_many_batches_is_refused_and_changes_nothing(names):
    train, valid = advanced(names["train"]), advanced(names["valid"])
    assert len(train) == len(valid) == 3 and train.seed != valid.seed
    before = where(valid)
    expected = rest(valid)
    with pytest.raises(ValueError, match="another data set") as err:
        valid.load_state_dict(train.state_dict())
    assert "\n" not in str(err.value)
    assert where(valid) == before, "seed, epoch and position are unchanged"
    for got, want in zip(rest(valid), expected, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda s: {**s, "num_batches": 5}, ("5 batches", "this loader 3")),
        (lambda s: {**s, "position": 99}, ("position 99",)),
        (lambda s: {**s, "epoch": -1}, ("epoch -1",)),
        (lambda s: {**s, "seed": -3}, ("seed -3",)),
        (lambda s: {**s, "workers": 0}, ("workers 0",)),
        (lambda s: {**s, "loader": "PatchDataLoader"}, ("loader='PatchDataLoader'",)),
        (lambda s: {**s, "num_replicas": 2}, ("num_replicas=2",)),
        (lambda s: {**s, "settings": {**s["settings"], "SHUFFLE_BLOCKS": 4}}, ("SHUFFLE_BLOCKS=4",)),
        (lambda s: {**s, "dataset": "0" * 32}, ("another data set",)),
        (lambda s: {**s, "settings": "x"}, ("garbles", "settings")),
        (lambda s: {k: v for k, v in s.items() if k != "seed"}, ("lacks", "seed")),
    ],
)
def test_every_refusal_leaves_the_loader_as_it_was(names, change, words):
    source = loader_for(names["train"])
    source.set_epoch(3)
    target = advanced(names["train"])
    before = where(target)
    with pytest.raises(ValueError) as err:
        target.load_state_dict(json.loads(json.dumps(change(source.state_dict()))))
    for word in words:
        assert word in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert where(target) == before


def test_other_batch_settings_with_as_many_batches_are_refused(names):
    five = loader_for(names["train"], batch_size=5)  # 12 slices: 2 batches of 5, 2 of 6
    six = loader_for(names["train"], batch_size=6)
    assert len(five) == len(six) == 2
    before = where(six)
    with pytest.raises(ValueError, match="batch_size=5, this loader has 6"):
        six.load_state_dict(five.state_dict())
    assert where(six) == before
    patches = loader_for(
        names["train"], TAG="RandomPatchDataLoader", IMG_SIZE=(6, 6, 3, 1), PATCHES_PER_SCAN=4
    )
    fewer_fg = loader_for(
        names["train"],
        TAG="RandomPatchDataLoader",
        IMG_SIZE=(6, 6, 3, 1),
        PATCHES_PER_SCAN=4,
        FOREGROUND_RATIO=0.9,
    )
    with pytest.raises(ValueError, match=r"FOREGROUND_RATIO=0\.33, this loader has 0\.9"):
        fewer_fg.load_state_dict(patches.state_dict())


def test_the_same_data_set_loads_also_over_another_path_and_old_states_still_load(names, tmp_path):
    train = advanced(names["train"])
    state = train.state_dict()
    assert state["scans"] == 2 and len(state["dataset"]) == 32
    assert state["settings"] == {"batch_size": 4, "shuffle": True, "drop_last": True, "SHUFFLE_BLOCKS": 16}
    # a settings-neutral change (Y_DTYPE) and the same scans resume
    again = loader_for(names["train"], Y_DTYPE="uint8")
    again.load_state_dict(state)
    assert where(again)[:3] == where(train)[:3] and again.remaining_batches() == train.remaining_batches()
    # a state written before the fingerprint and the settings
    old = {k: v for k, v in state.items() if k not in ("dataset", "scans", "settings")}
    fresh = loader_for(names["train"])
    fresh.load_state_dict(old)
    assert where(fresh) == where(train)


def test_checkpoint_of_another_data_set_is_refused_naming_the_file_and_kept(names, tmp_path):
    train = loader_for(names["train"])
    train.set_epoch(2)
    LoaderCheckpoint(train, tmp_path).on_train_begin()
    saved = (tmp_path / "scancache_loader_state.json").read_text()
    valid = loader_for(names["valid"])
    before = where(valid)
    with pytest.raises(
        ValueError, match=r"scancache_loader_state\.json: load_state_dict: the state is of another"
    ):
        LoaderCheckpoint(valid, tmp_path).on_train_begin()
    assert where(valid) == before and (tmp_path / "scancache_loader_state.json").read_text() == saved


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_deep_copy_or_an_unpickled_loader_goes_on_from_the_same_place_on_its_own(names, how):
    """A loader holds threads and open sources; its deep copy (and what pickle gives back) is
    rebuilt from its recipe: same seed (SEED None: a random one), epoch and position, the same
    batches still to come, its own read-ahead and epoch."""
    import copy
    import pickle

    loader = advanced(names["train"])
    twin = copy.deepcopy(loader) if how == "deepcopy" else pickle.loads(pickle.dumps(loader))
    assert where(twin) == where(loader)
    assert twin._prefetcher is not loader._prefetcher  # (sources of one store are shared in a process)
    expected, got = rest(loader), rest(twin)
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    twin.set_epoch(2)  # its own epoch: the original is where it was
    assert twin.epoch == 2 and loader.epoch == 1
    shallow = copy.copy(loader)  # load_state_dict's trial copy: shares sources and read-ahead
    assert shallow._prefetcher is loader._prefetcher


def test_a_loader_over_a_source_object_says_why_it_cannot_be_pickled(names):
    import pickle

    from loaders import open_source

    source = open_source(str(names["root"]))
    dicts = [dict(d, source=source) for d in DatasetCatalog.get(names["train"])]
    config = Config(SEED=1, CATEGORIES=(0, 1), IMG_SIZE=(12, 10, 1))
    from loaders.base import build_data_loader

    loader = build_data_loader(config, dicts, batch_size=2)
    with pytest.raises(TypeError, match="pickle of a loader: scan '0000000_V00-Aug00' has a source object"):
        pickle.dumps(loader)

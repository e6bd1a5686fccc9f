"""Loader batches equal numpy references built from the store with zarr-python, exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

from loaders import (
    Config,
    DatasetCatalog,
    DefaultDataLoader,
    PatchDataLoader,
    RandomPatchDataLoader,
    S25dDataLoader,
    build_loader,
)
from loaders.build import get_dataset_dicts
from loaders.catalog import scan_dict
from loaders.geometry import PatchGrid
from loaders.sampling import LocationCache

TRAIN = ("0000001_V00-Aug00", "0000001_V01-Aug00")
CATEGORIES = (0, (1, 2), 3)


@pytest.fixture(scope="module")
def store(small_store):
    """(root, {scan_id: (image, mask)}) with arrays read by zarr-python, not by our code."""
    root, _ = small_store
    group = zarr.open_group(str(root), mode="r")
    arrays = {}
    for scan_id in (*TRAIN, "0000002_V00-Aug00"):
        arrays[scan_id] = (group[scan_id]["image"][...], group[scan_id]["mask"][...])
    return root, arrays


@pytest.fixture(scope="module")
def train_name(store):
    root, _ = store
    DatasetCatalog.remove("loaders_train")
    DatasetCatalog.register("loaders_train", str(root), split="train")
    yield "loaders_train"
    DatasetCatalog.remove("loaders_train")


def reference_mask(mask, categories=CATEGORIES, background=True):
    channels = [mask[..., list(g)].sum(-1) if isinstance(g, tuple) else mask[..., g] for g in categories]
    out = np.stack(channels, -1).astype(np.float32)
    if background:
        out = np.concatenate([(out.sum(-1, keepdims=True) == 0).astype(np.float32), out], -1)
    return out


def padded_cut(volume, window, mode):
    """``np.pad`` the whole volume enough, then cut the window: the reference for padding."""
    pads = [(max(0, -a), max(0, b - n)) for (a, b), n in zip(window, volume.shape[:3], strict=True)]
    pads += [(0, 0)] * (volume.ndim - 3)
    padded = np.pad(volume, pads, mode=mode)
    return padded[tuple(slice(a + p[0], b + p[0]) for (a, b), p in zip(window, pads, strict=False))]


def cfg_for(**kw):
    base = dict(SEED=7, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True)
    base.update(kw)
    return Config(**base)


def test_config_has_medsegpy_defaults():
    cfg = Config()
    assert cfg.TAG == "DefaultDataLoader"
    assert (cfg.TRAIN_DATASET, cfg.VAL_DATASET, cfg.TEST_DATASET) == ("", "", "")
    assert cfg.IMG_SIZE == (288, 288, 1) and cfg.IMG_PAD_MODE == "edge"
    assert cfg.IMG_PAD_SIZE == () and cfg.IMG_STRIDE == ()
    assert cfg.CATEGORIES == [] and cfg.INCLUDE_BACKGROUND is False
    assert cfg.SEED is None and cfg.NUM_WORKERS == 1
    cfg.CATEGORIES = (0, (1, 2), 3)
    cfg.INCLUDE_BACKGROUND = True
    assert cfg.get_num_classes() == 4
    with pytest.raises(AttributeError, match="IMG_SIZ"):
        Config(IMG_SIZ=(1, 2, 3))


def test_default_loader_batches_in_order(store, train_name):
    _, arrays = store
    loader = build_loader(cfg_for(), train_name, batch_size=5, is_test=False, shuffle=False, drop_last=False)
    assert isinstance(loader, DefaultDataLoader)
    slices = [(s, z) for s in TRAIN for z in range(arrays[s][0].shape[2])]
    assert len(loader) == math.ceil(len(slices) / 5)
    for b in range(len(loader)):
        x, y = loader[b]
        chunk = slices[b * 5 : (b + 1) * 5]
        x_ref = np.stack([arrays[s][0][:, :, z, None] for s, z in chunk]).astype(np.float32)
        y_ref = np.stack([reference_mask(arrays[s][1][:, :, z]) for s, z in chunk])
        assert x.dtype == np.float32 and y.dtype == np.float32
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)


def test_a_built_loader_keeps_the_config_it_was_built_with(store, train_name):
    """A notebook edits its Config to build the next loader: the loaders built before keep
    their y channels, epoch plan and saved state exactly as built."""
    cfg = cfg_for(SEED=3)
    loader = build_loader(cfg, train_name, batch_size=5, is_test=False, shuffle=True, drop_last=False)
    twin = build_loader(
        cfg_for(SEED=3), train_name, batch_size=5, is_test=False, shuffle=True, drop_last=False
    )
    state = loader.state_dict()
    cfg.INCLUDE_BACKGROUND, cfg.CATEGORIES, cfg.SHUFFLE_BLOCKS, cfg.SEED = False, (0,), 2, 99
    assert loader.num_classes() == twin.num_classes()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        twin.set_epoch(epoch)
        for b in range(len(loader)):
            for got, want in zip(loader[b], twin[b], strict=True):
                np.testing.assert_array_equal(got, want)
    assert loader.state_dict()["settings"] == state["settings"]
    assert (
        repr(twin) == f"<DefaultDataLoader: {len(TRAIN)} scans, {len(twin)} batches of 5, epoch 1, batch 0>"
    )


def test_a_config_holding_a_module_or_a_lock_builds_and_keeps_its_own_lists(train_name):
    """A Config subclass may hold what cannot be copied (a module, a lock, a model): the loader
    shares those, and copies only lists, dicts and sets, which a later edit could change."""
    import threading

    class WithExtras(Config):
        AUGMENT: object = None
        GUARD: object = None
        NOTES: list = []

    cfg = WithExtras(SEED=7, CATEGORIES=[0, 1], INCLUDE_BACKGROUND=True)
    cfg.AUGMENT, cfg.GUARD, cfg.NOTES = np, threading.Lock(), ["a"]
    loader = build_loader(cfg, train_name, batch_size=5, is_test=False, shuffle=False, drop_last=False)
    assert loader.cfg.AUGMENT is np and loader.cfg.GUARD is cfg.GUARD
    cfg.NOTES.append("b")
    cfg.CATEGORIES.append(2)
    assert loader.cfg.NOTES == ["a"] and list(loader.cfg.CATEGORIES) == [0, 1]


def test_len_follows_drop_last_and_is_test(train_name):
    n = 12 + 9
    cfg = cfg_for()
    assert (
        len(build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=True, drop_last=True))
        == n // 4
    )
    assert len(build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=True, drop_last=False)) == 6
    assert len(build_loader(cfg, train_name, batch_size=4, is_test=True, shuffle=False, drop_last=True)) == 6


def test_shuffle_every_epoch_is_deterministic_from_seed(store, train_name):
    _, arrays = store

    def epochs(seed, count=3):
        loader = build_loader(
            cfg_for(SEED=seed), train_name, batch_size=4, is_test=False, shuffle=True, drop_last=True
        )
        out = []
        for _ in range(count):
            out.append(
                [(e.scan, e.window[2][0]) for b in range(len(loader)) for e in loader.batch_elements(b)]
            )
            loader.on_epoch_end()
        return loader, out

    loader, first = epochs(3)
    _, again = epochs(3)
    _, other = epochs(4)
    assert first == again and first != other
    assert first[0] != first[1] != first[2], "a new order every epoch"
    for order in first:  # drop_last: 21 slices, 5 batches of 4 -> 20 distinct slices
        assert len(order) == 20 and len(set(order)) == 20
    # a shuffled batch still holds exactly the reference slices
    x, y = loader[2]
    elements = loader.batch_elements(2)
    for i, e in enumerate(elements):
        scan_id, z = loader.scans[e.scan].scan_id, e.window[2][0]
        np.testing.assert_array_equal(x[i, ..., 0], arrays[scan_id][0][:, :, z])
        np.testing.assert_array_equal(y[i], reference_mask(arrays[scan_id][1][:, :, z]))


def test_keras_own_reading_options_are_refused_in_one_line_pointing_at_the_loaders(train_name):
    """Keras' PyDataset workers/use_multiprocessing would fetch the loader's batches out of
    its order (repeats, skips, a state that never moves): refused where they come in, in one
    line naming NUM_WORKERS and PREFETCH_BATCHES; the harmless values still work."""
    cfg = cfg_for()
    for name, value in (("workers", 2), ("use_multiprocessing", True), ("max_queue_size", 20)):
        with pytest.raises(ValueError) as err:
            build_loader(cfg, train_name, 4, False, True, True, **{name: value})
        text = str(err.value)
        assert "\n" not in text and f"build_loader({name}=" in text
        assert "cfg.NUM_WORKERS" in text and "cfg.PREFETCH_BATCHES" in text
    loader = build_loader(cfg, train_name, 4, False, True, True)
    for name, value in (("workers", 2), ("workers", 1.5), ("use_multiprocessing", True)):
        with pytest.raises(ValueError, match=f"^{name}=.*cfg.NUM_WORKERS"):
            setattr(loader, name, value)
    loader.workers, loader.use_multiprocessing, loader.max_queue_size = 1, False, 20
    assert (loader.workers, loader.use_multiprocessing) == (1, False)
    x, _ = loader[0]
    assert x.shape[0] == 4


def test_test_batches_return_raw_x(store, train_name):
    loader = build_loader(cfg_for(), train_name, batch_size=8, is_test=True, shuffle=False, drop_last=False)
    batch = loader[len(loader) - 1]
    assert len(batch) == 3 and batch[0].shape[0] == 21 - 16
    np.testing.assert_array_equal(batch[2], batch[0])


def test_prefetches_the_next_batches_in_background(train_name):
    loader = build_loader(
        cfg_for(PREFETCH_BATCHES=2), train_name, batch_size=2, is_test=False, shuffle=True, drop_last=True
    )
    first = loader[0]
    assert loader._prefetcher.pending() == {(0, 1), (0, 2)}
    ahead = loader._prefetcher._futures[(0, 1)].result()
    direct = loader._load_key((0, 1))
    for a, b in zip(ahead, direct, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loader[1][0], direct[0])
    loader.on_epoch_end()
    loader[0]  # the old epoch's read-ahead is dropped, the new one's starts
    assert loader._prefetcher.pending() == {(1, 1), (1, 2)}
    assert first[0].shape == (2, 40, 36, 1)
    loader.close()


def test_a_failed_read_cancels_the_reads_queued_ahead():
    """A server gone for good: the caller gets the error once, and the batches queued ahead are
    not read afterwards, each after its own retries (which also held the process's exit)."""
    import time

    from loaders.prefetch import Prefetcher

    started: list[int] = []

    def load(key: int) -> int:
        started.append(key)
        if key == 0:
            raise OSError("no good answer from the server")
        time.sleep(0.5)  # a read ahead that is already running goes on
        return key

    prefetcher = Prefetcher(load, workers=1, depth=4)
    with pytest.raises(OSError, match="no good answer"):
        prefetcher.get(0, [1, 2, 3, 4])
    assert prefetcher.pending() == set()
    time.sleep(1.5)
    assert len(started) <= 2 and set(started) <= {0, 1}, started
    prefetcher.close()


@pytest.mark.parametrize("mode", ["edge", "reflect", "constant", "symmetric"])
def test_s25d_neighbouring_slices_with_padding(store, train_name, mode):
    _, arrays = store
    cfg = cfg_for(TAG="S25dDataLoader", IMG_SIZE=(40, 36, 5), IMG_PAD_MODE=mode)
    loader = build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=False, drop_last=False)
    assert isinstance(loader, S25dDataLoader)
    image, mask = arrays[TRAIN[0]]
    padded = np.pad(image, ((0, 0), (0, 0), (2, 2)), mode=mode)
    x, y = loader[0]  # slices 0..3 of the first scan: the left edge is padded
    for i in range(4):
        np.testing.assert_array_equal(x[i], padded[:, :, i : i + 5].astype(np.float32))
        np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, i]))
    x, _ = loader[2]  # slices 8..11: the right edge
    for i, z in enumerate(range(8, 12)):
        np.testing.assert_array_equal(x[i], padded[:, :, z : z + 5].astype(np.float32))
    with pytest.raises(ValueError, match="odd"):
        build_loader(cfg_for(TAG="S25dDataLoader", IMG_SIZE=(40, 36, 4)), train_name, 4, False, False, False)


@pytest.mark.parametrize(("mode", "pad"), [("edge", ()), ("reflect", 3), ("constant", (2, 0, 1))])
def test_patch_grid_batches(store, train_name, mode, pad):
    _, arrays = store
    cfg = cfg_for(
        TAG="PatchDataLoader",
        IMG_SIZE=(16, 15, 5, 1),
        IMG_STRIDE=(12, 10, 4),
        IMG_PAD_SIZE=pad,
        IMG_PAD_MODE=mode,
    )
    loader = build_loader(cfg, train_name, batch_size=6, is_test=True, shuffle=False, drop_last=False)
    assert isinstance(loader, PatchDataLoader)
    pads = (pad,) * 3 if isinstance(pad, int) else (pad or (0, 0, 0))
    windows = [
        (s, w)
        for s in TRAIN
        for w in PatchGrid.build(arrays[s][0].shape, (16, 15, 5), (12, 10, 4), pads).windows()
    ]
    assert len(loader) == math.ceil(len(windows) / 6)
    seen = 0
    for b in range(len(loader)):
        x, y, _x_raw = loader[b]
        assert x.shape[1:] == (16, 15, 5, 1) and y.shape[1:] == (16, 15, 5, 4)
        for i in range(x.shape[0]):
            scan_id, window = windows[seen]
            image, mask = arrays[scan_id]
            np.testing.assert_array_equal(x[i, ..., 0], padded_cut(image, window, mode).astype(np.float32))
            np.testing.assert_array_equal(y[i], padded_cut(reference_mask(mask), window, mode))
            seen += 1
    assert seen == len(windows)


def test_random_patches_deterministic_and_oversample_foreground(store, train_name):
    _, arrays = store
    cfg = cfg_for(
        TAG="RandomPatchDataLoader",
        IMG_SIZE=(9, 9, 3, 1),
        IMG_PAD_SIZE=2,
        IMG_PAD_MODE="reflect",
        CATEGORIES=(3,),
        INCLUDE_BACKGROUND=False,
        PATCHES_PER_SCAN=10,
        FOREGROUND_RATIO=0.5,
    )

    def draw(seed):
        cfg.SEED = seed
        loader = build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=True, drop_last=True)
        assert isinstance(loader, RandomPatchDataLoader)
        return loader, [loader.batch_elements(b) for b in range(len(loader))]

    loader, elements = draw(11)
    _, same = draw(11)
    _, other = draw(12)
    assert elements == same and elements != other
    assert len(loader) == 20 // 4
    samples = [s for b in range(len(loader)) for s in loader._plan[1][b * 4 : (b + 1) * 4]]
    assert sum(s.foreground for s in loader._plan[1]) == 10
    centred = 0
    for b in range(len(loader)):
        x, y = loader[b]
        for i, e in enumerate(loader.batch_elements(b)):
            image, mask = arrays[loader.scans[e.scan].scan_id]
            np.testing.assert_array_equal(
                x[i, ..., 0], padded_cut(image, e.window, "reflect").astype(np.float32)
            )
            np.testing.assert_array_equal(
                y[i], padded_cut(reference_mask(mask, (3,), False), e.window, "reflect")
            )
            centred += int(y[i][4, 4, 1, 0] == 1)
    assert len(samples) == 20
    # every foreground sample is centred on class 3 (away from the volume's edges, at least)
    assert centred >= 8
    first_epoch = loader.batch_elements(0)
    loader.on_epoch_end()
    assert loader.batch_elements(0) != first_epoch


def test_one_store_under_several_spellings_shares_one_source(store, tmp_path, monkeypatch):
    """``store``, ``./store/``, an absolute path and a link to it are one store: one source, one
    chunk cache (each would hold its own share of memory)."""
    import os

    from conftest import build_store

    from loaders.catalog import shared_source

    root, _ = store
    link = tmp_path / "link-to-store"
    os.symlink(root, link)
    monkeypatch.chdir(root.parent)
    spellings = [str(root), f"{root}/", root.name, f"./{root.name}/", str(link), root]
    opened = {id(shared_source(s)) for s in spellings}
    assert len(opened) == 1
    # a store first opened through a link, the link then re-pointed at another store: each
    # store's source reads that store
    first, second = tmp_path / "first", tmp_path / "second"
    build_store(first, scans=[("0000008_V00-Aug00", (8, 8, 3), 2, "train", 8, 0, 0, np.float32)])
    build_store(second, scans=[("0000009_V00-Aug00", (8, 8, 3), 2, "train", 9, 0, 0, np.float32)])
    current = tmp_path / "current"
    os.symlink(first, current)
    assert [m.scan_id for m in shared_source(str(current)).list_scans()] == ["0000008_V00-Aug00"]
    current.unlink()
    os.symlink(second, current)
    assert [m.scan_id for m in shared_source(str(current)).list_scans()] == ["0000009_V00-Aug00"]
    assert [m.scan_id for m in shared_source(str(first)).list_scans()] == ["0000008_V00-Aug00"]


def test_catalog_accepts_medsegpy_style_callables(store):
    root, arrays = store
    from loaders.catalog import shared_source

    metas = {m.scan_id: m for m in shared_source(str(root)).list_scans()}

    def per_slice_dicts():  # MedSegPy's 2D format: one dict per slice, slice_id 1-indexed
        return [
            {**scan_dict(str(root), metas[s]), "slice_id": z, "scan_spacing": (0.5, 0.5, 2.0)}
            for s in TRAIN
            for z in (2, 3, 7)
        ]

    DatasetCatalog.remove("callable_ds")
    DatasetCatalog.register("callable_ds", per_slice_dicts)
    with pytest.raises(ValueError) as again:  # a notebook cell run twice: what to do is said
        DatasetCatalog.register("callable_ds", per_slice_dicts)
    assert str(again.value) == (
        "dataset 'callable_ds' is already registered "
        "(DatasetCatalog.remove('callable_ds') first to register it again)"
    )
    with pytest.raises(KeyError, match="callable_ds"):
        DatasetCatalog.get("no_such_dataset")
    loader = build_loader(
        cfg_for(), "callable_ds", batch_size=3, is_test=True, shuffle=False, drop_last=False
    )
    assert len(loader) == 2
    x, _y, _ = loader[1]
    for i, z in enumerate((1, 2, 6)):
        np.testing.assert_array_equal(x[i, ..., 0], arrays[TRAIN[1]][0][:, :, z])
    DatasetCatalog.remove("callable_ds")


def test_a_filter_that_selects_nothing_says_which_and_what_there_is(small_store):
    root, truth = small_store
    group = zarr.open_group(str(root), mode="r")
    splits = sorted({str(group[scan_id].attrs["split"]) for scan_id in truth})
    cases = {
        "typo_split": (
            {"split": "val"},
            f"split='val' matches no scan (its scans have split {', '.join(splits)})",
        ),
        "typo_key": ({"spilt": "train"}, "no scan has an attribute 'spilt' (did you mean 'split'?)"),
        "class_name": (
            {"has_class": "femur"},
            "has_class='femur': no scan has a class named 'femur' (classes: class 0, class 1, class 2, class 3)",
        ),
    }
    for name, (filters, why) in cases.items():
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, root, **filters)
        with pytest.raises(ValueError) as info:
            build_loader(cfg_for(), name, batch_size=1, is_test=True, shuffle=False, drop_last=False)
        assert str(info.value) == f"dataset {name!r}: {why}"
        DatasetCatalog.remove(name)


def test_a_has_class_that_is_no_class_is_refused_where_it_is_registered(small_store):
    root, _ = small_store
    with pytest.raises(
        ValueError, match=r"dataset 'bad_class': has_class: expected a class index .* got 1\.5"
    ):
        DatasetCatalog.register("bad_class", root, has_class=1.5)
    assert "bad_class" not in DatasetCatalog.list()


def test_build_loader_drops_image_only_scans_for_training_and_checks_tag(small_store):
    root, _ = small_store
    DatasetCatalog.remove("all_scans")
    DatasetCatalog.register("all_scans", root)
    loader = build_loader(cfg_for(), "all_scans", batch_size=1, is_test=False, shuffle=False, drop_last=False)
    assert [s.scan_id for s in loader.scans] == [
        "0000001_V00-Aug00",
        "0000001_V01-Aug00",
        "0000002_V00-Aug00",
    ]
    # a test loader keeps the image-only scan for inference (tests/test_unlabelled_inference.py)
    tested = build_loader(cfg_for(), "all_scans", batch_size=4, is_test=True, shuffle=False, drop_last=False)
    assert [s.scan_id for s in tested.scans][-1] == "0000003_V00-Aug01"
    # a training batch of 40x36 and 33x27 slices is refused where the loader is built
    with pytest.raises(ValueError) as info:
        build_loader(cfg_for(), "all_scans", batch_size=4, is_test=False, shuffle=False, drop_last=False)
    assert str(info.value) == (
        "DefaultDataLoader: slices differ in shape (40x36 in 0000001_V00-Aug00, 33x27 in 0000002_V00-Aug00) "
        "and a batch stacks whole slices: use batch_size=1, a patch loader (TAG='PatchDataLoader' or "
        "'RandomPatchDataLoader'), or resample the scans to one grid"
    )

    # a subclass that crops every slice to one shape makes its batches' shapes itself: built
    class Cropped(DefaultDataLoader):
        def model_input(self, image, element):
            return super().model_input(image, element)[:24, :24]

        def model_target(self, mask, element):
            return mask[:24, :24, 0]

    cropped = Cropped(cfg_for(), get_dataset_dicts("all_scans"), False, False, False, 4)
    x, y = cropped[5]
    assert x.shape == (4, 24, 24, 1) and y.shape[:3] == (4, 24, 24)
    with pytest.raises(ValueError, match=r"mixes input shapes .*: use batch_size=1 or a patch loader"):
        tested[5]  # a test loader (inference goes scan by scan) refuses only such a batch
    with pytest.raises(KeyError, match="NoSuchLoader"):
        build_loader(cfg_for(TAG="NoSuchLoader"), "all_scans", 4, False, True, True)
    DatasetCatalog.remove("all_scans")


def _backend_in_subprocess(tmp_path, code, keras_json=None, **env_overrides):
    import json
    import os
    import subprocess
    import sys

    home = tmp_path / "keras_home"
    home.mkdir(exist_ok=True)
    if keras_json is not None:
        (home / "keras.json").write_text(json.dumps(keras_json))
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(KERAS_HOME=str(home), **env_overrides)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


def test_tensorflow_is_the_default_backend_and_a_chosen_one_is_kept(tmp_path):
    code = (
        "import loaders.base, keras, os; print(keras.backend.backend(), os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    out = _backend_in_subprocess(tmp_path, code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tensorflow", "2"]
    assert "cpu_feature_guard" not in out.stderr  # TF's C++ start-up logging is quiet
    # a backend chosen in keras.json is never overridden ($KERAS_BACKEND: the next test)
    out = _backend_in_subprocess(
        tmp_path, "import loaders.base, keras; print(keras.backend.backend())", {"backend": "torch"}
    )
    assert out.returncode == 0 and out.stdout.split() == ["torch"], out.stderr[-2000:]


def test_a_chosen_backend_that_is_missing_is_one_line_naming_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("jax") is not None:
        pytest.skip("jax is installed here")
    out = _backend_in_subprocess(tmp_path, "from loaders import build_loader", KERAS_BACKEND="jax")
    assert out.returncode != 0
    assert "Keras backend 'jax' is selected (KERAS_BACKEND) but not installed" in out.stderr
    assert "scancache[jax]" in out.stderr.strip().splitlines()[-1]


def test_out_of_order_access_still_correct_and_stops_reading_ahead(store, train_name):
    _, arrays = store
    loader = build_loader(cfg_for(), train_name, batch_size=2, is_test=False, shuffle=False, drop_last=True)
    for b in (7, 2, 9, 4, 0, 3):
        x, _ = loader[b]
        for i, z in enumerate((2 * b, 2 * b + 1)):
            scan, z = (TRAIN[0], z) if z < 12 else (TRAIN[1], z - 12)
            np.testing.assert_array_equal(x[i, ..., 0], arrays[scan][0][:, :, z])
    # A shuffled order is not followed: nothing is read ahead until the epoch ends.
    assert loader._prefetcher.pending() == set()
    loader.on_epoch_end()
    loader[0]
    assert loader._prefetcher.pending(), "reading ahead resumes with a sequential request"
    loader.close()


def test_cached_foreground_locations_change_no_draw(store, train_name):
    cfg = cfg_for(
        TAG="RandomPatchDataLoader",
        IMG_SIZE=(9, 9, 3, 1),
        CATEGORIES=(1, 3),
        PATCHES_PER_SCAN=12,
        FOREGROUND_RATIO=1.0,
        SEED=5,
    )
    warm = build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=True, drop_last=True)
    first = [warm.batch_elements(b) for b in range(len(warm))]
    # located from mask slices and kept, unless the store has per-class locations (format 2)
    stored = all(warm._stored_locations(i) is not None for i in range(len(warm.scans)))
    assert stored or len(warm._locations) > 0, "foreground draws were located and kept"
    again = [warm.batch_elements(b) for b in range(len(warm))]  # every draw now from the cache
    cold = build_loader(cfg, train_name, batch_size=4, is_test=False, shuffle=True, drop_last=True)
    assert again == first == [cold.batch_elements(b) for b in range(len(cold))]


@given(
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40)), min_size=1, max_size=60), st.integers(0, 400)
)
def test_location_cache_is_an_lru_capped_in_bytes(puts, cap):
    cache = LocationCache(cap)
    model: dict[int, int] = {}  # key -> size, in recency order
    for key, n in puts:
        value = (np.zeros(n, np.int16), np.zeros(n, np.int16))
        cache.put(key, value)
        size = 4 * n
        model.pop(key, None)  # a new value replaces the old one, even one too big to keep
        if size <= cap:
            model[key] = size
            while sum(model.values()) > cap:
                del model[next(iter(model))]
        assert cache.nbytes == sum(model.values()) <= cap
        assert len(cache) == len(model)
    for key in model:
        assert cache.get(key) is not None


def test_class_index_refuses_a_voxel_in_two_categories_naming_them():
    from loaders.class_index import class_indices

    y = np.zeros((2, 3, 3), np.float32)  # (h, w, C): categories 0, 1, 2
    y[0, 0, 0] = y[1, 2, 1] = 1
    np.testing.assert_array_equal(class_indices(y, background=False), [[1, 0, 0], [0, 0, 2]])
    y[1, 1, [0, 2]] = 1  # one voxel in categories 0 and 2
    with pytest.raises(ValueError) as err:
        class_indices(y, background=False)
    assert "categories 0 and 2 (CATEGORIES[0], CATEGORIES[2]) at once" in str(err.value)
    assert "Y_FORMAT='one_hot'" in str(err.value)


def test_a_medsegpy_training_field_or_a_typo_is_refused_with_where_to_go():
    """MedSegPy's data fields are Config's own; its training fields are refused in one line
    saying where their value goes, and a misspelt field names the one it may mean."""
    with pytest.raises(
        AttributeError, match=r"'TRAIN_BATCH_SIZE': it is a MedSegPy training setting.*batch_size="
    ):
        Config(TRAIN_BATCH_SIZE=16)
    with pytest.raises(
        AttributeError, match=r"Config has no field 'IMG_SIZES' \(did you mean 'IMG_SIZE'\?\)"
    ):
        Config().IMG_SIZES = (8, 8, 1)
    cfg = Config(
        TRAIN_DATASET="oai_train", TAG="PatchDataLoader", CATEGORIES=[0, (1, 2)], INCLUDE_BACKGROUND=True
    )
    assert (cfg.TRAIN_DATASET, cfg.TAG, cfg.INCLUDE_BACKGROUND) == ("oai_train", "PatchDataLoader", True)


def test_one_scan_id_in_two_stores_of_other_slice_shapes_names_both_stores(tmp_path):
    """A catalog callable mixing two stores that share a scan id: the refusal of mixed slice
    shapes names each store, or it would read 'in 0000001_V00-Aug00, ... in 0000001_V00-Aug00'."""
    from conftest import build_store

    from loaders.catalog import shared_source

    scan = "0000001_V00-Aug00"
    first, second = tmp_path / "first", tmp_path / "second"
    build_store(first, scans=[(scan, (16, 16, 3), 2, "train", 1, 0, 0, np.float32)])
    build_store(second, scans=[(scan, (12, 10, 3), 2, "train", 1, 0, 0, np.float32)])

    def both():
        return [scan_dict(str(root), shared_source(str(root)).metadata(scan)) for root in (first, second)]

    DatasetCatalog.remove("two_stores")
    DatasetCatalog.register("two_stores", both)
    try:
        with pytest.raises(ValueError) as info:
            build_loader(
                cfg_for(CATEGORIES=[0, 1]),
                "two_stores",
                batch_size=2,
                is_test=False,
                shuffle=False,
                drop_last=False,
            )
    finally:
        DatasetCatalog.remove("two_stores")
    message = str(info.value)
    assert f"(16x16 in {scan} of " in message and f", 12x10 in {scan} of " in message
    assert str(first) in message and str(second) in message and "\n" not in message

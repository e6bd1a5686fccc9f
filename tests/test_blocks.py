"""Chunk-deep blocks (loaders/blocks.py): the block order, exact batches, memory held, reuse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loaders import Config, DatasetCatalog, build_loader
from loaders.batch_memory import BatchArrays
from loaders.ordering import block_epoch_order
from store.label_map import has_label_map
from store.source import LocalSource
from store.writer import write_scan

CATEGORIES = (0, (1, 2), 3)


def reference_mask(mask):
    """CATEGORIES merged with background first, from the one-hot numpy truth."""
    channels = [mask[..., list(g)].sum(-1) if isinstance(g, tuple) else mask[..., g] for g in CATEGORIES]
    out = np.stack(channels, -1).astype(np.float32)
    return np.concatenate([(out.sum(-1, keepdims=True) == 0).astype(np.float32), out], -1)


def assert_epoch_equals_truth(loader, truth, k):
    """Every batch of the loader's epoch against the numpy truth: x the window of np.pad(edge)
    of the whole volume (k slices), y the centre slice's mask. Returns the examples checked."""
    seen = 0
    for b, (x, y) in enumerate(loader):
        for i, e in enumerate(loader.batch_elements(b)):
            image, mask = truth[loader.scans[e.scan].scan_id]
            z = e.output_window[2][0]
            padded = np.pad(image, ((0, 0), (0, 0), (k // 2, k // 2)), mode="edge")
            np.testing.assert_array_equal(x[i], padded[:, :, z : z + k])
            np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]))
            seen += 1
    return seen


@pytest.fixture(scope="module")
def train(small_store):
    root, truth = small_store
    DatasetCatalog.remove("blocks_train")
    DatasetCatalog.register("blocks_train", str(root), split="train")
    yield "blocks_train", truth
    DatasetCatalog.remove("blocks_train")


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    depth=st.integers(1, 8),
    window=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 5),
)
def test_block_order_is_a_deterministic_permutation_interleaving_blocks(sizes, depth, window, seed, epoch):
    scan_of = np.repeat(np.arange(len(sizes)), sizes)
    z = np.concatenate([np.arange(n) for n in sizes])
    block_of = scan_of * 1000 + z // depth
    order = block_epoch_order(seed, epoch, scan_of, block_of, True, window)
    assert sorted(order.tolist()) == list(range(len(scan_of)))
    assert np.array_equal(order, block_epoch_order(seed, epoch, scan_of, block_of, True, window))
    blocks = block_of[order]
    # a block's examples are served within one window: window x block size examples at most
    for b in np.unique(blocks):
        where = np.flatnonzero(blocks == b)
        assert where[-1] - where[0] < window * depth
    # blocks come whole windows at a time: at most `window` blocks are ever started and unfinished
    first = {b: np.flatnonzero(blocks == b)[0] for b in np.unique(blocks)}
    last = {b: np.flatnonzero(blocks == b)[-1] for b in np.unique(blocks)}
    live = max(sum(first[b] <= i <= last[b] for b in first) for i in range(len(blocks)))
    assert live <= window


def test_sixteen_scans_give_sixteen_scans_a_batch():
    scan_of = np.repeat(np.arange(16), 160)
    block_of = scan_of * 1000 + np.tile(np.arange(160) // 8, 16)
    for seed in range(3):
        order = block_epoch_order(seed, 0, scan_of, block_of, True, 16)
        batches = scan_of[order].reshape(-1, 16)
        assert min(len(set(b.tolist())) for b in batches) >= 8


@pytest.mark.parametrize(
    "tag,img_size", [("DefaultDataLoader", (40, 36, 1)), ("S25dDataLoader", (40, 36, 5))]
)
def test_every_shuffled_batch_equals_the_numpy_truth_and_blocks_are_released(train, tag, img_size):
    name, truth = train
    cfg = Config(SEED=3, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, TAG=tag, IMG_SIZE=img_size)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=False)
    buffer = loader._plan[3]
    assert buffer is not None, "the slice loaders read blocks by default"
    assert all(has_label_map(s.meta.attrs) for s in loader.scans), "y is written from label maps"
    assert assert_epoch_equals_truth(loader, truth, img_size[2]) == sum(len(s.slices) for s in loader.scans)
    assert 0 < buffer.peak_blocks <= 2 * cfg.SHUFFLE_BLOCKS + 2
    assert not buffer._slots, "every block leaves memory after its last example"
    loader.close()


def test_shuffle_blocks_zero_reads_examples_one_by_one_with_the_same_values(train):
    name, truth = train
    cfg = Config(SEED=3, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, SHUFFLE_BLOCKS=0)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=True)
    assert loader._plan[3] is None
    x, y = loader[1]
    for i, e in enumerate(loader.batch_elements(1)):
        image, mask = truth[loader.scans[e.scan].scan_id]
        z = e.window[2][0]
        np.testing.assert_array_equal(x[i, ..., 0], image[:, :, z])
        np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]))
    with pytest.raises(ValueError, match="SHUFFLE_BLOCKS"):
        build_loader(
            Config(SHUFFLE_BLOCKS=-1), name, batch_size=4, is_test=False, shuffle=True, drop_last=True
        )


@pytest.mark.parametrize("y_dtype", ["float32", "uint8"])
def test_overlapping_classes_without_a_label_map_give_the_same_exact_batches(tmp_path, y_dtype):
    # classes 1 and 2 overlap: the writer keeps no label map, so y is cut from merged masks;
    # the label-map scans of the other tests write y from labels. Both must equal the truth.
    rng = np.random.default_rng(7)
    image = rng.normal(size=(24, 20, 10)).astype(np.float32)
    mask = (rng.random((24, 20, 10, 4)) < 0.3).astype(np.uint8)
    write_scan(tmp_path / "store", "0000009_V00-Aug00", image, mask, {"split": "train"})
    source = LocalSource(tmp_path / "store")
    assert not has_label_map(source.metadata("0000009_V00-Aug00").attrs)
    DatasetCatalog.remove("overlap")
    DatasetCatalog.register("overlap", str(tmp_path / "store"))
    cfg = Config(SEED=1, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, Y_DTYPE=y_dtype)
    loader = build_loader(cfg, "overlap", batch_size=3, is_test=False, shuffle=True, drop_last=False)
    for b, (x, y) in enumerate(loader):
        assert y.dtype == np.dtype(y_dtype)
        for i, e in enumerate(loader.batch_elements(b)):
            z = e.window[2][0]
            np.testing.assert_array_equal(x[i, ..., 0], image[:, :, z])
            np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]).astype(y_dtype))
    loader.close()
    DatasetCatalog.remove("overlap")


@pytest.mark.parametrize(
    "tag,img_size", [("DefaultDataLoader", (24, 20, 1)), ("S25dDataLoader", (24, 20, 5))]
)
def test_blocks_of_a_sweep_larger_than_the_cache_skip_it_and_batches_stay_exact(
    tmp_path, monkeypatch, tag, img_size
):
    # three scans of 20 slices decode to ~60 KB: a 4 KB chunk cache holds a fraction of them
    rng = np.random.default_rng(11)
    truth = {}
    for n in range(3):
        scan_id = f"000000{n + 1}_V00-Aug00"
        image = rng.normal(size=(24, 20, 20)).astype(np.float32)
        labels = rng.integers(0, 5, size=(24, 20, 20))
        mask = (labels[..., None] == np.arange(1, 5)).astype(np.uint8)  # classes never overlap
        write_scan(tmp_path / "store", scan_id, image, mask, {"split": "train"})
        truth[scan_id] = image, mask
    monkeypatch.setenv("SCANCACHE_LOCAL_CACHE_BYTES", "4K")
    DatasetCatalog.remove("sweep")
    DatasetCatalog.register("sweep", str(tmp_path / "store"))
    cfg = Config(SEED=2, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, TAG=tag, IMG_SIZE=img_size)
    loader = build_loader(cfg, "sweep", batch_size=4, is_test=False, shuffle=True, drop_last=False)
    buffer = loader._plan[3]
    assert buffer is not None and loader.scans[0].source.cache_bytes == 4096
    if tag == "DefaultDataLoader":  # a 2D block is the only reader of its chunks: past the cache
        assert buffer._uncached == set(buffer._boxes)
    else:  # 2.5D windows reach into the neighbouring layer of chunks, which blocks share: cached
        assert not buffer._uncached
    assert assert_epoch_equals_truth(loader, truth, img_size[2]) == 60
    loader.close()
    DatasetCatalog.remove("sweep")


def test_blocks_of_data_the_cache_holds_stay_cached(train):
    name, _ = train
    cfg = Config(SEED=3, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=False)
    buffer = loader._plan[3]
    assert buffer is not None and buffer._boxes and not buffer._uncached  # later epochs read the cache
    loader.close()


def test_label_map_batches_in_uint8_equal_the_truth(train):
    name, truth = train
    cfg = Config(SEED=5, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, Y_DTYPE="uint8")
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=False)
    assert all(has_label_map(s.meta.attrs) for s in loader.scans)
    _x, y = loader[0]
    assert y.dtype == np.uint8
    for i, e in enumerate(loader.batch_elements(0)):
        mask = truth[loader.scans[e.scan].scan_id][1]
        np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, e.window[2][0]]).astype(np.uint8))
    loader.close()


def test_batch_arrays_are_reused_only_once_nobody_holds_them():
    pool = BatchArrays(keep=4)
    held = pool.empty((8, 8), np.dtype(np.float32))
    held[:] = 1
    other = pool.empty((8, 8), np.dtype(np.float32))
    assert other is not held and pool.reused == 0
    view = other[:2]
    del other
    again = pool.empty((8, 8), np.dtype(np.float32))
    assert again is not held and again.base is None and pool.reused == 0, "a view still holds it"
    del view, again
    reused = pool.empty((8, 8), np.dtype(np.float32))
    assert pool.reused == 1 and reused is not held
    np.testing.assert_array_equal(held, 1)


def test_a_block_evicted_early_and_read_again_still_leaves_memory_after_its_last_example(train):
    name, truth = train
    cfg = Config(SEED=5, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=False)
    plan = loader._plan
    buffer = plan[3]
    assert buffer is not None
    buffer.capacity = 1  # every batch evicts the blocks of the one before: blocks are read again
    seen = 0
    for b in range(len(loader)):
        elements = loader.batch_elements(b)
        for (image, _), e in zip(buffer.read(elements), elements, strict=True):
            z = e.output_window[2][0]
            np.testing.assert_array_equal(image[:, :, 0], truth[loader.scans[e.scan].scan_id][0][:, :, z])
            seen += 1
    assert seen == len(plan[2])
    assert not buffer._slots, "every block leaves memory after its last example, even one read twice"
    loader.close()


def test_batches_asked_for_again_read_each_block_once_more_not_once_an_example(train):
    """A second pass over batches already served (the same epoch, e.g. evaluated twice) finds
    every block's count of examples spent; each block is then read once for the pass, as in
    the first, and the batches are still exact."""
    name, truth = train
    cfg = Config(SEED=5, CATEGORIES=CATEGORIES, INCLUDE_BACKGROUND=True, PREFETCH_BATCHES=1)
    loader = build_loader(cfg, name, batch_size=4, is_test=False, shuffle=True, drop_last=False)
    buffer = loader._plan[3]
    assert buffer is not None
    blocks = len(buffer._boxes)
    passes = []
    for _ in range(2):
        loader.reset_stats()
        for b in range(len(loader)):
            x, y = loader[b]
            for i, e in enumerate(loader.batch_elements(b)):
                image, mask = truth[loader.scans[e.scan].scan_id]
                z = e.output_window[2][0]
                np.testing.assert_array_equal(x[i, :, :, 0], image[:, :, z])
                np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]))
        passes.append(loader.stats()["regions"])
    # two regions a block (image and mask): the second pass reads no more than the first
    assert passes[0] == 2 * blocks and passes[1] <= passes[0], passes
    loader.close()

"""Training at scale: sharding, exact resume, tf.data, torch, honest shuffling, default fit().

Every batch is compared exactly with a numpy reference cut from arrays that zarr-python read
from the store (not through the loaders), locally and over a real server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from live_server import live_server

from loaders import Config, DatasetCatalog, build_loader
from store.writer import write_scan

NUM_SCANS = 16
CATEGORIES = (0, (1, 2))
KINDS = {
    "2d": dict(TAG="DefaultDataLoader", IMG_SIZE=(12, 10, 1)),
    "2.5d": dict(TAG="S25dDataLoader", IMG_SIZE=(12, 10, 3), IMG_PAD_MODE="reflect"),
    "patch": dict(TAG="PatchDataLoader", IMG_SIZE=(8, 8, 4, 1), IMG_STRIDE=(4, 4, 2), IMG_PAD_SIZE=1),
    "random": dict(
        TAG="RandomPatchDataLoader", IMG_SIZE=(6, 6, 3, 1), PATCHES_PER_SCAN=3, FOREGROUND_RATIO=0.5
    ),
}


@pytest.fixture(scope="module")
def scale_store(tmp_path_factory):
    """16 small scans (12x10xD, 3 classes) and their arrays as zarr-python reads them."""
    root = tmp_path_factory.mktemp("scale") / "store"
    rng = np.random.default_rng(42)
    for i in range(NUM_SCANS):
        shape = (12, 10, 4 + i % 4)
        image = rng.normal(0, 1, size=shape).astype(np.float32)
        labels = rng.integers(-1, 3, size=shape)
        mask = np.stack([labels == k for k in range(3)], -1).astype(np.uint8)
        write_scan(root, f"{i:07d}_V00-Aug00", image, mask, {"split": "train", "subject_id": i})
    group = zarr.open_group(str(root), mode="r")
    arrays = {k: (group[k]["image"][...], group[k]["mask"][...]) for k in group.group_keys()}
    return root, arrays


@pytest.fixture(scope="module")
def names(scale_store):
    root, _ = scale_store
    with live_server(root) as url:
        for name, source in (("scale_local", str(root)), ("scale_http", url)):
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, source, split="train")
        yield {"local": "scale_local", "http": "scale_http"}
    for name in ("scale_local", "scale_http"):
        DatasetCatalog.remove(name)


def config(kind, **kw):
    return Config(**{"SEED": 3, "CATEGORIES": CATEGORIES, "INCLUDE_BACKGROUND": True, **KINDS[kind], **kw})


def reference_mask(mask):
    out = np.stack(
        [mask[..., list(g)].sum(-1) if isinstance(g, tuple) else mask[..., g] for g in CATEGORIES], -1
    )
    background = (out.sum(-1, keepdims=True) == 0).astype(np.float32)
    return np.concatenate([background, out.astype(np.float32)], -1)


def padded_cut(volume, window, mode):
    pads = [(max(0, -a), max(0, b - n)) for (a, b), n in zip(window, volume.shape[:3], strict=True)]
    padded = np.pad(volume, pads + [(0, 0)] * (volume.ndim - 3), mode=mode)
    return padded[tuple(slice(a + p[0], b + p[0]) for (a, b), p in zip(window, pads, strict=True))]


def reference_batch(loader, elements, arrays):
    """x and y of ``elements`` from the numpy arrays (the loaders' shapes only add or drop unit axes)."""
    xs, ys = [], []
    mode = loader.pad_mode
    for e in elements:
        image, mask = arrays[loader.scans[e.scan].scan_id]
        xs.append(padded_cut(image, e.window, mode).astype(np.float32))
        ys.append(padded_cut(reference_mask(mask), e.output_window, mode))
    return np.stack(xs), np.stack(ys)


def assert_batch_exact(loader, batch, elements, arrays):
    x_ref, y_ref = reference_batch(loader, elements, arrays)
    x, y = batch[0], batch[1]
    np.testing.assert_array_equal(np.asarray(x), x_ref.reshape(np.shape(x)))
    np.testing.assert_array_equal(np.asarray(y), y_ref.reshape(np.shape(y)))


def example_keys(loader, epoch):
    """What makes an example itself: the order index into the epoch's elements."""
    order = loader._plan_for(epoch)[2]
    return order[: len(loader) * loader.batch_size] if loader.drop_last else order


# -- shuffling stays honest --------------------------------------------------------------------
def test_default_batches_of_16_mix_at_least_8_scans_and_the_order_is_a_function_of_seed_and_epoch(names):
    cfg = Config(SEED=11, CATEGORIES=CATEGORIES, IMG_SIZE=(12, 10, 1))
    loader = build_loader(cfg, names["local"], batch_size=16, is_test=False, shuffle=True, drop_last=True)
    again = build_loader(cfg, names["local"], batch_size=16, is_test=False, shuffle=True, drop_last=True)
    orders = []
    for epoch in range(4):
        scans = [[e.scan for e in loader.batch_elements(b)] for b in range(len(loader))]
        assert min(len(set(s)) for s in scans) >= 8, scans
        orders.append(
            [(e.scan, e.window[2][0]) for b in range(len(loader)) for e in loader.batch_elements(b)]
        )
        assert orders[-1] == [
            (e.scan, e.window[2][0]) for b in range(len(again)) for e in again.batch_elements(b, epoch)
        ]
        loader.on_epoch_end()
    assert len({tuple(o) for o in orders}) == 4, "a new order every epoch"


# -- sharding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_ranks_read_disjoint_shares_that_cover_the_epoch(scale_store, names, kind, where):
    if where == "http" and kind in ("2.5d", "patch"):
        pytest.skip("over HTTP: the 2D and random-patch loaders cover the read paths")
    _, arrays = scale_store
    ranks = [
        build_loader(config(kind), names[where], 4, False, True, True, num_replicas=3, rank=r)
        for r in range(3)
    ]
    whole = build_loader(config(kind), names[where], 4, False, True, False)
    n = whole._num_elements()
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == (n // 3) // 4
    for epoch in range(2):
        keys = [example_keys(r, epoch) for r in ranks]
        flat = [k for ks in keys for k in ks]
        assert len(flat) == len(set(flat)), "ranks are disjoint"
        assert len(flat) >= n - 2 - 3 * 3, "they cover the epoch up to the remainders"
        # every rank sees the same elements, split from one order
        assert all(r._plan_for(epoch)[1] == whole._plan_for(epoch)[1] for r in ranks) or kind == "random"
        for r in ranks:
            for b in range(len(r)):
                elements = r.batch_elements(b)
                assert_batch_exact(r, r[b], elements, arrays)
            r.on_epoch_end()
    again = build_loader(config(kind), names[where], 4, False, True, True, num_replicas=3, rank=1)
    assert example_keys(again, 0) == example_keys(
        build_loader(config(kind), names[where], 4, False, True, True, num_replicas=3, rank=1), 0
    )
    with pytest.raises(ValueError, match="SEED"):
        build_loader(config(kind, SEED=None), names[where], 4, False, True, True, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(config(kind), names[where], 4, False, True, True, num_replicas=2, rank=2)


# -- exact resume -------------------------------------------------------------------------------
def run_epochs(loader, epochs, stop_at=None):
    """Batches of ``epochs`` epochs of a plain loop; with ``stop_at=(epoch, k)`` stop after k batches."""
    seen = []
    while loader.epoch < epochs:
        for batch in loader:
            seen.append(tuple(np.array(a) for a in batch))
            if stop_at is not None and (loader.epoch, loader.state_dict()["position"]) == stop_at:
                return seen
        loader.on_epoch_end()
    return seen


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("kind", ["2d", "random"])
def test_a_restored_loader_gives_exactly_the_rest_of_the_run(scale_store, names, kind, where):
    _, arrays = scale_store
    cfg = config(kind, SEED=None)  # a random seed: the state must carry it
    straight = build_loader(cfg, names[where], 8, False, True, True)
    expected = run_epochs(straight, 3)
    # the uninterrupted run itself is exact (elements replayed for its seed)
    replay = build_loader(cfg, names[where], 8, False, True, True)
    replay.load_state_dict({**straight.state_dict(), "epoch": 0, "position": 0})
    for b in range(len(replay)):
        assert_batch_exact(replay, expected[b], replay.batch_elements(b), arrays)

    first = build_loader(cfg, names[where], 8, False, True, True)
    first.load_state_dict({**straight.state_dict(), "epoch": 0, "position": 0})
    head = run_epochs(first, 3, stop_at=(1, 3))
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 3)
    first.close()
    resumed = build_loader(cfg, names[where], 8, False, True, True)
    resumed.load_state_dict(state)
    tail = run_epochs(resumed, 3)
    assert len(head) + len(tail) == len(expected)
    for got, want in zip(head + tail, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_state_of_another_loader_is_refused_in_one_line(names):
    a = build_loader(config("2d"), names["local"], 8, False, True, True)
    b = build_loader(config("2d"), names["local"], 4, False, True, True)
    with pytest.raises(ValueError, match="batch_size=8, this loader has 4") as err:
        b.load_state_dict(a.state_dict())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a scancache loader state"):
        a.load_state_dict({"epoch": 1})


# -- tf.data and torch --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "http"])
def test_tf_dataset_has_a_static_spec_and_the_loaders_batches(scale_store, names, where):
    tf = pytest.importorskip("tensorflow")
    _, arrays = scale_store
    loader = build_loader(config("2d"), names[where], 8, False, True, True)
    ds = loader.as_tf_dataset()
    x_spec, y_spec = ds.element_spec
    assert tuple(x_spec.shape) == (8, 12, 10, 1) and tuple(y_spec.shape) == (8, 12, 10, 3)
    assert x_spec.dtype == tf.float32
    for epoch in range(2):
        batches = list(ds)
        assert len(batches) == len(loader)
        for b, (x, y) in enumerate(batches):
            assert_batch_exact(loader, (x.numpy(), y.numpy()), loader.batch_elements(b, epoch), arrays)
    assert loader.epoch == 2, "each full pass is one epoch"
    partial = build_loader(config("2d"), names[where], 7, True, False, False).as_tf_dataset()
    assert partial.element_spec[0].shape[0] is None and len(partial.element_spec) == 2  # no x_raw


def test_tf_dataset_positions_count_what_the_consumer_took_not_the_read_ahead(scale_store, names):
    """A loop that took 3 batches (tf.data having read further ahead) resumes at batch 3, and
    ``take(1)`` moves the epoch on by one batch."""
    import time

    pytest.importorskip("tensorflow")
    _, arrays = scale_store
    loader = build_loader(config("2d"), names["local"], 8, False, True, True)
    it = iter(loader.as_tf_dataset())
    taken = [next(it) for _ in range(3)]
    time.sleep(1.0)  # the prefetch fills meanwhile
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    resumed = build_loader(config("2d"), names["local"], 8, False, True, True)
    resumed.load_state_dict(state)
    rest = list(resumed.as_tf_dataset())
    assert len(taken) + len(rest) == len(loader)
    for b, (x, y) in enumerate(taken + rest):
        assert_batch_exact(loader, (x.numpy(), y.numpy()), loader.batch_elements(b, 0), arrays)
    assert resumed.epoch == 1 and resumed.state_dict()["position"] == 0
    peek = build_loader(config("2d"), names["local"], 8, False, True, True)
    ds = peek.as_tf_dataset()
    assert len(list(ds.take(1))) == 1 and peek.state_dict()["position"] == 1
    # a dataset made at an epoch's start has passes of len(loader) batches: this one goes on
    # into epoch 1 for its last batch
    assert ds.cardinality().numpy() == len(loader)
    passed = list(ds)
    assert len(passed) == len(loader) and (peek.epoch, peek.state_dict()["position"]) == (1, 1)
    want = [(0, b) for b in range(1, len(loader))] + [(1, 0)]
    for (x, y), (e, b) in zip(passed, want, strict=True):
        assert_batch_exact(peek, (x.numpy(), y.numpy()), peek.batch_elements(b, e), arrays)
    again = build_loader(config("2d"), names["local"], 8, False, True, True)
    again.load_state_dict(state)
    assert again.as_tf_dataset().cardinality().numpy() == -2  # made mid-epoch: length unknown


MIRRORED = r"""
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from loaders import Config, DatasetCatalog, build_loader
DatasetCatalog.register("mirrored", sys.argv[1], split="train")
cfg = Config(SEED=3, CATEGORIES=(0, (1, 2)), INCLUDE_BACKGROUND=True, IMG_SIZE=(12, 10, 1))
loader = build_loader(cfg, "mirrored", 8, False, True, True)
expected = [loader[b] for b in range(len(loader))]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
dist = strategy.experimental_distribute_dataset(loader.as_tf_dataset())
for (x, y), (x_ref, y_ref) in zip(dist, expected, strict=True):
    parts = strategy.experimental_local_results(x)
    assert len(parts) == 2 and parts[0].shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in parts]), x_ref)
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in strategy.experimental_local_results(y)]), y_ref)
with strategy.scope():
    inputs = keras.Input((12, 10, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
history = model.fit(loader.as_tf_dataset(), epochs=2, verbose=0)
assert np.isfinite(history.history["loss"]).all()
# inference of a model built under the strategy: one prediction per slice, as the model gives it
test = build_loader(cfg, "mirrored", 3, True, False, False)
scans = 0
for inputs_, outputs in test.inference(model):
    x = inputs_["x"]
    want = np.stack([model(x[None, :, :, z, None], training=False)[0].numpy() for z in range(x.shape[2])], axis=2)
    assert outputs["y_pred"].shape == want.shape, (outputs["y_pred"].shape, want.shape)
    np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)
    scans += 1
assert scans == len(test.scans)
print("OK")
"""


def _prefetch_threads() -> int:
    import threading

    return sum(t.name.startswith("scancache-prefetch") for t in threading.enumerate())


def _within(seconds: float, check) -> bool:
    """Whether ``check()`` holds within ``seconds`` (threads end when their read does)."""
    import time

    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(check())


def test_a_dropped_loader_is_freed_at_once_and_a_dropped_tf_dataset_frees_its_loader(names):
    """A notebook cell run again, or a search over settings, drops loaders without ``close()``:
    reference counting frees each at once, its read-ahead threads end (no cycle waits for the
    full collection), and TensorFlow's registry of Python functions keeps no loader alive."""
    import gc
    import weakref

    before = _prefetch_threads()
    gc.disable()  # only reference counting
    try:
        loader = build_loader(config("2d"), names["local"], 8, False, True, True)
        for k, _batch in enumerate(loader):
            if k == 2:
                break
        dropped = weakref.ref(loader)
        del loader, _batch
        # the reads in flight hold it until they end (a thread's frame), nothing else does
        assert _within(10, lambda: dropped() is None and _prefetch_threads() <= before)
    finally:
        gc.enable()

    with build_loader(config("2d"), names["local"], 8, False, True, True) as loader:
        assert len(next(iter(loader))) == 2 and _prefetch_threads() > before
    assert _within(10, lambda: _prefetch_threads() <= before)

    pytest.importorskip("tensorflow")
    loader = build_loader(config("2d"), names["local"], 8, False, True, True)
    ds = loader.as_tf_dataset().map(lambda x, y: (x, y))  # the user's pipeline keeps the loader
    held = weakref.ref(loader)
    del loader
    assert len(list(ds.take(2))) == 2 and held() is not None
    del ds
    # tf.data's iterator threads may hold the generator a moment longer (CI saw it once)
    assert _within(10, lambda: gc.collect() >= 0 and held() is None)


@pytest.mark.slow
def test_tf_dataset_under_mirrored_strategy_on_two_logical_cpus(scale_store):
    import os
    import subprocess
    import sys

    pytest.importorskip("tensorflow")
    root, _ = scale_store
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(root)], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "http"])
def test_torch_dataloader_gives_every_batch_once_whatever_the_workers(scale_store, names, where):
    torch = pytest.importorskip("torch")
    _, arrays = scale_store
    loader = build_loader(config("2d"), names[where], 8, False, True, True)
    ds = loader.as_torch_dataset()
    assert len(ds) == len(loader)
    # each worker count on a fresh epoch (workers=3 > 2 cores: torch warns, still exact)
    for workers, epoch in ((0, 0), (2, 1), (3, 2)) if where == "local" else ((2, 1),):
        ds.set_epoch(epoch)
        # pytest read the store in this process: workers start by forkserver (a fork would refuse)
        context = "forkserver" if workers else None
        got = list(
            torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=workers, multiprocessing_context=context
            )
        )
        order = loader.worker_lanes(epoch, max(1, workers))
        assert len(got) == len(loader), workers
        from loaders.ordering import delivery_order

        for b, (x, y) in zip(delivery_order(order), got, strict=True):
            assert isinstance(x, torch.Tensor)
            assert_batch_exact(loader, (x.numpy(), y.numpy()), loader.batch_elements(b, epoch), arrays)
    x, y = next(iter(loader.as_torch_dataset(channels_first=True)))
    assert tuple(x.shape) == (8, 1, 12, 10) and tuple(y.shape) == (8, 3, 12, 10)


# -- config that means what it says -------------------------------------------------------------
def test_config_fields_mean_what_they_say(scale_store, names):
    _, arrays = scale_store
    a, b = Config(), Config()
    a.CATEGORIES.append(1)
    assert b.CATEGORIES == [] and Config.CATEGORIES == []
    with pytest.raises(ValueError, match="CATEGORIES is empty"):
        Config().get_num_classes()
    assert Config().get_num_classes(3) == 3 and Config(INCLUDE_BACKGROUND=True).get_num_classes(3) == 4
    everything = build_loader(Config(SEED=1, IMG_SIZE=(12, 10, 1)), names["local"], 4, False, False, False)
    assert everything.num_classes() == 3 and everything[0][1].shape[-1] == 3
    with pytest.raises(ValueError, match="PRELOAD_DATA"):
        build_loader(config("2d", PRELOAD_DATA=True), names["local"], 4, False, False, False)
    with pytest.raises(ValueError, match="Y_DTYPE"):
        build_loader(config("2d", Y_DTYPE="int64"), names["local"], 4, False, False, False)
    small = build_loader(config("2d", Y_DTYPE="uint8"), names["local"], 4, False, False, False)
    x, y = small[1]
    assert y.dtype == np.uint8 and x.dtype == np.float32
    assert_batch_exact(small, (x, y), small.batch_elements(1), arrays)


def test_stats_count_batches_and_time(names):
    loader = build_loader(config("2d"), names["local"], 8, False, True, True)
    for _ in loader:
        pass
    stats = loader.stats()
    for key in (
        "batches",
        "bytes_read",
        "bytes_delivered",
        "read_amplification",
        "read_s",
        "wait_s",
        "copy_s",
    ):
        assert key in stats
    assert stats["batches"] >= len(loader) and stats["read_s"] > 0 and stats["seconds"] > 0
    if stats["bytes_delivered"] is not None:  # sources with io_counters()
        assert stats["bytes_delivered"] > 0 and stats["read_amplification"] > 0
    loader.reset_stats()
    assert loader.stats()["batches"] == 0 and loader.stats()["wait_s"] == 0


# -- the default fit() path and Keras' BackupAndRestore ------------------------------------------
def tiny_model():
    import keras

    inputs = keras.Input((12, 10, 1))
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(hidden))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    return model


class Recorder:
    """Records, per epoch, the first pixel of every x the model is given (via __getitem__)."""

    def __init__(self, loader):
        self.loader, self.served = loader, {}
        original = loader.__getitem__
        loader_type = type(loader)

        class Recording(loader_type):
            def __getitem__(inner, index):
                batch = original(index)
                self.served.setdefault(inner.epoch, []).append(batch[0][:, 0, 0, 0].copy())
                return batch

        loader.__class__ = Recording


def expected_firsts(loader, epoch, arrays):
    return [
        reference_batch(loader, loader.batch_elements(b, epoch), arrays)[0][:, 0, 0, 0]
        for b in range(len(loader))
    ]


def test_default_fit_gets_the_loaders_order_once_each_read_ahead(scale_store, names):
    import keras

    _, arrays = scale_store
    train = build_loader(config("2d"), names["local"], 8, False, True, True)
    val = build_loader(config("2d"), names["local"], 8, False, False, False)
    recorder = Recorder(train)
    keras.utils.set_random_seed(0)
    history = tiny_model().fit(train, validation_data=val, epochs=2, verbose=0)  # Keras' own shuffle on
    assert np.isfinite(history.history["val_loss"]).all()
    for epoch in (0, 1):
        served = recorder.served[epoch][-len(train) :]  # TF may probe two batches first for its spec
        for got, want in zip(served, expected_firsts(train, epoch, arrays), strict=True):
            np.testing.assert_array_equal(got, want)
    assert train.epoch == 2
    stats = train.stats()
    # every batch was read once (plus a probe and its read-ahead), ahead of the step that used it
    assert 2 * len(train) <= stats["batches"] <= 2 * len(train) + 2 + train.cfg.PREFETCH_BATCHES


def test_backup_and_restore_with_loader_checkpoint_resumes_the_data_exactly(scale_store, names, tmp_path):
    import keras

    from loaders import LoaderCheckpoint

    _, arrays = scale_store
    cfg = config("2d", SEED=None)  # the random seed must come back from the checkpoint

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 2 * len(train) + 2:  # in epoch 2
                raise KeyboardInterrupt

    train = build_loader(cfg, names["local"], 8, False, True, True)
    seed = train.seed
    recorder = Recorder(train)
    backup = tmp_path / "backup"
    callbacks = [keras.callbacks.BackupAndRestore(str(backup)), LoaderCheckpoint(train, backup), Interrupt()]
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(train, epochs=4, verbose=0, callbacks=callbacks)
    assert set(recorder.served) >= {0, 1, 2}

    resumed = build_loader(cfg, names["local"], 8, False, True, True)  # a new process would do this
    again = Recorder(resumed)
    model = tiny_model()
    model.fit(
        resumed,
        epochs=4,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(str(backup)), LoaderCheckpoint(resumed, backup)],
    )
    assert resumed.seed == seed
    trained = {epoch for epoch, firsts in again.served.items() if len(firsts) >= len(resumed)}
    assert trained == {2, 3}, "Keras repeats the interrupted epoch, then goes on (epoch 0: TF's spec probe)"
    for epoch in (2, 3):
        served = again.served[epoch][-len(resumed) :]
        for got, want in zip(served, expected_firsts(resumed, epoch, arrays), strict=True):
            np.testing.assert_array_equal(got, want)
    # the same batches the interrupted run had begun: the 2 trained, plus any read ahead of
    # the interrupt (TF: 1-2 more), every one in order, not only the last 3
    begun = recorder.served[2]
    assert len(begun) >= 2
    for got, want in zip(begun, again.served[2][-len(resumed) :][: len(begun)], strict=True):
        np.testing.assert_array_equal(got, want)


def recording_model(trained):
    """tiny_model, eager, noting the first pixel of every x it trains on (what Keras consumed,
    not what was read ahead)."""
    import keras

    class Recording(keras.Model):
        def train_step(self, data):
            trained.append(np.array(data[0])[:, 0, 0, 0].copy())
            return super().train_step(data)

    base = tiny_model()
    model = Recording(base.inputs, base.outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", run_eagerly=True)
    return model


def test_fit_with_fewer_steps_than_a_pass_goes_on_through_the_pass_and_resumes_exactly(
    scale_store, names, tmp_path
):
    """steps_per_epoch=k shorter than the loader: each Keras epoch takes the next k batches of
    the pass, every batch once, then the loader's next epoch, as Keras' own iterator goes on.
    Interrupted mid-pass, BackupAndRestore + LoaderCheckpoint repeat that Keras epoch with the
    same batches and go on with the same ones an uninterrupted run had."""
    import keras

    from loaders import LoaderCheckpoint

    _, arrays = scale_store
    cfg = config("2d", SEED=None)
    train = build_loader(cfg, names["local"], 8, False, True, True)
    n, k = len(train), 4
    assert n % k, "the pass must end inside a Keras epoch"
    expected = expected_firsts(train, 0, arrays) + expected_firsts(train, 1, arrays)
    trained: list[np.ndarray] = []
    epochs = -(-n // k) + 2  # through the first pass and into the second
    recording_model(trained).fit(train, epochs=epochs, steps_per_epoch=k, verbose=0)
    assert len(trained) > n
    for got, want in zip(trained, expected, strict=False):
        np.testing.assert_array_equal(got, want)

    # interrupted in Keras epoch 1 (the pass at batch k), after 2 of its steps
    seed_train = build_loader(cfg, names["local"], 8, False, True, True)
    expected = expected_firsts(seed_train, 0, arrays) + expected_firsts(seed_train, 1, arrays)
    backup = tmp_path / "backup"

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == k + 2:
                raise KeyboardInterrupt

    first: list[np.ndarray] = []
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup)),
        LoaderCheckpoint(seed_train, backup),
        Interrupt(),
    ]
    with pytest.raises(KeyboardInterrupt):
        recording_model(first).fit(
            seed_train, epochs=epochs, steps_per_epoch=k, verbose=0, callbacks=callbacks
        )
    resumed = build_loader(cfg, names["local"], 8, False, True, True)  # a new process would do this
    again: list[np.ndarray] = []
    callbacks = [keras.callbacks.BackupAndRestore(str(backup)), LoaderCheckpoint(resumed, backup)]
    recording_model(again).fit(resumed, epochs=epochs, steps_per_epoch=k, verbose=0, callbacks=callbacks)
    assert resumed.seed == seed_train.seed
    assert len(first) == k + 2 and len(again) > n - k
    # Keras repeats epoch 1 from its first step: batches k, k + 1, ... of the pass, and on
    for got, want in zip(first + again, expected[: k + 2] + expected[k:], strict=False):
        np.testing.assert_array_equal(got, want)


def test_separate_fit_calls_and_a_restored_state_go_on_where_the_pass_stands(scale_store, names):
    """Each fit() call probes a batch for its input spec before its first epoch: that probe
    must not rewind the pass. A second fit(steps_per_epoch=k) goes on from where the first left
    the pass (its batches k, k+1, ...; under TensorFlow, past the batches tf.data had read
    ahead), never from its start; a fit() on a loader restored mid-pass (load_state_dict)
    trains exactly the rest of that pass first."""
    _, arrays = scale_store
    train = build_loader(config("2d"), names["local"], 8, False, True, True)
    n, k = len(train), 2
    assert n > 3 * k
    expected = expected_firsts(train, 0, arrays)
    trained: list[np.ndarray] = []
    model = recording_model(trained)
    model.fit(train, epochs=1, steps_per_epoch=k, verbose=0)
    after_first = train.state_dict()["position"]
    assert k <= after_first <= k + 2  # what Keras trained, and what tf.data read ahead
    model.fit(train, epochs=1, steps_per_epoch=k, verbose=0)
    for got, want in zip(trained, expected[:k] + expected[after_first : after_first + k], strict=True):
        np.testing.assert_array_equal(got, want)

    state = train.state_dict()
    restored = build_loader(config("2d"), names["local"], 8, False, True, True)
    restored.load_state_dict(state)
    rest: list[np.ndarray] = []
    recording_model(rest).fit(restored, epochs=1, verbose=0)
    # a Keras epoch of len() steps: the rest of the pass, then on into the loader's next epoch
    at = state["position"]
    assert len(rest) == n
    for got, want in zip(rest, expected[at:] + expected_firsts(train, 1, arrays)[:at], strict=True):
        np.testing.assert_array_equal(got, want)


def test_evaluate_on_a_test_loader_scores_its_batches_unweighted(scale_store, names):
    """A test batch is (x, y, x_raw) in plain code; Keras would read x_raw as sample weights, so
    to Keras (and through as_tf_dataset) it is (x, y): evaluate() equals the same batches' numpy."""
    import keras

    pytest.importorskip("tensorflow")
    test = build_loader(config("2d"), names["local"], 8, True, False, False)
    assert len(test[0]) == 3
    xs, ys = zip(*(test[i][:2] for i in range(len(test))), strict=True)
    keras.utils.set_random_seed(0)
    model = tiny_model()
    want = model.evaluate(np.concatenate(xs), np.concatenate(ys), batch_size=8, verbose=0)
    assert np.isclose(model.evaluate(test, verbose=0), want, rtol=1e-5)
    tf_batches = [(x.numpy(), y.numpy()) for x, y in test.as_tf_dataset()]
    assert len(tf_batches) == len(xs)
    for (x, y), x_ref, y_ref in zip(tf_batches, xs, ys, strict=True):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    assert np.isclose(model.evaluate(test.as_tf_dataset(), verbose=0), want, rtol=1e-5)


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_validation_steps_shorter_than_the_loader_validate_the_same_batches_each_time(
    scale_store, names, eager
):
    """fit(validation_steps=k) and evaluate(steps=k): every evaluation starts at the loader's
    first batch, as Keras' own iterator does (it drifted through the pass, skipping the batches
    tf.data read ahead), so val_loss compares across epochs."""
    import keras

    graph = not eager
    if graph and keras.backend.backend() != "tensorflow":
        pytest.skip("graph mode is TensorFlow's")
    _, arrays = scale_store
    train = build_loader(config("2d"), names["local"], 8, False, True, True)
    val = build_loader(config("2d"), names["local"], 8, False, False, False)
    first_two = expected_firsts(val, 0, arrays)[:2]
    seen: list[np.ndarray] = []

    def note(x):
        seen.append(np.array(keras.ops.convert_to_numpy(x))[:, 0, 0, 0].copy())
        return np.int32(0)

    class Recording(keras.Model):
        def test_step(self, data):
            if not graph:
                note(data[0])
                return super().test_step(data)
            import tensorflow as tf

            done = tf.py_function(note, [data[0]], tf.int32)
            with tf.control_dependencies([done]):
                x = tf.identity(data[0])
            return super().test_step((x, *data[1:]))

    base = tiny_model()
    model = Recording(base.inputs, base.outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy", run_eagerly=eager)
    model.fit(train, validation_data=val, validation_steps=2, epochs=3, steps_per_epoch=2, verbose=0)
    assert len(seen) == 6
    for got, want in zip(seen, first_two * 3, strict=True):
        np.testing.assert_array_equal(got, want)
    seen.clear()
    model.evaluate(val, steps=1, verbose=0)
    model.evaluate(val, steps=1, verbose=0)
    assert len(seen) == 2
    for got in seen:
        np.testing.assert_array_equal(got, first_two[0])

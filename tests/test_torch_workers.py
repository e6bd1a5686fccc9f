"""torch DataLoader workers: persistent, exact, divided by blocks, resumable, counted, and
started by fork from a plain script (tests/test_training_scale.py has the data and references)."""

# ruff: noqa: F811  (the fixtures come from test_training_scale)
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training_scale import (  # noqa: F401
    assert_batch_exact,
    config,
    names,
    reference_batch,
    reference_mask,
    scale_store,
)

from loaders import Config, DefaultDataLoader, build_loader, register_loader
from loaders.blocks import block_key
from loaders.ordering import delivery_order, resumed_lanes, worker_batches

torch = pytest.importorskip("torch")
# pytest has read the local store in this process already, so in-process workers start clean
CLEAN = "forkserver"


# -- the division is a pure function ------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=0, max_size=40).map(sorted),
    st.integers(1, 5),
    st.integers(1, 5),
    st.data(),
)
def test_lanes_cover_every_batch_once_keep_groups_whole_and_resume_the_same_order(groups, k1, k2, data):
    lanes = worker_batches(groups, k1)
    assert sorted(b for lane in lanes for b in lane) == list(range(len(groups)))
    distinct = sorted(set(groups))
    whole = distinct[: len(distinct) - len(distinct) % k1]
    for g in whole:  # a group dealt whole lies in one lane
        assert sum(any(groups[b] == g for b in lane) for lane in lanes) == 1
    order = delivery_order(lanes)
    position = data.draw(st.integers(0, len(groups)))
    assert delivery_order(resumed_lanes(lanes, position, k2)) == order[position:]


def test_each_worker_decodes_its_own_blocks(names):
    loader = build_loader(config("2d", SHUFFLE_BLOCKS=2), names["local"], 4, False, True, True)
    lanes = loader.worker_lanes(0, 2)
    blocks = [{block_key(e, loader.scans) for b in lane for e in loader.batch_elements(b)} for lane in lanes]
    assert all(lanes)
    # only batches that straddle two windows of blocks share blocks between workers; dealing
    # batch by batch (what whole groups replace) makes both workers decode nearly every block
    by_batch = [{block_key(e, loader.scans) for b in range(w, len(loader), 2) for e in loader.batch_elements(b)}
                for w in range(2)]  # fmt: skip
    assert len(blocks[0]) + len(blocks[1]) < len(by_batch[0]) + len(by_batch[1])
    assert len(blocks[0] & blocks[1]) <= len(blocks[0] | blocks[1]) // 2


# -- torch workers, exact ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "http"])
def test_persistent_workers_see_each_epoch_and_give_exact_batches(scale_store, names, where):
    _, arrays = scale_store
    loader = build_loader(config("2d"), names[where], 8, False, True, True)
    ds = loader.as_torch_dataset()
    dl = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context=CLEAN
    )
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        got = list(dl)
        order = delivery_order(loader.worker_lanes(epoch, 2))
        assert len(got) == len(loader) == len(order)
        for (x, y), b in zip(got, order, strict=True):
            assert_batch_exact(loader, (x.numpy(), y.numpy()), loader.batch_elements(b, epoch), arrays)
        orders.append([tuple(loader.batch_elements(b, epoch)) for b in order])
    assert orders[0] != orders[1] != orders[2]
    stats = loader.stats()  # the training process sees its workers' figures
    assert len(stats["workers"]) == 2 and sum(w["batches"] for w in stats["workers"]) == 3 * len(loader)
    assert stats["bytes_delivered"] > 0 and stats["read_amplification"] is not None


@pytest.mark.slow
def test_a_resumed_epoch_gives_the_rest_exactly_whatever_the_workers(scale_store, names):
    _, arrays = scale_store
    loader = build_loader(config("patch"), names["local"], 2, False, True, True)
    ds = loader.as_torch_dataset()
    ds.set_epoch(1)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=CLEAN)
    full = [(x.numpy().copy(), y.numpy().copy()) for x, y in dl]
    state = ds.state_dict(batches_done=3)
    assert state["workers"] == 2 and state["position"] == 3 and state["epoch"] == 1
    again = build_loader(config("patch"), names["local"], 2, False, True, True)
    resumed_ds = again.as_torch_dataset()
    resumed_ds.load_state_dict(state)
    dl3 = torch.utils.data.DataLoader(
        resumed_ds, batch_size=None, num_workers=3, multiprocessing_context=CLEAN
    )
    rest = [(x.numpy(), y.numpy()) for x, y in dl3]
    assert len(rest) == len(full) - 3
    for (x, y), (x_ref, y_ref) in zip(rest, full[3:], strict=True):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    order = delivery_order(loader.worker_lanes(1, 2))
    assert_batch_exact(again, full[3], again.batch_elements(order[3], 1), arrays)


# -- y as class indices -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["2d", "patch"])
@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("background", [True, False])
def test_class_index_y_is_the_one_hot_channel(scale_store, names, kind, where, background):
    _, arrays = scale_store
    cfg = config(kind, Y_FORMAT="class_index", INCLUDE_BACKGROUND=background)
    loader = build_loader(cfg, names[where], 4, False, True, True)
    for b in range(len(loader)):
        x, y = loader[b]
        assert y.dtype == np.uint8 and y.shape == x.shape[:-1]
        for e, yi in zip(loader.batch_elements(b), y, strict=True):
            np.testing.assert_array_equal(yi, expected_class_index(loader, e, arrays).reshape(yi.shape))


def expected_class_index(loader, e, arrays):
    """An element's y as class indices, from zarr-python's mask with numpy."""
    _, mask = arrays[loader.scans[e.scan].scan_id]
    hot = reference_mask(mask)  # background first, then the categories
    pads = [(max(0, -a), max(0, z - n)) for (a, z), n in zip(e.output_window, mask.shape[:3], strict=True)]
    cut = np.pad(hot, [*pads, (0, 0)], mode=loader.pad_mode)[
        tuple(slice(a + p[0], z + p[0]) for (a, z), p in zip(e.output_window, pads, strict=True))
    ]
    return cut.argmax(-1).astype(np.uint8)


@pytest.mark.parametrize("kind", ["2d", "patch"])
@pytest.mark.parametrize("workers", [0, 2])
def test_channels_first_moves_x_channels_and_leaves_class_index_y_as_it_is(scale_store, names, kind, workers):
    """(N, H, W) labels have no channel axis to move: channels_first must not transpose them
    (12x10 slices: a transposed y would be 10x12)."""
    _, arrays = scale_store
    loader = build_loader(config(kind, Y_FORMAT="class_index"), names["local"], 4, False, True, True)
    ds = loader.as_torch_dataset(channels_first=True)
    context = CLEAN if workers else None
    dl = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, multiprocessing_context=context
    )
    ds.set_epoch(0)
    got = list(dl)
    order = delivery_order(loader.worker_lanes(0, workers)) if workers else range(len(loader))
    assert len(got) == len(loader)
    for (x, y), b in zip(got, order, strict=True):
        elements = loader.batch_elements(b, 0)
        assert x.shape[1] == 1 and tuple(y.shape) == (len(elements), *x.shape[2:])
        for e, yi in zip(elements, y.numpy(), strict=True):
            np.testing.assert_array_equal(yi, expected_class_index(loader, e, arrays).reshape(yi.shape))


class _AugmentedInWorkers(torch.utils.data.IterableDataset):
    """What users write around the dataset: a transform of each batch, run in the worker. The
    k-th batch of a worker's lane goes as it is, flipped (new tensors), or doubled in place."""

    def __init__(self, inner, rows_axis):
        self.inner, self.rows_axis = inner, rows_axis

    def __iter__(self):
        import copy

        for k, (x, y) in enumerate(self.inner):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            kept = copy.deepcopy(x)  # an unaugmented copy, as augmentation code keeps one
            assert torch.equal(kept, x) and kept.data_ptr() != x.data_ptr()
            assert copy.copy(y).data_ptr() == y.data_ptr()
            if k % 3 == 1:
                x, y = torch.flip(x, dims=[self.rows_axis]), torch.flip(y, dims=[self.rows_axis])
            elif k % 3 == 2:
                x.mul_(2)
            yield x, y


@pytest.mark.parametrize("channels_first", [False, True])
def test_batches_in_a_worker_are_tensors_that_user_transforms_take(scale_store, names, channels_first):
    _, arrays = scale_store
    loader = build_loader(config("2d"), names["local"], 4, False, True, True)
    ds = loader.as_torch_dataset(channels_first=channels_first)
    ds.set_epoch(0)
    dl = torch.utils.data.DataLoader(
        _AugmentedInWorkers(ds, 2 if channels_first else 1),
        batch_size=None,
        num_workers=2,
        multiprocessing_context=CLEAN,
    )
    lanes = loader.worker_lanes(0, 2)
    place = {b: k for lane in lanes for k, b in enumerate(lane)}
    got = list(dl)
    assert len(got) == len(loader)
    for (x, y), b in zip(got, delivery_order(lanes), strict=True):
        x_ref, y_ref = reference_batch(loader, loader.batch_elements(b, 0), arrays)
        x, y = x.numpy(), y.numpy()
        if channels_first:
            x, y = np.moveaxis(x, 1, -1), np.moveaxis(y, 1, -1)
        x_ref, y_ref = x_ref.reshape(x.shape), y_ref.reshape(y.shape)
        if place[b] % 3 == 1:
            x_ref, y_ref = np.flip(x_ref, 1), np.flip(y_ref, 1)  # the rows, channels last
        elif place[b] % 3 == 2:
            x_ref = x_ref * 2
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)


@register_loader
class FlipLoader(DefaultDataLoader):
    """A custom loader with a keyword argument of its own, which build_loader passes on."""

    def __init__(self, cfg, dataset_dicts, flip=False, **kwargs):
        self.flip = flip
        super().__init__(cfg, dataset_dicts, **kwargs)

    def preprocess(self, x, y):
        return (x[:, ::-1].copy(), y[:, ::-1].copy()) if self.flip else (x, y)


def test_workers_rebuild_a_custom_loader_with_its_own_arguments(scale_store, names):
    """A worker rebuilds the loader from the config, the datasets and the constructor's keyword
    arguments, the subclass's own (flip=True) included: its batches are the flipped ones."""
    _, arrays = scale_store
    loader = build_loader(config("2d", TAG="FlipLoader"), names["local"], 4, False, True, True, flip=True)
    dl = torch.utils.data.DataLoader(
        loader.as_torch_dataset(), batch_size=None, num_workers=2, multiprocessing_context=CLEAN
    )
    got = list(dl)
    order = delivery_order(loader.worker_lanes(0, 2))
    assert len(got) == len(loader)
    for (x, y), b in zip(got, order, strict=True):
        x_ref, y_ref = reference_batch(loader, loader.batch_elements(b, 0), arrays)
        np.testing.assert_array_equal(x.numpy(), x_ref.reshape(x.shape)[:, ::-1])
        np.testing.assert_array_equal(y.numpy(), y_ref.reshape(y.shape)[:, ::-1])


def test_y_format_is_checked_where_it_enters(names):
    with pytest.raises(ValueError, match="Y_FORMAT must be one of one_hot, class_index"):
        build_loader(Config(Y_FORMAT="indices", IMG_SIZE=(12, 10, 1)), names["local"], 4, False, True, True)


# -- scripts as users write them ------------------------------------------------------------------------
SCRIPT = """
import torch
from loaders import Config, DatasetCatalog, build_loader
DatasetCatalog.register("s", {store!r}, split="train")
loader = build_loader(Config(IMG_SIZE=(12, 10, 1), SEED=1), "s", batch_size=4, is_test=False, shuffle=True, drop_last=True)
ds = loader.as_torch_dataset(channels_first=True)
{before}
n = sum(1 for _ in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
print("batches", n, len(loader))
"""


@pytest.mark.slow
@pytest.mark.parametrize("before", ["", "loader[0]"])
def test_a_script_without_a_main_guard_reads_in_forked_workers(scale_store, tmp_path, before):
    root, _ = scale_store
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(store=str(root), before=before)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    if not before:
        assert out.returncode == 0, out.stderr[-2000:]
        n, length = out.stdout.split()[1:]
        assert n == length
    else:  # the parent read through tensorstore first: one line says what to do
        assert out.returncode != 0
        assert (
            "start the workers first" in out.stderr and "multiprocessing_context='forkserver'" in out.stderr
        )


NOTEBOOK = """
import torch
from loaders import Config, DatasetCatalog, DefaultDataLoader, build_loader, register_loader

@register_loader
class NotebookLoader(DefaultDataLoader):
    pass

DatasetCatalog.register("s", {store!r}, split="train")
cfg = Config(TAG="NotebookLoader", IMG_SIZE=(12, 10, 1), SEED=1)
loader = build_loader(cfg, "s", batch_size=4, is_test=False, shuffle=True, drop_last=True)
ds = loader.as_torch_dataset()
try:
    next(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")))
except RuntimeError as err:
    print(err)
"""


@pytest.mark.slow
def test_a_loader_class_of_a_notebook_is_named_for_spawned_workers(scale_store):
    """``python -c`` has a ``__main__`` without a file, as a notebook: a loader class defined
    there cannot be imported by spawned workers; one line says so (each worker failed with
    "Can't get attribute 'NotebookLoader' on <module '__main__'>")."""
    root, _ = scale_store
    code = textwrap.dedent(NOTEBOOK.format(store=str(root)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (
        "as_torch_dataset: NotebookLoader is defined in a notebook or an interactive session (a __main__ "
        "without a file), which spawn and forkserver DataLoader workers cannot import; move it into a .py "
        "file beside the notebook and import it from there"
    )


STOPPED = """
import os, signal, time
import torch
# Python's own Ctrl-C handler, as in a terminal or a kernel (a job started in the background
# by a shell, as CI may be, inherits SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
from loaders import Config, DatasetCatalog, build_loader
DatasetCatalog.register("s", {store!r}, split="train")
loader = build_loader(Config(IMG_SIZE=(12, 10, 1), SEED=1), "s", batch_size=4, is_test=False, shuffle=True, drop_last=True)
ds = loader.as_torch_dataset()
dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
try:
    for i, _ in enumerate(dl):
        if i == 2:
            os.killpg(0, signal.SIGINT)  # a notebook's Stop: SIGINT to the whole process group
            time.sleep(2)
except KeyboardInterrupt:
    print("stopped")
ds.set_epoch(1)
print("epoch 1", sum(1 for _ in dl), len(loader))
"""


@pytest.mark.slow
def test_persistent_workers_outlive_a_stop_of_the_training_loop(scale_store):
    """Ctrl-C or a notebook's Stop reaches the workers too: they leave it to the training
    process, so the next epoch reads every batch (the workers had died of it: "DataLoader
    worker (pid(s) ...) exited unexpectedly" on every later pass)."""
    root, _ = scale_store
    code = textwrap.dedent(STOPPED.format(store=str(root)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, start_new_session=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert lines[0] == "stopped"
    _, _, got, want = lines[1].split()
    assert got == want


# -- worker batch memory is used again only once released ------------------------------------------
def test_a_worker_slot_is_reused_only_after_every_view_of_its_batch_is_gone():
    import gc
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from loaders.shared_batches import SlotTable, WorkerBatchPool

    table = SlotTable()
    pool = WorkerBatchPool(table, worker=3)
    first = pool.empty((4, 5), np.dtype(np.float32))
    first[...] = 7
    travelling = pool.batch_of(first)
    assert travelling is not None
    received = pickle.loads(ForkingPickler.dumps(travelling))  # what the training process gets
    del travelling, first
    gc.collect()
    view = received[1:]
    del received
    gc.collect()
    second = pool.empty((4, 5), np.dtype(np.float32))  # the first slot is still held by the view
    second[...] = 9
    assert pool.reused == 0 and float(view.sum()) == 7 * 15
    del second, view
    gc.collect()
    third = pool.empty((4, 5), np.dtype(np.float32))
    assert pool.reused == 1 and third.shape == (4, 5)


def test_the_training_process_keeps_its_mapping_of_a_slot_and_drops_it_with_the_worker():
    import gc
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from loaders import shared_batches
    from loaders.shared_batches import SlotTable, WorkerBatchPool

    def send(pool: WorkerBatchPool, value: float):  # one batch, as the training process receives it
        array = pool.empty((8, 6), np.dtype(np.float32))
        array[...] = value
        travelling = pool.batch_of(array)
        assert travelling is not None
        del array
        # as the worker's code sees it, a tensor, which travels as its segment
        return pickle.loads(ForkingPickler.dumps(travelling.tensor(channels_first=False)))

    table = SlotTable()
    token = table.token
    pool = WorkerBatchPool(table, worker=1)
    first = send(pool, 1.0)
    address = first.data_ptr()
    del first
    gc.collect()
    second = send(pool, 2.0)  # the same slot, its segment written again: the same mapping
    assert pool.reused == 1 and second.data_ptr() == address
    assert np.array_equal(second.numpy(), np.full((8, 6), 2.0, np.float32))
    del second
    gc.collect()
    (old_segment,) = [ident for ident, _ in shared_batches._mappings[token].values()]
    # a new process for worker 1 (its leases carry another pid) has new segments: the old
    # mapping is dropped, the new one kept in its place
    successor = WorkerBatchPool(table, worker=1)
    successor.pid = os.getppid()  # another pid, and a live one (pid + 1 may be gone at any time)
    third = send(successor, 3.0)
    assert np.array_equal(third.numpy(), np.full((8, 6), 3.0, np.float32))
    (new_segment,) = [ident for ident, _ in shared_batches._mappings[token].values()]
    assert new_segment != old_segment
    # a worker process that has ended: its mappings go at the next set_epoch (or new worker)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    other = WorkerBatchPool(table, worker=2)
    other.pid = int(ended.stdout)
    fourth = send(other, 4.0)
    assert np.array_equal(fourth.numpy(), np.full((8, 6), 4.0, np.float32))
    del fourth
    gc.collect()
    assert len(shared_batches._mappings[token]) == 2
    shared_batches.forget_ended_workers(token)
    assert [c // shared_batches.SLOTS for c in shared_batches._mappings[token]] == [1]
    # the dataset's table gone: every mapping it kept goes with it
    del third, table, pool, successor, other
    gc.collect()
    assert token not in shared_batches._mappings


# -- misuse between and inside passes ------------------------------------------------------------------
def test_set_epoch_and_load_state_dict_inside_a_running_pass_are_refused(names):
    """A pass keeps the batches it started with: changing the epoch or the position under it made
    the next saved state skip or repeat batches. Between passes (after a break) both work."""
    loader = build_loader(config("2d"), names["local"], 4, False, True, True)
    state = loader.state_dict()
    for i, _ in enumerate(loader):
        if i == 2:
            with pytest.raises(RuntimeError, match="set_epoch: a pass over this loader is running"):
                loader.set_epoch(1)
            with pytest.raises(RuntimeError, match="load_state_dict: a pass over this loader is running"):
                loader.load_state_dict(state)
            break
    assert loader.state_dict()["position"] == 3 and loader.epoch == 0  # nothing changed
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match="a pass over this loader is running"):
        loader.load_state_dict(state)
    it.close()
    loader.load_state_dict(state)  # closed: between passes
    loader.set_epoch(1)
    assert (loader.epoch, loader.state_dict()["position"]) == (1, 0)

    ds = loader.as_torch_dataset()  # without workers the dataset's pass runs in this process
    for i, _ in enumerate(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)):
        if i == 1:
            with pytest.raises(RuntimeError, match="set_epoch: a pass over this loader is running"):
                ds.set_epoch(2)
            break
    ds.set_epoch(2)
    assert loader.epoch == 2


@pytest.mark.slow
def test_with_workers_a_state_needs_the_batches_the_loop_took(names):
    loader = build_loader(config("2d"), names["local"], 4, False, True, True)
    ds = loader.as_torch_dataset()
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=CLEAN)
    for i, _ in enumerate(dl):
        if i == 3:
            break
    with pytest.raises(ValueError, match="pass batches_done="):
        ds.state_dict()  # it used to say position 0: a resume would repeat 4 batches
    assert ds.state_dict(batches_done=4)["position"] == 4
    ds.set_epoch(1)  # a new pass, not yet read: the position is known again
    assert ds.state_dict()["position"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loaders_own_epoch_calls_reach_its_torch_dataset(scale_store, names, workers):
    """A loop that calls the loader's set_epoch or on_epoch_end (the guide's plain loop) while
    torch reads its dataset gets that epoch's batches; the loader's own state_dict, which cannot
    count what torch took, refuses and says which to save."""
    _, arrays = scale_store
    loader = build_loader(config("2d", SHUFFLE_BLOCKS=2), names["local"], 8, False, True, True)
    ds = loader.as_torch_dataset()
    context = CLEAN if workers else None
    dl = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, multiprocessing_context=context
    )
    for epoch, move in ((2, lambda: loader.set_epoch(2)), (3, loader.on_epoch_end)):
        move()
        got = [(x.numpy(), y.numpy()) for x, y in dl]
        order = delivery_order(loader.worker_lanes(epoch, max(1, workers)))
        assert loader.epoch == epoch and len(got) == len(order)
        for batch, b in zip(got, order, strict=True):
            assert_batch_exact(loader, batch, loader.batch_elements(b, epoch), arrays)
    if workers == 0:  # whole passes read here: the loader's own state is right
        assert loader.state_dict()["position"] == 0
    for i, _ in enumerate(dl):  # a pass left mid-way: only the loop knows how far it got
        if i == 1:
            break
    with pytest.raises(ValueError) as refused:
        loader.state_dict()
    assert str(refused.value) == (
        "state_dict: this loader's batches went through as_torch_dataset(), which counts them: "
        "save ds.state_dict(batches_done=<batches your loop took>) instead"
    )
    assert ds.state_dict(batches_done=2)["position"] == 2
    fresh = build_loader(config("2d"), names["local"], 8, False, True, True)
    fresh.as_torch_dataset()  # made, never read: the loader's own state is right
    assert fresh.state_dict()["position"] == 0


def test_sharded_loaders_keep_their_checkpoints_apart(names, tmp_path):
    """Two ranks' LoaderCheckpoints in one backup folder: a file each, each restored from its own
    (a shared file made the second rank refuse the first rank's state)."""
    from loaders.checkpoint import STATE_FILE, LoaderCheckpoint

    ranks = [
        build_loader(config("2d"), names["local"], 4, False, True, True, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    checkpoints = [LoaderCheckpoint(loader, tmp_path) for loader in ranks]
    for checkpoint in checkpoints:
        checkpoint.on_train_begin()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scancache_loader_state.rank0.json",
        "scancache_loader_state.rank1.json",
    ]
    for loader in ranks:
        loader.set_epoch(3)
        loader._position = 2  # as a Keras epoch stopped mid-pass leaves it
    for checkpoint in checkpoints:
        checkpoint._save()
    again = [
        build_loader(config("2d"), names["local"], 4, False, True, True, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    for r, loader in enumerate(again):
        LoaderCheckpoint(loader, tmp_path).on_train_begin()
        assert (loader.epoch, loader._position, loader.shard.rank) == (3, 2, r)
    # a rank's state an older scancache wrote under the one name is still found by that rank
    (tmp_path / "scancache_loader_state.rank1.json").rename(tmp_path / STATE_FILE)
    older = build_loader(config("2d"), names["local"], 4, False, True, True, num_replicas=2, rank=1)
    LoaderCheckpoint(older, tmp_path).on_train_begin()
    assert (older.epoch, older._position) == (3, 2)
    # another rank's state under that name is refused: this rank starting afresh would overlap
    (tmp_path / "scancache_loader_state.rank0.json").unlink()
    rank0 = build_loader(config("2d"), names["local"], 4, False, True, True, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match=r"holds rank 1's state .* not rank 0's"):
        LoaderCheckpoint(rank0, tmp_path).on_train_begin()
    LoaderCheckpoint(rank0, tmp_path, name="mine.json").on_train_begin()  # a name of its own: no fallback
    assert (rank0.epoch, rank0._position) == (0, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_repeating_an_epoch_of_a_shuffled_loader_says_to_call_set_epoch(names, workers, capfd):
    """Without ds.set_epoch each epoch repeats the first's order and patches (as
    DistributedSampler): a second pass of one epoch warns; with set_epoch, or for a loader
    whose epochs are all alike (validation), nothing is said."""
    import warnings

    def passes(shuffle, set_epoch):
        loader = build_loader(config("2d"), names["local"], 8, not shuffle, shuffle, False)
        ds = loader.as_torch_dataset()
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=workers, persistent_workers=bool(workers),
            # spawn: its workers write to this test's stderr (a forkserver's, to where it started)
            multiprocessing_context="spawn" if workers else None,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(3):
                if set_epoch:
                    ds.set_epoch(epoch)
                list(dl)
        return [str(w.message) for w in caught if "set_epoch" in str(w.message)]

    said = passes(shuffle=True, set_epoch=False)
    if workers == 0:
        assert len(said) == 2 and said[0].startswith("as_torch_dataset: another pass of epoch 0 gives")
    else:  # a worker process says it on its stderr
        assert "as_torch_dataset: another pass of epoch 0 gives" in capfd.readouterr().err
    assert passes(shuffle=True, set_epoch=True) == []
    assert passes(shuffle=False, set_epoch=False) == []
    assert "another pass" not in capfd.readouterr().err

"""``loader.as_torch_dataset(channels_first=False)``: a torch ``IterableDataset`` of ``(x, y)``.

For ``DataLoader(ds, batch_size=None, num_workers=k)``, persistent workers or not. Which worker
reads which batch is a pure function of the epoch's block groups and k
(``loaders.ordering.worker_batches``): whole groups of batches that share decoded blocks go to
one worker, so k workers decode no more than one process would, and torch's turn-taking hands
the batches out in an order known in advance (``state_dict`` counts in it, and a resumed epoch
continues it exactly, whatever k is then).

* **Epochs reach persistent workers.** ``set_epoch``, ``load_state_dict`` and the seed go
  through a small shared-memory table that each worker reads when torch starts its next pass,
  so workers are started once, not per epoch.
* **Any start method.** A worker rebuilds the loader in its own process from plain data (the
  config, dataset dicts and settings) instead of using the parent's open sources. With
  ``fork`` (Linux's default before Python 3.14) a script without an ``if __name__ ==
  "__main__":`` guard and a notebook work; ``spawn`` and ``forkserver`` work where the user
  picks them (with the guard, as always for those). tensorstore aborts a forked child if the
  parent had already read through it: such a worker stops with one line saying what to do.
* **Its share of the cores and memory.** A worker reads with ``cores // k`` decode threads,
  not all of them, and keeps a k-th of the default chunk cache (``store.reader_share.default_cache_bytes``).
* **No copies on the way to torch.** In a worker, batches are written straight into shared
  memory that is used again once the training process has let go of it
  (``loaders.shared_batches``): no copy, and no fresh pages to fault in for every batch.
* **Counted.** Each worker adds its figures to a shared table; ``loader.stats()`` and
  ``ds.stats()`` in the training process include them (``workers``: one entry per worker).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from loaders.catalog import forget_shared_sources, is_url
from loaders.copies import recipe_of
from loaders.shared_batches import SlotTable, WorkerBatchPool, forget_ended_workers
from loaders.stats import WorkerCounters, snapshot
from store.reader_share import rank_cores, usable_cores

if TYPE_CHECKING:
    from loaders.base import DataLoader

# The shared control table: what the next pass of every worker reads.
_EPOCH, _SEED, _START, _ORDER_WORKERS, _DELIVERED, _WORKERS_READ, _PASSES = range(7)


def _torch_base() -> type:
    try:
        import torch.utils.data
    except ImportError:
        raise ImportError('as_torch_dataset needs PyTorch: pip install "scancache[torch]"') from None
    return torch.utils.data.IterableDataset


class TorchBatches(_torch_base()):  # type: ignore[misc]
    """``loader.as_torch_dataset(channels_first=False)``: see the module docstring."""

    def __init__(self, loader: DataLoader, channels_first: bool = False) -> None:
        super().__init__()
        self.channels_first = bool(channels_first)
        self._recipe = recipe_of(loader, "as_torch_dataset")  # what a worker rebuilds it from
        self._loader: DataLoader | None = loader
        self._owner_pid = os.getpid()
        self._control = multiprocessing.RawArray("q", 7)
        self._counters = WorkerCounters()
        self._slots = SlotTable()  # which worker batch memory the training process still holds
        loader._worker_counters.append(self._counters)
        self.publish(loader)

    # -- the training process --------------------------------------------------------------------
    def publish(self, loader: DataLoader) -> None:
        """What the next pass reads: the parent loader's seed, epoch and position."""
        c = self._control
        c[_EPOCH], c[_SEED], c[_START] = loader.epoch, loader.seed, loader._position
        c[_ORDER_WORKERS], c[_DELIVERED] = loader._position_workers, 0
        c[_WORKERS_READ], c[_PASSES] = 0, 0

    def took_batches(self) -> bool:
        """Whether this pass has given batches (its position is then this dataset's to say)."""
        c = self._control
        return bool(c[_DELIVERED] or c[_WORKERS_READ])

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (from its first batch), as ``DistributedSampler.set_epoch``;
        persistent workers see it at their next pass."""
        loader = self._current()
        loader.set_epoch(epoch)
        self.publish(loader)
        forget_ended_workers(self._slots.token)  # workers of a pass that has ended: their memory goes

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Where the epoch stands. With workers, pass the batches your loop has taken from the
        ``DataLoader`` in this pass (the training process cannot see them); in the main process
        the dataset counts them itself."""
        c = self._control
        if batches_done is None and c[_WORKERS_READ]:
            raise ValueError(
                "state_dict: DataLoader workers read this pass, and the training process cannot "
                "count the batches your loop took from them: pass batches_done=<that count>"
            )
        state = self._current()._state().to_dict()
        done = int(c[_DELIVERED]) if batches_done is None else int(batches_done)
        state["epoch"], state["seed"] = int(c[_EPOCH]), int(c[_SEED])
        state["position"] = int(c[_START]) + done
        state["workers"] = max(1, int(c[_ORDER_WORKERS]))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (``state_dict``): the next pass gives exactly the batches
        still to come, whatever the number of workers now."""
        loader = self._current()
        loader.load_state_dict(state)
        self.publish(loader)

    def stats(self) -> dict[str, Any]:
        """The loader's ``stats()``, its workers' figures included."""
        return self._current().stats()

    def __len__(self) -> int:
        return len(self._current())

    def __setstate__(self, state: dict[str, Any]) -> None:
        """In a spawn/forkserver worker, while it starts (imports take seconds); not in the
        process that made the dataset (a copy made there keeps Ctrl-C working)."""
        if state.get("_owner_pid") != os.getpid():
            _leave_sigint_to_the_training_process()
        self.__dict__.update(state)

    def __getstate__(self) -> dict[str, Any]:
        """Sent to spawn/forkserver workers: the recipe to rebuild the loader from."""
        _refuse_classes_of_a_notebook(self._recipe[0], self._recipe[1])
        state = dict(self.__dict__)
        state["_loader"] = None  # workers rebuild it; open sources are not sent
        return state

    # -- any process -----------------------------------------------------------------------------
    def _current(self, workers: int = 1, worker: int = 0) -> DataLoader:
        if self._loader is not None and os.getpid() == self._owner_pid:
            return self._loader
        _refuse_inherited_tensorstore(self._recipe[2])
        forget_shared_sources()  # anything inherited through fork belongs to the parent
        from store import reader_share as local

        local.set_reader_share(max(1, rank_cores() // max(1, workers)), readers=max(1, workers))
        cls, cfg, dicts, settings = self._recipe
        loader = cls(cfg, dicts, **settings)
        loader._batch_arrays = WorkerBatchPool(self._slots, worker)  # type: ignore[assignment]
        self._loader, self._owner_pid = loader, os.getpid()
        return loader

    def _tensors(self, loader: DataLoader, batch: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
        import torch

        pool = loader._batch_arrays if isinstance(loader._batch_arrays, WorkerBatchPool) else None
        out: list[Any] = []
        for position, a in enumerate(batch):
            # x's last axis is its channels, a one-hot y's its classes; a class-index y has none
            move = self.channels_first and not (position == 1 and loader.class_index)
            shared = pool.batch_of(a) if pool is not None else None
            if shared is not None:  # becomes a tensor in the training process, no copy
                out.append(shared.tensor(move and a.ndim >= 3))
                continue
            tensor = torch.from_numpy(a if a.flags.writeable else a.copy())
            if move and tensor.ndim >= 3:
                tensor = tensor.movedim(-1, 1)  # a view: channels-last memory, channels-first shape
            out.append(tensor)
        return tuple(out)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if info is not None:
            _leave_sigint_to_the_training_process()
        loader = self._current(workers, worker)
        c = self._control
        epoch, seed, start, order_workers = (
            int(c[_EPOCH]),
            int(c[_SEED]),
            int(c[_START]),
            int(c[_ORDER_WORKERS]),
        )
        if loader.seed != seed or loader.epoch != epoch:
            loader.seed = seed
            loader.set_epoch(epoch)
            if info is None:  # the training process's loader published that: the pass's table again
                c[_START], c[_ORDER_WORKERS] = start, order_workers
        if worker == 0:  # one process of the pass counts it
            if c[_PASSES] and start == 0 and _draws_per_epoch(loader):
                _warn_epoch_repeated(epoch)
            c[_PASSES] += 1
        if start == 0:
            c[_ORDER_WORKERS] = order_workers = workers
        lane = loader.worker_lanes(epoch, workers, start, max(1, order_workers))[worker]
        if info is None:
            c[_DELIVERED] = 0
            loader._count_pass(+1)  # set_epoch and load_state_dict wait for its end
        else:
            c[_WORKERS_READ] = 1
        started, cpu0 = time.perf_counter(), time.process_time()
        last = snapshot(loader.stats(), 0.0, 0.0)
        try:
            for _, batch in loader.batches_of(epoch, lane):
                tensors = self._tensors(loader, batch)
                if info is None:
                    c[_DELIVERED] += 1
                else:
                    now = snapshot(loader.stats(), time.process_time() - cpu0, time.perf_counter() - started)
                    self._counters.add(worker, {k: now[k] - last.get(k, 0.0) for k in now})
                    last = now
                yield tensors
            if info is None:  # a whole pass in this process: the next one starts the epoch again
                c[_START], c[_DELIVERED], c[_ORDER_WORKERS] = 0, 0, 1
                loader._position, loader._position_workers = 0, 1
        finally:
            if info is None:
                loader._count_pass(-1)


def _draws_per_epoch(loader: DataLoader) -> bool:
    """Whether a pass repeating an epoch is a mistake rather than the plan: a shuffled loader
    (a validation loader of random patches, unshuffled, keeps its patches on purpose)."""
    return bool(loader.shuffle)


def _warn_epoch_repeated(epoch: int) -> None:
    import warnings

    warnings.warn(
        f"as_torch_dataset: another pass of epoch {epoch} gives that epoch's batches again (same "
        "order, same random patches): call ds.set_epoch(epoch) before each epoch, as with "
        "DistributedSampler",
        UserWarning,
        stacklevel=3,
    )


def _leave_sigint_to_the_training_process() -> None:
    """Ctrl-C, or a notebook's Stop (SIGINT to the whole process group), is for the training
    process: a persistent worker that died of it failed every later epoch ("DataLoader worker
    exited unexpectedly"); the DataLoader stops its workers itself (SIGTERM at exit)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_when_the_training_process_goes()


def _quiet_when_the_training_process_goes() -> None:
    """A batch's memory reaches the training process as a file descriptor that it fetches from
    this worker's ``multiprocessing.resource_sharer`` thread. A training process stopped by
    Ctrl-C in the middle of a fetch leaves that thread a broken connection, whose traceback it
    prints (through ``sys.excepthook``) into the user's own Ctrl-C traceback. Only that one is
    dropped: the thread serves on, and every other error is printed as before."""
    previous = sys.excepthook
    if getattr(previous, "quiet_resource_sharer", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (ConnectionError, EOFError)) and _passes_through_resource_sharer(tb):
            return
        previous(kind, value, tb)

    hook.quiet_resource_sharer = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _passes_through_resource_sharer(tb: Any) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        tb = tb.tb_next
    return False


def _refuse_classes_of_a_notebook(*objects: Any) -> None:
    """A loader or Config class defined in a notebook lives in a ``__main__`` with no file:
    spawned workers cannot import it (each would fail with "Can't get attribute")."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__file__", None):
        return  # a script: spawn imports it again as __mp_main__
    for obj in objects:
        cls = obj if isinstance(obj, type) else type(obj)
        if cls.__module__ == "__main__":
            raise RuntimeError(
                f"as_torch_dataset: {cls.__name__} is defined in a notebook or an interactive "
                "session (a __main__ without a file), which spawn and forkserver DataLoader workers "
                "cannot import; move it into a .py file beside the notebook and import it from there"
            )


def _refuse_inherited_tensorstore(dicts: list[dict[str, Any]]) -> None:
    """One line, instead of tensorstore's abort, in a forked worker whose parent had read a local
    store before starting it."""
    from store import reader_share as local

    if all(is_url(str(d["source"])) for d in dicts) or not local.tensorstore_used_before_fork():
        return
    raise RuntimeError(
        "as_torch_dataset: this training process read the store (a folder or s3://) with "
        "tensorstore before the DataLoader forked its workers (any read counts, a validation "
        "loop between epochs included, and a RandomPatchDataLoader's batch_elements, which read "
        "the scans' class locations), which tensorstore forbids; start the workers first "
        "(persistent_workers=True keeps them), or pass multiprocessing_context='forkserver' "
        "(a script needs an `if __name__ == '__main__':` guard for it, a notebook does not)"
    )


__all__ = ["TorchBatches", "usable_cores"]

"""``loader.as_torch_dataset(channels_first=False)``: a torch ``IterableDataset`` of ``(x, y)``.

For ``DataLoader(ds, batch_size=None, num_workers=k)``: worker w of k reads batches
``w, w + k, ...`` of the loader's epoch (its order, sharding and state) through the loader's
read-ahead layer; torch hands them out round-robin, so the batches come once each, in order,
whatever k. A worker rebuilds the loader in its own process from plain data (the config,
dataset dicts, settings and ``state_dict``) instead of inheriting open tensorstore contexts or
httpx connections, which do not survive ``fork``; tensorstore refuses to run in a forked child
at all, so when the program has not chosen a start method, ``as_torch_dataset`` selects
``forkserver`` (Python 3.14's default). Call ``ds.set_epoch(e)`` before each epoch, as with
torch's ``DistributedSampler``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from loaders.catalog import forget_shared_sources, is_url

if TYPE_CHECKING:
    from loaders.base import DataLoader


def _torch_base() -> type:
    try:
        import torch.utils.data
    except ImportError:
        raise ImportError('as_torch_dataset needs PyTorch: pip install -e ".[torch]"') from None
    return torch.utils.data.IterableDataset


def _choose_start_method() -> None:
    # tensorstore aborts a forked child that uses it; forkserver/spawn workers start clean.
    if multiprocessing.get_start_method(allow_none=True) is None:
        multiprocessing.set_start_method("forkserver")


class TorchBatches(_torch_base()):  # type: ignore[misc]
    """``loader.as_torch_dataset(channels_first=False)``: see the module docstring."""

    def __init__(self, loader: DataLoader, channels_first: bool = False) -> None:
        super().__init__()
        dicts, settings = loader._recipe
        for d in dicts:
            if not isinstance(d["source"], str):
                raise TypeError(
                    f"as_torch_dataset: scan {d['scan_id']!r} has a source object, not a path or URL; "
                    "torch workers reopen sources by path or URL"
                )
        _choose_start_method()
        self.channels_first = bool(channels_first)
        self._recipe = (type(loader), loader.cfg.copy(), dicts, settings)
        self._loader: DataLoader | None = loader
        self._state: dict[str, Any] | None = None
        self._owner_pid = os.getpid()

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass reads (from its first batch), as ``DistributedSampler.set_epoch``."""
        self._current().set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._current())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_state"] = self._current().state_dict()
        state["_loader"] = None  # workers rebuild it; open sources are not sent
        return state

    def _current(self) -> DataLoader:
        if self._loader is not None and os.getpid() == self._owner_pid:
            return self._loader
        if self._loader is not None:  # inherited through fork: its sources belong to the parent
            if not all(is_url(str(d["source"])) for d in self._recipe[2]):
                raise RuntimeError(
                    "as_torch_dataset: tensorstore cannot read a local store in a forked worker; "
                    "use DataLoader(..., multiprocessing_context='forkserver') or 'spawn'"
                )
            self._state = self._loader.state_dict()
            forget_shared_sources()
        cls, cfg, dicts, settings = self._recipe
        loader = cls(cfg, dicts, **settings)
        if self._state is not None:
            loader.load_state_dict(self._state)
        self._loader, self._owner_pid = loader, os.getpid()
        return loader

    def _tensors(self, batch: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
        import torch

        out = []
        for a in batch:
            if self.channels_first and a.ndim >= 3:
                a = np.moveaxis(a, -1, 1)
            out.append(torch.from_numpy(np.ascontiguousarray(a)))
        return tuple(out)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        import torch.utils.data

        loader = self._current()
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        start = loader._position
        indices = range(start + worker, len(loader), workers)
        for index, batch in loader.batches_of(loader.epoch, indices):
            if info is None:
                loader._position = index + 1
            yield self._tensors(batch)
        if info is None:
            loader._position = 0

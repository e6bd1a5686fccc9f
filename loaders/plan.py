"""An epoch's plan and its batches: which examples an epoch holds, in which order, grouped
into which batches, and how those batches are dealt to reader processes. Mixed into
``loaders.base.DataLoader``; the plan is a pure function of the seed, the epoch and the shard
(``loaders.ordering``), so order, sharding, workers and resume all derive from it.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from loaders.blocks import BlockBuffer, block_ids, block_key
from loaders.config import Config
from loaders.ordering import Shard, batch_groups, resumed_lanes, shard_block_order, worker_batches
from loaders.scans import ScanEntry

# (epoch, elements, the examples this rank reads in order, block buffer, group of each batch)
Plan = tuple[int, list[Any], list[int], BlockBuffer | None, list[int]]


class _Loader(Protocol):
    """What the plan uses of the loader it belongs to (``loaders.base.DataLoader``)."""

    _cfg: Config
    scans: list[ScanEntry]
    seed: int
    shard: Shard
    shuffle: bool
    is_test: bool
    drop_last: bool
    batch_size: int
    epoch: int
    pad_mode: str
    reads_blocks: bool
    _unlabelled: frozenset[int]
    _plan: Plan
    _position: int
    _position_workers: int

    def __len__(self) -> int: ...
    def epoch_elements(self, epoch: int) -> list[Any]: ...
    def examples_note(self) -> str: ...
    def _make_plan(self, epoch: int) -> Plan: ...
    def _plan_for(self, epoch: int) -> Plan: ...
    def _num_elements(self) -> int: ...
    def _batches_in(self, plan: Plan) -> int: ...
    def worker_lanes(
        self, epoch: int, workers: int, position: int = 0, position_workers: int = 1
    ) -> list[list[int]]: ...


class EpochPlanning:
    """``_make_plan``, ``len()``, ``batch_elements`` and ``worker_lanes``, mixed into ``DataLoader``."""

    def _make_plan(self: _Loader, epoch: int) -> Plan:
        elements = list(self.epoch_elements(epoch))
        if self._unlabelled:  # batches hold labelled scans; inference_elements still has them all
            elements = [e for e in elements if e.scan not in self._unlabelled]
        first = getattr(self, "_examples_per_epoch", None)
        if first is None:
            self._examples_per_epoch = len(elements)
        elif len(elements) != first:
            # Keras takes len() once, from the first epoch: later epochs of another length would
            # be cut short or run into the next, silently
            raise ValueError(
                f"{type(self).__name__}.epoch_elements({epoch}) gave {len(elements)} examples, the first "
                f"epoch {first}: every epoch needs the same number (draw a fixed count per epoch)"
            )
        window = int(self._cfg.SHUFFLE_BLOCKS)
        blocks = self.reads_blocks and window > 0 and bool(elements)
        keys = [block_key(e, self.scans) for e in elements] if blocks else []
        scan_of = [e.scan for e in elements]
        order = shard_block_order(
            self.seed, epoch, scan_of, block_ids(keys) if blocks else None, self.shuffle, window, self.shard
        ).tolist()
        buffer = None
        if blocks:
            background = bool(self._cfg.INCLUDE_BACKGROUND)
            # the order keeps about two windows of blocks in use at a time (the current one and
            # the one read ahead); the LRU bound only matters for other access patterns
            buffer = BlockBuffer(self.scans, elements, order, keys, self.pad_mode, background, 2 * window + 2)
            ids = block_ids(keys)
            groups = batch_groups([ids[i] for i in order], self.batch_size, window)
        else:
            groups = list(range(math.ceil(len(order) / self.batch_size)))
        return epoch, elements, order, buffer, groups

    def _check_has_batches(self: _Loader) -> None:
        """Refuse, now and in one line, a batch_size or num_replicas that leaves an epoch without
        a batch (instead of an IndexError at the first one)."""
        examples = len(self._plan[1])
        if examples == 0 or len(self) > 0:
            return
        replicas = self.shard.num_replicas
        if replicas > examples:
            raise ValueError(f"num_replicas={replicas} is more than the {examples} examples of this data set")
        raise ValueError(
            f"batch_size={self.batch_size} is more than the {self._num_elements()} examples "
            + (f"of rank {self.shard.rank} (of {replicas})" if replicas > 1 else "of this data set")
            + self.examples_note()
            + " and drop_last=True leaves no batch"
        )

    def _warn_of_a_sharded_test_loader(self: _Loader) -> None:
        """A sharded test loader skips the examples left over by the ranks' equal shares (so
        that DDP's collective calls line up): said, since validation figures then leave some
        out every epoch."""
        replicas = self.shard.num_replicas
        left = len(self._plan[1]) % replicas
        if self.is_test and replicas > 1 and left and self.shard.rank == 0:
            import warnings

            warnings.warn(
                f"a test loader sharded over {replicas} ranks skips the {left} example(s) left over by "
                f"their equal shares of {len(self._plan[1])} every epoch; inference() and "
                "write_predictions go over every scan (on one rank)",
                UserWarning,
                stacklevel=3,
            )

    def _plan_for(self: _Loader, epoch: int) -> Plan:
        plan = self._plan
        return plan if plan[0] == epoch else self._make_plan(epoch)

    def _num_elements(self: _Loader) -> int:
        return len(self._plan[2])

    def __len__(self: _Loader) -> int:
        return self._batches_in(self._plan)

    def _batches_in(self: _Loader, plan: Plan) -> int:
        n = len(plan[2])
        if not self.is_test and self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def worker_lanes(
        self: _Loader, epoch: int, workers: int, position: int = 0, position_workers: int = 1
    ) -> list[list[int]]:
        """The batches each of ``workers`` reader processes reads of ``epoch`` (``loaders.ordering``):
        whole block groups dealt round-robin, so no two processes decode the same blocks; from
        ``position`` on (counted in the delivery order of ``position_workers`` processes), the
        rest of that order dealt so that taking turns delivers it unchanged."""
        groups = self._plan_for(epoch)[4][: len(self)]
        if position > 0:
            return resumed_lanes(worker_batches(groups, position_workers), position, workers)
        return worker_batches(groups, workers)

    def remaining_batches(self: _Loader) -> list[int]:
        """The batch indices of the current epoch still to come, in order (``state_dict``'s position)."""
        return self.worker_lanes(self.epoch, 1, self._position, self._position_workers)[0]

    def batch_elements(self: _Loader, index: int, epoch: int | None = None) -> list[Any]:
        """The elements of batch ``index`` of ``epoch`` (default: the current one)."""
        elements, order = self._plan_for(self.epoch if epoch is None else epoch)[1:3]
        start = index * self.batch_size
        return [elements[i] for i in order[start : min(start + self.batch_size, len(order))]]

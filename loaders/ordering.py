"""The epoch order: which examples, in which order, each replica reads in an epoch.

Everything here is a pure function of ``(seed, epoch)`` and the examples' scans, so that
sharding (every rank computes the same order and takes its own block), exact resume (a
restored loader recomputes the order instead of replaying a random state) and any smarter
shuffle all build on one definition. Nothing holds a random state between epochs.

The shuffle is *stratified by scan*: each scan's examples are shuffled, then spread evenly
over the epoch (example ``j`` of a scan with ``c`` examples goes to ``(j + u) / c`` of the
way through, ``u`` uniform in [0, 1)). Every example still comes once per epoch in an order
that changes every epoch, but a batch mixes scans as much as the data set allows: with a
plain permutation about 1% of the batches of 16 drawn from 16 scans come from fewer than 8
scans; here practically none do (``tests/test_training_scale.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Separates the order's random stream from the patch sampler's (which uses (seed, epoch)).
_ORDER_STREAM = 0x5CA7
_BLOCK_STREAM = 0xB10C


@dataclass(frozen=True)
class Shard:
    """Replica ``rank`` of ``num_replicas`` data-parallel replicas."""

    num_replicas: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if int(self.num_replicas) < 1:
            raise ValueError(f"num_replicas must be positive, got {self.num_replicas}")
        if not 0 <= int(self.rank) < int(self.num_replicas):
            raise ValueError(f"rank must be within 0..{int(self.num_replicas) - 1}, got {self.rank}")

    def block(self, n: int) -> slice:
        """This rank's share of an epoch of ``n`` examples: ``n // num_replicas`` of them, a
        contiguous block of the epoch order. The ``n % num_replicas`` left over are skipped
        (different ones every shuffled epoch), so ranks are disjoint and equally long."""
        per_rank = n // self.num_replicas
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def epoch_order(seed: int, epoch: int, scan_of: Sequence[int], shuffle: bool) -> np.ndarray:
    """The order (indices into the examples) of epoch ``epoch``; ``scan_of[i]`` is example i's scan.

    Unshuffled: the examples as built. Shuffled: stratified by scan (module docstring),
    deterministic from ``(seed, epoch)``.
    """
    n = len(scan_of)
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng((int(seed), _ORDER_STREAM, int(epoch)))
    scans = np.asarray(scan_of, dtype=np.int64)
    shuffled = rng.permutation(n)  # a random order within each scan, after the stable sort below
    by_scan = shuffled[np.argsort(scans[shuffled], kind="stable")]
    sorted_scans = scans[by_scan]
    starts = np.flatnonzero(np.r_[True, sorted_scans[1:] != sorted_scans[:-1]])
    counts = np.diff(np.r_[starts, n])
    rank_in_scan = np.arange(n) - np.repeat(starts, counts)
    position = (rank_in_scan + rng.random(n)) / np.repeat(counts, counts)
    return by_scan[np.argsort(position, kind="stable")]


def shard_order(seed: int, epoch: int, scan_of: Sequence[int], shuffle: bool, shard: Shard) -> np.ndarray:
    """The examples rank ``shard.rank`` reads in ``epoch``, in order."""
    return epoch_order(seed, epoch, scan_of, shuffle)[shard.block(len(scan_of))]


def block_epoch_order(
    seed: int, epoch: int, scan_of: Sequence[int], block_of: Sequence[int], shuffle: bool, window: int
) -> np.ndarray:
    """The order of epoch ``epoch`` when examples come in *blocks* (``block_of[i]``: example i's
    block, e.g. the slices of one scan that share an inner chunk, so a block is decoded once).

    Shuffled, the blocks are ordered first, each scan's blocks evenly spaced over the epoch
    (block ``j`` of a scan with ``c`` blocks at ``(j + u) / c``, one uniform ``u`` per scan, so
    two blocks of a scan are never closer than the data set allows); then every ``window``
    consecutive blocks are interleaved: one example of each block (in a random order, a new
    one every round), then a second of each, and so on, each block's examples in a random
    order. So ``window`` consecutive examples come from ``window`` different blocks (and, with
    at least ``window`` scans, mostly different scans), while a block's examples all fall
    within ``window`` x its size examples of each other: reading a block once serves them all
    from a buffer of about ``window`` blocks. ``window <= 0``: the per-example order
    (:func:`epoch_order`). Deterministic from ``(seed, epoch)``; unshuffled: as built.
    """
    n = len(scan_of)
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    if window <= 0:
        return epoch_order(seed, epoch, scan_of, shuffle)
    if len(block_of) != n:
        raise ValueError(f"block_of has {len(block_of)} entries for {n} examples")
    rng = np.random.default_rng((int(seed), _BLOCK_STREAM, int(epoch)))
    scans = np.asarray(scan_of, dtype=np.int64)
    _, block = np.unique(np.asarray(block_of, dtype=np.int64), return_inverse=True)
    num_blocks = int(block.max()) + 1
    block_scan = np.zeros(num_blocks, np.int64)
    block_scan[block] = scans
    # block positions: a random order within each scan, each scan's blocks evenly spaced
    shuffled = rng.permutation(num_blocks)
    by_scan = shuffled[np.argsort(block_scan[shuffled], kind="stable")]
    sorted_scans = block_scan[by_scan]
    starts = np.flatnonzero(np.r_[True, sorted_scans[1:] != sorted_scans[:-1]])
    counts = np.diff(np.r_[starts, num_blocks])
    offset = rng.random(len(starts))  # one per scan
    rank_in_scan = np.arange(num_blocks) - np.repeat(starts, counts)
    position = (rank_in_scan + np.repeat(offset, counts)) / np.repeat(counts, counts)
    block_rank = np.empty(num_blocks, np.int64)
    block_rank[by_scan[np.lexsort((rng.random(num_blocks), position))]] = np.arange(num_blocks)
    # examples grouped by block in block order, in a random order within each block
    examples = rng.permutation(n)
    examples = examples[np.argsort(block_rank[block[examples]], kind="stable")]
    ranks = block_rank[block[examples]]
    starts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]])
    counts = np.diff(np.r_[starts, n])
    round_in_block = np.arange(n) - np.repeat(starts, counts)
    window_of = ranks // int(window)
    return examples[np.lexsort((rng.random(n), round_in_block, window_of))]


def shard_block_order(
    seed: int,
    epoch: int,
    scan_of: Sequence[int],
    block_of: Sequence[int] | None,
    shuffle: bool,
    window: int,
    shard: Shard,
) -> np.ndarray:
    """The examples rank ``shard.rank`` reads in ``epoch``: :func:`block_epoch_order` when the
    examples have blocks, else :func:`epoch_order`; a contiguous block of it per rank."""
    if block_of is None:
        return shard_order(seed, epoch, scan_of, shuffle, shard)
    return block_epoch_order(seed, epoch, scan_of, block_of, shuffle, window)[shard.block(len(scan_of))]


# -- division between worker processes ------------------------------------------------------------
# A rank's epoch is a list of batches; with k reader processes (torch DataLoader workers) each
# process reads its own batches and torch hands them out round-robin. Which process reads which
# batch is a pure function of the epoch's batch *groups* and k, so every process computes its
# share alone, the delivered order is known in advance (resume), and no two processes decode
# the same blocks: a group is a run of batches cut from the same window of blocks.


def batch_groups(block_of_ordered: Sequence[int], batch_size: int, window: int) -> list[int]:
    """Group of each batch of an epoch whose examples come in interleaved blocks (the order of
    :func:`block_epoch_order`; ``block_of_ordered[j]``: the block of the j-th example read).

    Blocks are numbered by first appearance; the block window of batch b is that of its first
    example (``number // window``). Batches of one window share blocks, so they stay together
    in one process; a batch that straddles two windows decodes a few blocks twice at most."""
    first_seen: dict[int, int] = {}
    window_of = [
        first_seen.setdefault(int(b), len(first_seen)) // max(1, int(window)) for b in block_of_ordered
    ]
    return [window_of[start] for start in range(0, len(window_of), max(1, int(batch_size)))]


def worker_batches(groups: Sequence[int], workers: int) -> list[list[int]]:
    """The batches each of ``workers`` processes reads, in its order.

    Whole groups are dealt round-robin in order of first appearance (group i to process
    i % workers) as long as every process gets one more; the batches of the groups left over
    (fewer than ``workers``) are dealt one at a time, so no process reads more than a group
    beyond the others (those few groups' blocks are decoded by several processes)."""
    workers = max(1, int(workers))
    rank_of: dict[int, int] = {}
    for group in groups:
        rank_of.setdefault(group, len(rank_of))
    whole = len(rank_of) - len(rank_of) % workers
    lanes: list[list[int]] = [[] for _ in range(workers)]
    rest = 0
    for index, group in enumerate(groups):
        rank = rank_of[group]
        if rank < whole:
            lanes[rank % workers].append(index)
        else:
            lanes[rest % workers].append(index)
            rest += 1
    return lanes


def delivery_order(lanes: Sequence[Sequence[int]]) -> list[int]:
    """The order torch's ``DataLoader`` hands out the lanes' batches: one from each process in
    turn, skipping a process once it has run out (as torch does for an ``IterableDataset``)."""
    out: list[int] = []
    depth = max((len(lane) for lane in lanes), default=0)
    for j in range(depth):
        out.extend(lane[j] for lane in lanes if j < len(lane))
    return out


def resumed_lanes(lanes: Sequence[Sequence[int]], position: int, workers: int) -> list[list[int]]:
    """The lanes of ``workers`` processes that deliver what remains of an epoch that ``lanes``
    delivered up to ``position``: the rest of its order, dealt round-robin so that torch's
    turn-taking from the first process on gives exactly that rest, whatever ``workers`` is."""
    rest = delivery_order(lanes)[max(0, int(position)) :]
    workers = max(1, int(workers))
    return [rest[w::workers] for w in range(workers)]

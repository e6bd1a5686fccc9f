"""A loader under ``torch.distributed`` (torchrun, DDP): sharding that does not match the
process group is said, once, in one line.

The loader cannot learn its shard from the process group itself: a validation or test loader
built on one rank only is a common pattern, and a collective call (to compare the ranks'
settings) made there would hang the ranks that never build it. So it checks what this process
can see alone: a training loader left unsharded in a group of several ranks (every rank would
read the whole data set: an epoch N times as long, the same batches on every GPU), and a
``num_replicas``/``rank`` other than the group's (two ranks given ``rank=0`` read the same
shard). Groups whose data-parallel ranks are not the global ones (tensor or pipeline parallel
inside a node) see a warning, never a refusal.
"""

from __future__ import annotations

import sys
import warnings

from loaders.ordering import Shard


def _group() -> tuple[int, int] | None:
    """``(rank, world_size)`` of an initialized torch process group; None otherwise (or when
    torch is not imported: no process group can exist then)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        return int(dist.get_rank()), int(dist.get_world_size())
    except (RuntimeError, ValueError, AttributeError):
        return None


def sharding_note(
    shard: Shard, is_test: bool, group: tuple[int, int] | None, shuffle: bool = True
) -> str | None:
    """What is wrong with ``shard`` under ``group`` (``(rank, world_size)``), or None."""
    if group is None or group[1] <= 1:
        return None
    rank, world = group
    if shard.num_replicas == 1:
        if is_test or not shuffle:
            # a test or validation loader (MedSegPy's are unshuffled) on one rank, or each rank
            # evaluating it all: both fine
            return None
        return (
            f"this training loader reads the whole data set on each of the {world} ranks of the "
            f"torch process group: pass num_replicas={world}, rank={rank} (dist.get_world_size(), "
            "dist.get_rank()) to give each rank its own share"
        )
    if (shard.num_replicas, shard.rank) != (world, rank):
        return (
            f"this loader is shard rank={shard.rank} of num_replicas={shard.num_replicas}, but this "
            f"process is rank {rank} of {world} in the torch process group: two ranks given one "
            "shard read the same examples (fine only if your data-parallel ranks are not the group's)"
        )
    return None


def _in_a_torch_worker() -> bool:
    """A torch DataLoader worker rebuilds its training process's loader (and a forked one
    inherits the process group): the training process has said it already."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


def warn_of_a_process_group(shard: Shard, is_test: bool, shuffle: bool) -> None:
    note = sharding_note(shard, is_test, _group(), shuffle)
    if note is not None and not _in_a_torch_worker():
        warnings.warn(note, UserWarning, stacklevel=4)

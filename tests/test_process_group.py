"""A loader under a torch process group (torchrun, DDP): sharding that does not match the group
is warned of in one line; a machine's cores and default cache are divided among its ranks."""

from __future__ import annotations

import pytest

from loaders.ordering import Shard
from loaders.process_group import sharding_note
from store import reader_share


@pytest.mark.parametrize(
    ("shard", "is_test", "group", "says"),
    [
        (Shard(1, 0), False, None, None),  # no process group
        (Shard(1, 0), False, (0, 1), None),  # a group of one
        (Shard(2, 1), False, (1, 2), None),  # the group's own sharding
        (Shard(1, 0), True, (1, 2), None),  # a test loader may read it all on each rank
        (Shard(1, 0), False, (1, 4), "pass num_replicas=4, rank=1"),
        (Shard(2, 0), False, (1, 2), "shard rank=0 of num_replicas=2, but this process is rank 1 of 2"),
        (Shard(4, 1), True, (1, 2), "shard rank=1 of num_replicas=4, but this process is rank 1 of 2"),
    ],
)
def test_sharding_that_does_not_match_the_group_is_named(shard, is_test, group, says):
    note = sharding_note(shard, is_test, group)
    if shard.num_replicas == 1:  # an unshuffled loader left whole: validation on each rank, fine
        assert sharding_note(shard, is_test, group, shuffle=False) is None
    if says is None:
        assert note is None
    else:
        assert says in note and "\n" not in note


@pytest.mark.parametrize(
    ("value", "ranks"), [(None, 1), ("1", 1), ("4", 4), ("0", 1), ("four", 1), ("4_0", 1)]
)
def test_a_machines_ranks_share_its_cores_and_cache(monkeypatch, value, ranks):
    monkeypatch.setattr(reader_share, "_READERS", 1)  # this process is no torch worker
    monkeypatch.setattr(reader_share, "usable_cores", lambda: 16)
    monkeypatch.setattr(reader_share, "memory_bytes", lambda: 128 * 2**30)
    monkeypatch.delenv(reader_share.LOCAL_CACHE_ENV, raising=False)
    if value is None:
        monkeypatch.delenv(reader_share.LOCAL_RANKS_ENV, raising=False)
    else:
        monkeypatch.setenv(reader_share.LOCAL_RANKS_ENV, value)
    assert reader_share.local_ranks() == ranks
    assert reader_share.rank_cores() == 16 // ranks
    assert reader_share.default_cache_bytes() == max(
        reader_share.LOCAL_CACHE_MAX // ranks, reader_share.WORKER_CACHE_MIN
    )


def test_an_unshuffled_shard_of_fixed_examples_needs_no_seed(small_store):
    """Every rank computes the same order without a seed when nothing in it is random; a
    shuffled shard, or a random sampler's, still needs one."""
    from loaders import Config, DatasetCatalog, build_loader

    root, _ = small_store
    DatasetCatalog.remove("pg_unseeded")
    DatasetCatalog.register("pg_unseeded", root, split="train")
    try:
        shards = [
            build_loader(Config(SEED=None), "pg_unseeded", 1, True, False, False, num_replicas=2, rank=r)
            for r in (0, 1)
        ]
        read = [{(e.scan, e.window) for b in range(len(s)) for e in s.batch_elements(b)} for s in shards]
        assert read[0] and not read[0] & read[1]
        for tag, shuffle in (("DefaultDataLoader", True), ("RandomPatchDataLoader", False)):
            cfg = Config(SEED=None, TAG=tag, IMG_SIZE=(8, 8, 2, 1) if "Patch" in tag else (288, 288, 1))
            with pytest.raises(ValueError, match=r"num_replicas=2 needs cfg.SEED set"):
                build_loader(cfg, "pg_unseeded", 1, False, shuffle, False, num_replicas=2, rank=0)
    finally:
        DatasetCatalog.remove("pg_unseeded")

"""Stores of many scans: a LocalSource's caches of metadata and open arrays grow to the scans
a listing or a loader covers, so an epoch over more scans than their first bound reopens
nothing (an LRU smaller than the cycle it serves would miss on every scan, every epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorstore as ts
from conftest import build_store

import store.source
from loaders import Config, DatasetCatalog, build_loader, close_shared_sources
from store.lru import BoundedLRU
from store.source import LocalSource

SCANS = [(f"{i:07d}_V00-Aug00", (12, 10, 3), 3, "train", i, 0, 0, np.float32) for i in range(1, 11)]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many") / "store"
    return root, build_store(root, SCANS, image_only=())


def test_at_least_only_raises_the_bound():
    lru: BoundedLRU[int] = BoundedLRU(2)
    for key in "abc":
        lru.put(key, 1)
    assert len(lru) == 2 and lru.get("a") is None
    lru.at_least(1)
    assert lru.max_entries == 2
    lru.at_least(3)
    for key in "abcd":
        lru.put(key, 1)
    assert len(lru) == 3 and lru.get("b") is not None


def test_a_second_epoch_over_more_scans_than_the_first_bound_opens_no_array(many, monkeypatch):
    root, truth = many
    monkeypatch.setattr(store.source, "META_CACHE_ENTRIES", 3)
    monkeypatch.setattr(store.source, "ARRAY_CACHE_ENTRIES", 3)
    opened = [0]
    real_open = ts.open

    def counting_open(*args, **kwargs):
        opened[0] += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(store.source.ts, "open", counting_open)
    close_shared_sources()  # a fresh source, made under the small bounds
    DatasetCatalog.register("many_scans", str(root), split="train")
    try:
        cfg = Config(TAG="DefaultDataLoader", IMG_SIZE=(12, 10, 1), SEED=0, CATEGORIES=(0, 1, 2))
        loader = build_loader(cfg, "many_scans", 5, False, True, True)
        firsts = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            opened[0] = 0
            firsts.append([loader[b][0][:, 0, 0, 0].copy() for b in range(len(loader))])
            if epoch == 0:
                assert opened[0] >= len(SCANS)  # image and label map of every scan
        assert opened[0] == 0, f"{opened[0]} arrays opened again in the second epoch"
        # the batches are the store's voxels: every slice of every scan once an epoch
        want = sorted(float(image[0, 0, z]) for image, _ in truth.values() for z in range(image.shape[2]))
        for got in firsts:
            assert sorted(float(v) for v in np.concatenate(got)) == want
    finally:
        DatasetCatalog.remove("many_scans")
        close_shared_sources()


def test_a_listing_keeps_the_metadata_of_every_scan(many, monkeypatch):
    root, _ = many
    monkeypatch.setattr(store.source, "META_CACHE_ENTRIES", 3)
    source = LocalSource(root)
    assert len(source.list_scans()) == len(SCANS)
    reads = [0]
    real = source.storage.read

    def counting(*args, **kwargs):
        reads[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(source.storage, "read", counting)
    assert len(source.list_scans()) == len(SCANS)
    assert reads[0] == 0, f"{reads[0]} scan documents read again for the second listing"


def test_the_scans_expected_by_several_loaders_add_up(many, monkeypatch):
    """A training and a validation loader sharing one source: the caches hold both sets, not
    only the larger (600 + 200 scans would otherwise reopen 200 arrays a pass)."""
    root, _ = many
    monkeypatch.setattr(store.source, "META_CACHE_ENTRIES", 3)
    source = LocalSource(root)
    source.expect_scans([f"train_{i}" for i in range(600)])
    source.expect_scans([f"val_{i}" for i in range(200)])
    source.expect_scans([f"train_{i}" for i in range(10)])  # a scan expected twice counts once
    assert source._meta.max_entries == 800 + 64

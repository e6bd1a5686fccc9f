"""Derived arrays of store format 2 (label map, foreground locations), the label-map read path
and the I/O counters, each checked against an independent numpy reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from store.derived import LocationSampler, label_map_block, scan_seed
from store.label_map import class_rows
from store.protocol import RegionRequest
from store.source import LocalSource
from store.writer import write_scan
from tests.conftest import make_volume

SHAPE = (40, 36, 20)


def reference_merge(mask: np.ndarray, categories, background: bool) -> np.ndarray:
    """MedSegPy's collect_mask over the whole raw mask, written independently of the code."""
    channels = [sum(mask[..., k].astype(np.int64) for k in group) for group in categories]
    if background:
        channels.insert(0, np.all([c == 0 for c in channels], axis=0))
    return np.stack(channels, -1).astype(np.uint8)


@pytest.fixture(scope="module")
def derived_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("derived") / "store"
    image, mask = make_volume(SHAPE, 6, seed=3)
    overlapping = mask.copy()
    overlapping[5, 6, 17, :2] = 1  # one voxel with two classes, in the last slab only
    sparse = np.zeros_like(mask)
    sparse[10:12, 3:5, 2, 4] = 1  # a class with four voxels; the others empty
    scans = {"a_disjoint": mask, "b_overlap": overlapping, "c_sparse": sparse}
    for scan_id, m in scans.items():
        write_scan(root, scan_id, image, m, {"split": "train"})
    return root, image, scans


def test_label_map_is_argmax_of_mask_where_written(derived_store):
    root, _, scans = derived_store
    group = zarr.open_group(str(root), mode="r")
    for scan_id in ("a_disjoint", "c_sparse"):
        mask = scans[scan_id]
        assert group[scan_id].attrs["label_map"] is True
        expected = np.where(mask.any(-1), np.argmax(mask, -1) + 1, 0).astype(np.uint8)
        np.testing.assert_array_equal(group[scan_id]["label_map"][...], expected)
    assert group["b_overlap"].attrs["label_map"] is False
    assert "label_map" not in group["b_overlap"]


def test_mask_reads_through_table_equal_full_mask_merge(derived_store):
    root, _, scans = derived_store
    src = LocalSource(root, cache_bytes=0)
    rois = [":,:,:", "3:30,-20:,5:13", ":,:,7", "0:1,0:1,19"]
    cats_list = [None, [0, [1, 2], 3, [4, 5]], [[0, 5]], [5, 2], [[1, 3, 4]]]
    for scan_id, roi, cats, background in itertools.product(scans, rois, cats_list, (False, True)):
        region = src.region(scan_id, roi)
        want = reference_merge(
            scans[scan_id][region],
            [(k,) if isinstance(k, int) else tuple(k) for k in (cats or range(6))],
            background,
        )
        got = src.read_mask(scan_id, roi, categories=cats, background=background)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=f"{scan_id} {roi} {cats} {background}")


def test_locations_are_foreground_voxels_of_their_class(derived_store):
    root, _, scans = derived_store
    src = LocalSource(root)
    for scan_id, mask in scans.items():
        counts = src.metadata(scan_id).attrs["location_counts"]
        rows = src.read_locations(scan_id)
        assert rows is not None and rows.dtype == np.int32 and rows.shape == (sum(counts), 3)
        for k in range(6):
            mine = class_rows(rows, counts, k)
            voxels = int(mask[..., k].sum())
            assert len(mine) == min(voxels, 10_000)
            assert np.all(mask[mine[:, 0], mine[:, 1], mine[:, 2], k] == 1)
            assert len(np.unique(mine, axis=0)) == len(mine)
            np.testing.assert_array_equal(mine, mine[np.lexsort((mine[:, 2], mine[:, 1], mine[:, 0]))])
    assert src.metadata("c_sparse").attrs["location_counts"] == [0, 0, 0, 0, 4, 0]


def test_location_sample_is_bounded_and_independent_of_slab_size():
    _, mask = make_volume((30, 30, 16), 2, seed=5)
    results = []
    for step in (1, 4, 16):
        sampler = LocationSampler(mask.shape[:3], 2, scan_seed("x"), limit=300)
        for z0 in range(0, 16, step):
            block = mask[:, :, z0 : z0 + step]
            sampler.add(z0, block, label_map_block(block) if step != 4 else None)
        results.append(sampler.result())
    for rows, counts in results:
        assert counts == [300, 300]
        np.testing.assert_array_equal(rows, results[0][0])
    other = LocationSampler(mask.shape[:3], 2, scan_seed("y"), limit=300)
    other.add(0, mask)
    assert not np.array_equal(other.result()[0], results[0][0])  # the seed is the scan id


def test_label_map_block_refuses_overlap_and_non_binary():
    mask = np.zeros((2, 2, 1, 3), np.uint8)
    mask[0, 0, 0, 2] = 1
    np.testing.assert_array_equal(label_map_block(mask)[..., 0], [[3, 0], [0, 0]])
    mask[0, 0, 0, 1] = 1
    assert label_map_block(mask) is None
    mask[0, 0, 0, 1] = 0
    mask[1, 1, 0, 0] = 2
    assert label_map_block(mask) is None


def test_io_counters_count_chunk_bytes_and_returned_bytes(derived_store):
    root, image, _ = derived_store
    src = LocalSource(root)
    assert src.io_counters() == {"bytes_decoded": 0, "bytes_returned": 0, "read_s": 0.0, "regions": 0}
    # inner chunks are (64, 64, 8) capped to the volume: (40, 36, 8); z 7..9 touches 2 of them
    out = src.read_regions(
        [
            RegionRequest("a_disjoint", "image", "0:10,0:10,7:9"),
            RegionRequest("a_disjoint", "mask", ":,:,0", ((0,), (1, 2)), True),
        ]
    )
    counters = src.io_counters()
    assert counters["regions"] == 2
    assert counters["bytes_returned"] == out[0].nbytes + out[1].nbytes == 10 * 10 * 2 * 4 + 40 * 36 * 3
    # image: 2 chunks of float32; mask through the uint8 label map: 1 chunk
    assert counters["bytes_decoded"] == 2 * 40 * 36 * 8 * 4 + 40 * 36 * 8
    assert counters["read_s"] > 0
    np.testing.assert_array_equal(out[0], image[0:10, 0:10, 7:9])
    src.read_mask("b_overlap", ":,:,0")  # no label map: the (40, 36, 8, 6) mask chunk
    assert src.io_counters()["bytes_decoded"] == counters["bytes_decoded"] + 40 * 36 * 8 * 6


def test_http_source_counts_what_the_server_decoded(derived_store):
    from client.http import HttpSource
    from tests.live_server import live_server

    root = derived_store[0]
    requests = [
        RegionRequest("a_disjoint", "image", "0:10,0:10,7:9"),
        RegionRequest("b_overlap", "mask", ":,:,3", ((0,), (1, 2)), True),
    ]
    local = LocalSource(root)
    with live_server(root) as url, HttpSource(url) as remote:
        got = remote.read_regions(requests)
        single = remote.read_mask("a_disjoint", ":,:,0:2", categories=[[0, 1]])
        counters = remote.io_counters()
        for scan_id in ("a_disjoint", "c_sparse"):
            np.testing.assert_array_equal(remote.read_locations(scan_id), local.read_locations(scan_id))
    want = [*local.read_regions(requests), local.read_mask("a_disjoint", ":,:,0:2", categories=[[0, 1]])]
    for a, b in zip([*got, single], want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert counters["regions"] == 3
    assert counters["bytes_returned"] == sum(a.nbytes for a in want)
    assert (
        counters["bytes_decoded"]
        == local.io_counters()["bytes_decoded"]
        == (2 * 40 * 36 * 8 * 4 + 40 * 36 * 8 * 6 + 40 * 36 * 8)
    )

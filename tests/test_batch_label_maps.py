"""``POST /batch`` with ``label_maps``: masks of label-map scans travel as label map + table and
the client merges them; the result equals a numpy merge of the mask the store was written from."""

from __future__ import annotations

import itertools

import httpx
import numpy as np
import pytest
from live_server import live_server

from client.http import HttpSource
from client.wire import decode_batch, decode_npy_stream, encode_npy
from store.protocol import RegionRequest
from store.writer import write_scan
from tests.conftest import make_volume

SHAPE = (40, 36, 20)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_label_maps") / "store"
    image, mask = make_volume(SHAPE, 6, seed=5)
    overlapping = mask.copy()
    overlapping[5, 6, 17, :2] = 1  # two classes in one voxel: no label map for this scan
    masks = {"disjoint": mask, "overlap": overlapping}
    for scan_id, m in masks.items():
        write_scan(root, scan_id, image, m, {"split": "train"})
    with live_server(root) as url:
        yield url, image, masks


def numpy_merge(mask: np.ndarray, categories, background: bool) -> np.ndarray:
    groups = [list(range(mask.shape[-1]))] if categories is None else None
    channels = (
        [mask[..., k] for k in groups[0]]
        if groups
        else [mask[..., list(g)].astype(np.int64).sum(-1) for g in categories]
    )
    out = np.stack(channels, axis=-1).astype(np.int64)
    if background:
        out = np.concatenate([(out.sum(-1, keepdims=True) == 0), out], axis=-1)
    return out.astype(np.uint8)


def test_merged_on_the_client_equals_numpy(served):
    url, image, masks = served
    rois = [(slice(None), slice(None), slice(0, 8)), (slice(3, 30), slice(5, 36), slice(7, 8))]
    cats_list = [None, ((0,), (1, 2), (3,), (4, 5)), ((5, 0),), ((2,), (1, 3))]
    requests, expected = [], []
    for scan_id, roi, cats, background in itertools.product(masks, rois, cats_list, (False, True)):
        requests += [
            RegionRequest(scan_id, "image", roi),
            RegionRequest(scan_id, "mask", roi, cats, background),
        ]
        expected += [image[roi], numpy_merge(masks[scan_id][roi], cats, background)]
    with HttpSource(url, regions_per_request=5) as source:
        got = source.read_regions(requests)
        counters = source.io_counters()
    for arr, want in zip(got, expected, strict=True):
        assert arr.dtype == want.dtype and arr.flags.c_contiguous
        np.testing.assert_array_equal(arr, want)
    assert counters["bytes_returned"] == sum(a.nbytes for a in expected)


def test_the_wire_carries_label_maps_only_when_asked(served):
    url, _, masks = served
    regions = [
        {
            "scan_id": "disjoint",
            "array": "mask",
            "roi": ":,:,0:8",
            "categories": [0, [1, 2]],
            "background": True,
        },
        {"scan_id": "overlap", "array": "mask", "roi": ":,:,0:8"},
        {"scan_id": "disjoint", "array": "image", "roi": ":,:,0:8"},
    ]
    asked = httpx.post(f"{url}/batch", json={"regions": regions, "label_maps": True})
    assert asked.status_code == 200
    shapes = [a.shape for a in decode_npy_stream(asked.content)]
    # the label map and its (7 labels, background + 2 groups) table; the other scan merged
    assert shapes == [(40, 36, 8), (7, 3), (40, 36, 8, 6), (40, 36, 8)]
    plain = httpx.post(f"{url}/batch", json={"regions": regions})
    assert [a.shape for a in decode_npy_stream(plain.content)] == [
        (40, 36, 8, 3),
        (40, 36, 8, 6),
        (40, 36, 8),
    ]
    merged = decode_batch(asked.content, [True, True, False])
    for a, b in zip(merged, decode_npy_stream(plain.content), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(merged[0], numpy_merge(masks["disjoint"][:, :, 0:8], [(0,), (1, 2)], True))


def test_a_truncated_batch_is_a_one_line_error(served):
    url, _, _ = served
    body = httpx.post(
        f"{url}/batch",
        json={"regions": [{"scan_id": "disjoint", "array": "mask", "roi": ":,:,0"}], "label_maps": True},
    ).content
    arrays = decode_npy_stream(body)
    assert [a.ndim for a in arrays] == [3, 2]
    with pytest.raises(ValueError, match="a label map without its uint8 table"):
        decode_batch(encode_npy(arrays[0]), [True])
    with pytest.raises(ValueError, match="truncated"):
        decode_batch(body[:-1], [True])
    with pytest.raises(ValueError, match="end before region 1 of 2"):
        decode_batch(body, [True, False])
    with pytest.raises(ValueError, match="1 payloads left over"):
        decode_batch(body, [False])

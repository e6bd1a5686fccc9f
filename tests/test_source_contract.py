"""One ScanSource suite, run against LocalSource (a store path) and HttpSource (a real server).

References are built from the numpy arrays the store was written from, never from our readers.
What only the HTTP client has (tokens, retries, batch splitting) is tests/test_http_source.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from live_server import live_server

from client.http import HttpSource
from loaders import open_source
from store.errors import (
    ArrayNotFound,
    InvalidCategories,
    InvalidParameter,
    InvalidPath,
    InvalidROI,
    ScanNotFound,
)
from store.label_map import LabelRegion, apply_table, merged
from store.protocol import RegionRequest, ScanSource
from store.source import LocalSource

SCAN = "0000001_V00-Aug00"
INT_SCAN = "0000002_V00-Aug00"
IMAGE_ONLY = "0000003_V00-Aug01"


@pytest.fixture(scope="module")
def server_url(small_store):
    root, _ = small_store
    with live_server(root) as url:
        yield url


@pytest.fixture(params=["local", "http"])
def source(request, small_store):
    root, _ = small_store
    if request.param == "local":
        src = open_source(str(root))
        assert isinstance(src, LocalSource)
    else:
        src = open_source(request.getfixturevalue("server_url"), regions_per_request=4)
        assert isinstance(src, HttpSource)
    assert isinstance(src, ScanSource)
    yield src
    src.close()


def merged_reference(mask, categories, background):
    """MedSegPy's collect_mask + add_background_labels, written out with numpy."""
    channels = []
    for item in categories:
        group = item if isinstance(item, (list, tuple)) else [item]
        channels.append(np.sum([mask[..., k].astype(np.int64) for k in group], axis=0))
    out = np.stack(channels, axis=-1)
    if background:
        out = np.concatenate([(out.sum(-1, keepdims=True) == 0), out], axis=-1)
    return out.astype(np.uint8)


def test_list_scans_and_filters(source, small_store):
    _, truth = small_store
    assert [m.scan_id for m in source.list_scans()] == sorted(truth)
    assert [m.scan_id for m in source.list_scans(split="train")] == [SCAN, "0000001_V01-Aug00"]
    assert [m.scan_id for m in source.list_scans(split=["valid", "test"])] == [INT_SCAN, IMAGE_ONLY]
    assert [m.scan_id for m in source.list_scans(subject_id=1, time_point=1)] == ["0000001_V01-Aug00"]
    assert [m.scan_id for m in source.list_scans(augmentation=1)] == [IMAGE_ONLY]
    # a whole float or a numpy integer matches as the int does, read directly or over HTTP
    # (the server's integer filters take plain digits only: the client leaves those to itself)
    assert [m.scan_id for m in source.list_scans(subject_id=1.0, time_point=np.int64(1))] == [
        "0000001_V01-Aug00"
    ]
    assert [m.scan_id for m in source.list_scans(has_class=2)] == [SCAN, "0000001_V01-Aug00", INT_SCAN]
    assert source.list_scans(split="nope") == []


def test_has_class_takes_several_classes_and_class_names(source, small_store):
    """A list is any of its classes, as for the other filters; a name is a class of
    ``class_names`` (an unnamed class k is "class k"): both against numpy's voxel counts."""
    _, truth = small_store

    def having(*classes):
        return sorted(
            s for s, (_, m) in truth.items() if m is not None and any(m[..., k].any() for k in classes)
        )

    assert [m.scan_id for m in source.list_scans(has_class=[2, 3])] == having(2, 3)
    assert [m.scan_id for m in source.list_scans(has_class="class 3")] == having(3)
    assert [m.scan_id for m in source.list_scans(has_class=["class 1", 3])] == having(1, 3)
    assert source.list_scans(has_class="no such class") == []
    with pytest.raises(ValueError, match="has_class: expected a class index"):
        source.list_scans(has_class=1.5)


def test_metadata_matches_truth(source, small_store):
    _, truth = small_store
    for scan_id, (image, mask) in truth.items():
        meta = source.metadata(scan_id)
        assert meta.scan_id == scan_id and meta.shape == image.shape and meta.dtype == image.dtype.name
        assert meta.num_classes == (0 if mask is None else mask.shape[-1])
        if mask is not None:
            per_slice = mask.sum(axis=(0, 1)).tolist()  # (D, C)
            assert meta.class_voxels_per_slice() == per_slice
            assert meta.class_voxels() == mask.sum(axis=(0, 1, 2)).tolist()


def test_read_image_regions(source, small_store):
    _, truth = small_store
    image = truth[SCAN][0]
    np.testing.assert_array_equal(source.read_image(SCAN), image)
    np.testing.assert_array_equal(source.read_image(SCAN, "1:30,-10:,4"), image[1:30, -10:, 4:5])
    np.testing.assert_array_equal(
        source.read_image(SCAN, (slice(3, 9), slice(None), slice(-2, None))), image[3:9, :, -2:]
    )
    ints = source.read_image(INT_SCAN, ":,:,0:3")
    assert ints.dtype == np.int16
    np.testing.assert_array_equal(ints, truth[INT_SCAN][0][:, :, 0:3])


@pytest.mark.parametrize(
    ("categories", "background"),
    [(None, False), ([0, [1, 2], 3], True), ([[3, 0]], False), ([2], True)],
)
def test_read_mask_merges_categories(source, small_store, categories, background):
    _, truth = small_store
    mask = truth[SCAN][1]
    got = source.read_mask(SCAN, "2:33,:,1:6", categories, background)
    expected = merged_reference(mask[2:33, :, 1:6], categories or [0, 1, 2, 3], background)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_read_regions_keeps_order_over_split_batches(source, small_store):
    _, truth = small_store
    requests, expected = [], []
    for z in range(9):  # 18 regions: over several concurrent POST /batch for HttpSource
        scan = SCAN if z % 2 else "0000001_V01-Aug00"
        image, mask = truth[scan]
        roi = f":,{z}:{z + 20},{z}"
        requests.append(RegionRequest(scan, "image", roi))
        expected.append(image[:, z : z + 20, z : z + 1])
        requests.append(RegionRequest(scan, "mask", roi, ((1,), (0, 3)), True))
        expected.append(merged_reference(mask[:, z : z + 20, z : z + 1], [1, [0, 3]], True))
    arrays = source.read_regions(requests)
    assert len(arrays) == len(expected)
    for got, want in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert source.read_regions([]) == []


def test_read_unmerged_gives_label_maps_that_merge_to_the_mask(source, small_store):
    _, truth = small_store
    image, mask = truth[SCAN]
    requests = [
        RegionRequest(SCAN, "mask", "2:33,:,1:6", ((1,), (0, 3)), True),
        RegionRequest(SCAN, "image", "2:33,:,1:6"),
        RegionRequest(SCAN, "mask", ":,4:9,7"),
    ]
    label_region, image_region, plain = source.read_unmerged(requests)
    assert isinstance(label_region, LabelRegion), "the test store's classes never overlap: it has label maps"
    assert label_region.labels.shape == (31, mask.shape[1], 5) and label_region.labels.dtype == np.uint8
    np.testing.assert_array_equal(
        merged(label_region), merged_reference(mask[2:33, :, 1:6], [1, [0, 3]], True)
    )
    np.testing.assert_array_equal(merged(image_region), image[2:33, :, 1:6])
    np.testing.assert_array_equal(merged(plain), mask[:, 4:9, 7:8])
    # the table also writes any dtype straight into a caller's array (the loaders' float32 y)
    y = np.empty((*label_region.labels.shape, label_region.table.shape[1]), np.float32)
    apply_table(label_region.labels, label_region.table.astype(np.float32), out=y)
    np.testing.assert_array_equal(
        y, merged_reference(mask[2:33, :, 1:6], [1, [0, 3]], True).astype(np.float32)
    )
    assert source.read_unmerged([]) == []


def test_the_slice_major_hint_changes_layout_never_values(source, small_store):
    _, truth = small_store
    image, mask = truth[SCAN]
    hinted = [
        RegionRequest(SCAN, "image", "3:30,:,2:9", slice_major=True),
        RegionRequest(SCAN, "mask", "3:30,:,2:9", ((0, 1), (3,)), True, slice_major=True),
    ]
    got_image, got_mask = source.read_regions(hinted)
    np.testing.assert_array_equal(got_image, image[3:30, :, 2:9])
    np.testing.assert_array_equal(got_mask, merged_reference(mask[3:30, :, 2:9], [[0, 1], 3], True))
    labels = source.read_unmerged(hinted)[1]
    assert isinstance(labels, LabelRegion)
    # each z slice contiguous (what the block reads want): read so locally, sent so over HTTP
    assert got_image[:, :, 4].flags.c_contiguous and labels.labels[:, :, 4].flags.c_contiguous
    np.testing.assert_array_equal(labels.labels, mask[3:30, :, 2:9].argmax(-1) + mask[3:30, :, 2:9].any(-1))


def test_the_keep_in_cache_hint_never_changes_values(source, small_store):
    _, truth = small_store
    image, mask = truth[SCAN]
    for keep in (False, True, False):  # past the cache, into it, past it again: the same voxels
        got_image, got_mask = source.read_regions(
            [
                RegionRequest(SCAN, "image", "1:31,2:,0:7", keep_in_cache=keep),
                RegionRequest(SCAN, "mask", "1:31,2:,0:7", ((0, 1), (3,)), True, True, keep),
            ]
        )
        np.testing.assert_array_equal(got_image, image[1:31, 2:, 0:7])
        np.testing.assert_array_equal(got_mask, merged_reference(mask[1:31, 2:, 0:7], [[0, 1], 3], True))


def test_errors_have_the_same_types(source):
    with pytest.raises(ScanNotFound):
        source.metadata("0000009_V00-Aug00")
    with pytest.raises(KeyError):
        source.read_image("0000009_V00-Aug00")
    with pytest.raises(ArrayNotFound):
        source.read_mask(IMAGE_ONLY)
    with pytest.raises(InvalidROI) as roi_error:
        source.read_image(SCAN, "0:100")
    assert roi_error.value.param == "roi" and "out of bounds" in str(roi_error.value)
    with pytest.raises(ValueError):
        source.read_image(SCAN, "a:b")
    with pytest.raises(InvalidCategories) as cat_error:
        source.read_mask(SCAN, None, [0, 9])
    assert cat_error.value.param == "categories"
    with pytest.raises(InvalidPath):
        source.metadata("../etc")
    with pytest.raises(InvalidROI):
        source.read_regions([RegionRequest(SCAN, "image", "0:1"), RegionRequest(SCAN, "image", ":,:,50")])


@pytest.mark.parametrize(
    "roi",
    [(slice(0, 10, 2),), (slice(None, None, -1),), (slice(0.5, 3),), (slice(True, 3),), (3,)],
)
def test_slices_that_are_not_plain_whole_number_ranges_are_refused_alike(source, roi):
    """Never a step dropped or a bound rounded (other voxels, silently): both sources refuse."""
    with pytest.raises(InvalidROI):
        source.read_image(SCAN, roi)
    np.testing.assert_array_equal(
        source.read_image(SCAN, (slice(np.int64(1), np.int32(4)),)), source.read_image(SCAN, "1:4")
    )


def test_mask_fields_on_an_image_region_and_internal_arrays_are_refused_alike(source):
    for request, words in (
        (RegionRequest(SCAN, "image", "0:2", [0]), "only mask regions take categories"),
        (RegionRequest(SCAN, "image", "0:2", None, True), "only mask regions take background"),
        (RegionRequest(SCAN, "label_map", "0:2"), "invalid array name"),
    ):
        with pytest.raises((InvalidParameter, InvalidPath), match=words):
            source.read_regions([request])


def test_a_negative_has_class_is_refused_not_a_server_error(source):
    with pytest.raises(ValueError, match="has_class"):
        source.list_scans(has_class=-1)


def _read_in_child(root, out):
    try:
        LocalSource(root).read_image(SCAN, "0:2")
        out.put("read")
    except RuntimeError as err:
        out.put(str(err))


def test_a_forked_child_of_a_reading_process_gets_an_exception_not_an_abort(small_store):
    """tensorstore aborts a process forked after its parent read (SIGABRT, no Python error): a
    plain open_source user (a hand-written Dataset with fork workers) gets one line instead."""
    import multiprocessing

    root, _ = small_store
    LocalSource(root).read_image(SCAN, "0:2")  # this process has read with tensorstore
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_read_in_child, args=(str(root), out))
    child.start()
    said = out.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and said.startswith("this process was forked after its parent read a store")


def test_source_settings_are_checked_and_both_sources_close_alike(small_store, server_url):
    from store.errors import SourceClosed

    root, _ = small_store
    for kwargs, words in (
        ({"timeout": 0}, "timeout: must be more than 0 seconds"),
        ({"timeout": -1}, "timeout: must be more than 0 seconds"),
        ({"retries": -1}, "retries: must be a number, not negative"),
        ({"retries": 1.5}, "retries: must be a whole number"),
        ({"retry_seconds": -5}, "retry_seconds: must be a number, not negative"),
    ):
        with pytest.raises(ValueError, match=words):
            HttpSource(server_url, **kwargs)
    with pytest.raises(ValueError, match="cache_bytes: -1 is not a byte size"):
        LocalSource(root, cache_bytes=-1)
    assert LocalSource(root, cache_bytes="64M").cache_bytes == 64 * 2**20
    with LocalSource(root) as local, HttpSource(server_url) as remote:
        np.testing.assert_array_equal(local.read_image(SCAN, "0:2"), remote.read_image(SCAN, "0:2"))
    with pytest.raises(SourceClosed, match="this HttpSource was closed"):
        remote.read_image(SCAN, "0:2")


def test_a_source_pickles_as_its_settings_and_reads_the_same(source):
    """A Dataset holding a source goes to spawned workers by pickle: the copy reopens itself."""
    import pickle

    copy = pickle.loads(pickle.dumps(source))
    assert type(copy) is type(source) and copy is not source
    np.testing.assert_array_equal(copy.read_image(SCAN, "0:3"), source.read_image(SCAN, "0:3"))
    copy.close()

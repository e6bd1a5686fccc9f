"""The shard writer (store/shards.py) against independent readers, and the conversion's
streaming statistics against whole-array numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from store.format import ChunkLayout, array_metadata
from store.scratch import release_all, scratch
from store.writer import ScanStatistics, binary_class_counts, write_scan

DTYPES = ["float32", ">f4", "int16", "uint8", "float64", "bool", "uint16"]


def _image(rng: np.random.Generator, shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.3
    image = (rng.normal(0, 100, size=shape) * (rng.random(shape) < 0.7)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        image.flat[0] = -0.0  # bit-different from the fill value: must be stored, not skipped
    return image


def _read_both(path) -> tuple[np.ndarray, np.ndarray]:
    by_zarr = np.asarray(zarr.open_array(str(path), mode="r")[...])
    by_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
    return by_zarr, by_ts.read().result()


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 13), st.integers(1, 11), st.integers(1, 19)),
    chunks=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5)),
    shard_depth=st.integers(1, 9),
    codec=st.sampled_from(["blosc-lz4", "zstd", "none"]),
    dtype=st.sampled_from(DTYPES),
    classes=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_written_scan_reads_back_exactly_with_zarr_and_tensorstore(
    tmp_path_factory, shape, chunks, shard_depth, codec, dtype, classes, seed
):
    rng = np.random.default_rng(seed)
    image = _image(rng, shape, dtype)
    mask = (rng.random((*shape, classes)) < 0.2).astype(np.uint8) if classes else None
    if mask is not None and seed % 2:
        mask = np.asfortranarray(mask)  # no contiguous class axis: the byte-wise gather path
    layout = ChunkLayout(chunks=chunks, shard_depth=shard_depth, codec=codec)
    root = tmp_path_factory.mktemp("shards")
    write_scan(root, "0000001_V00-Aug00", image, mask, {}, layout)
    scan = root / "0000001_V00-Aug00"
    meta = json.loads((scan / "image" / "zarr.json").read_text())
    assert meta == array_metadata(shape, np.dtype(dtype).name, np.dtype(dtype).itemsize, layout)
    for stored in _read_both(scan / "image"):
        assert stored.dtype == np.dtype(dtype).newbyteorder("=")
        assert stored.tobytes() == image.astype(stored.dtype).tobytes()  # bit for bit, -0.0 too
    if mask is None:
        assert not (scan / "mask").exists()
    else:
        for stored in _read_both(scan / "mask"):
            np.testing.assert_array_equal(stored, mask)


def test_empty_chunks_and_shards_are_not_stored(tmp_path):
    """Chunks equal to the fill value are left out (as zarr-python and tensorstore do)."""
    image = np.zeros((8, 8, 8), np.float32)
    image[0, 0, 0] = 1.0
    layout = ChunkLayout(chunks=(4, 4, 4), shard_depth=4)
    write_scan(tmp_path, "0000001_V00-Aug00", image, np.zeros((8, 8, 8, 2), np.uint8), {}, layout)
    scan = (tmp_path / "0000001_V00-Aug00").resolve()  # the current version's folder
    shards_on_disk = sorted(p.relative_to(scan) for p in scan.rglob("c/*/*/*") if p.is_file())
    # the image's one shard, and its OME view's (the same chunks, store/ome_views.py)
    assert [str(p) for p in shards_on_disk] == ["image/c/0/0/0", "image_zyx/c/0/0/0"]
    data = (scan / shards_on_disk[0]).read_bytes()
    index = np.frombuffer(data[-4 - 2 * 8 * 4 : -4], "<u8").reshape(2, 2, 1, 2)
    assert (index[1:] == 2**64 - 1).all() and (index[0, 1] == 2**64 - 1).all()
    for stored in _read_both(tmp_path / "0000001_V00-Aug00" / "image"):
        np.testing.assert_array_equal(stored, image)


def test_numcodecs_blosc_writes_the_same_values(tmp_path):
    """The documented numcodecs compress path, read back by both zarr-python and tensorstore."""
    rng = np.random.default_rng(3)
    image, mask = _image(rng, (10, 9, 7), "float32"), (rng.random((10, 9, 7, 2)) < 0.5).astype(np.uint8)
    write_scan(tmp_path, "0000001_V00-Aug00", image, mask, {}, ChunkLayout(chunks=(4, 4, 2), shard_depth=4))
    for stored in _read_both(tmp_path / "0000001_V00-Aug00" / "image"):
        np.testing.assert_array_equal(stored, image)
    for stored in _read_both(tmp_path / "0000001_V00-Aug00" / "mask"):
        np.testing.assert_array_equal(stored, mask)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 70), width=st.integers(1, 70), classes=st.integers(1, 9), seed=st.integers(0, 2**16)
)
def test_binary_class_counts_match_numpy(height, width, classes, seed):
    plane = (np.random.default_rng(seed).random((height, width, classes)) < 0.6).astype(np.uint8)
    counts = binary_class_counts(plane)
    assert counts.dtype == np.int64
    assert counts.tolist() == plane.sum(axis=(0, 1)).tolist()


def test_binary_class_counts_do_not_overflow():
    """More than 255 ones per class in every group of rows: the uint8 partial sums must not wrap."""
    plane = np.ones((300, 700, 3), np.uint8)
    assert binary_class_counts(plane).tolist() == [300 * 700] * 3


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 30)),
    dtype=st.sampled_from(["float32", "int16", "uint8", "float64", "bool"]),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_streaming_statistics_match_numpy_slice_by_slice(shape, dtype, offset, seed):
    """Slices fed one at a time (the conversion's order) give whole-array numpy's figures."""
    rng = np.random.default_rng(seed)
    image = _image(rng, shape, dtype)
    if dtype.startswith("float"):
        image = (image + offset).astype(dtype)  # a large mean: the merge must not cancel
    stats = ScanStatistics(scratch=scratch("test-statistics", (shape[0] * shape[1],), np.float64))
    for z in range(shape[2]):
        stats.add_image(np.ascontiguousarray(image[:, :, z]))
    ref = image.astype(np.float64)
    got = stats.to_attrs()["intensity"]
    assert got["min"] == ref.min() and got["max"] == ref.max()
    assert got["mean"] == pytest.approx(ref.mean(), rel=1e-9, abs=1e-9)
    assert got["std"] == pytest.approx(ref.std(), rel=1e-7, abs=1e-7)
    release_all()


def test_scratch_buffers_are_reused_and_released():
    first = scratch("test-reuse", (100, 10), np.float32)
    again = scratch("test-reuse", (10, 100), np.float32)
    assert np.shares_memory(first, again) and again.flags.c_contiguous
    bigger = scratch("test-reuse", (1000, 100), np.float64)
    assert not np.shares_memory(first, bigger) and bigger.shape == (1000, 100)
    assert release_all() >= bigger.nbytes
    assert not np.shares_memory(bigger, scratch("test-reuse", (1000, 100), np.float64))


def test_a_scan_of_huge_finite_values_is_stored_with_an_unknown_std(tmp_path):
    """float64 voxels near 1e200 overflow the sum of squares: the scan is still written (it was
    refused as "not JSON compliant: nan"), exactly, with min, max and mean, and a null std."""
    image = np.zeros((4, 4, 2), np.float64)
    image[0, 0, 0] = 1e200
    image[1, 1, 1] = -np.finfo(np.float64).max
    mask = np.zeros((4, 4, 2, 1), np.uint8)
    write_scan(tmp_path / "store", "0000001_V00-Aug00", image, mask, {"split": "train"})
    scan = zarr.open_group(str(tmp_path / "store"), mode="r")["0000001_V00-Aug00"]
    np.testing.assert_array_equal(scan["image"][...], image)
    stats = scan.attrs["intensity"]
    assert (stats["min"], stats["max"], stats["std"]) == (-np.finfo(np.float64).max, 1e200, None)
    assert stats["mean"] == pytest.approx(float(image.mean()), rel=1e-12)

"""The preprocessing job on a LocalCluster: exact round trip, attributes, skip on re-run, layout."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from h5_sources import assert_store_matches, random_scan, read_store, write_slice_files, write_volume_file
from hypothesis import given, settings
from hypothesis import strategies as st

import service.preprocess as preprocess_module
from service.preprocess import CONVERTED, SKIPPED, run_preprocess
from service.sample_data import write_sample_data
from store.format import ChunkLayout
from store.source import LocalSource
from store.writer import scan_statistics


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory):
    """Phantoms (2D, float32) plus hand-made scans: int16 CT, big-endian, image-only, 3D."""
    root = tmp_path_factory.mktemp("mixed") / "source"
    write_sample_data(root, subjects=3, visits=2, shape=(32, 32, 6), num_classes=3, seed=1)
    image, mask = random_scan((24, 20, 7), 2, seed=5, dtype=np.int16)
    write_slice_files(root / "train", "0000101_V00-Aug00", image, mask)
    big_endian = random_scan((16, 16, 5), 2, seed=6)[0].astype(">f4")
    write_slice_files(root / "train", "0000102_V00-Aug00", big_endian, None)  # image-only
    volume, seg = random_scan((20, 18, 9), 3, seed=7, dtype=np.uint16)
    write_volume_file(root / "test" / "0000103_V01-Aug02.h5", volume, seg, spacing=[0.5, 0.5, 1.5])
    write_volume_file(root / "valid" / "knee_ct_scan.h5", volume[:, :, :4], None)
    (root / "README.txt").write_text("not an input")
    return root


@pytest.fixture(scope="module")
def converted(mixed_source, tmp_path_factory):
    store = tmp_path_factory.mktemp("mixed") / "store"
    log = io.StringIO()
    summary = run_preprocess(mixed_source, store, workers=2, progress=True, stream=log)
    return store, summary, log.getvalue()


def test_every_scan_converted_voxel_exact(mixed_source, converted):
    store, summary, _ = converted
    assert summary.failed == 0, summary.failures()
    assert summary.converted == 6 + 4 and summary.skipped == 0
    assert summary.exit_code == 0
    assert summary.bytes_in > 0 and summary.bytes_out > 0
    truth, stored = assert_store_matches(store, mixed_source)
    assert set(stored) == set(truth)
    assert stored["0000101_V00-Aug00"][1].dtype == np.int16
    assert stored["0000102_V00-Aug00"][1].dtype == np.float32  # native byte order in the store
    assert stored["0000103_V01-Aug02"][1].dtype == np.uint16


def test_scan_attributes(mixed_source, converted):
    store, _, _ = converted
    stored = read_store(store)
    attrs = stored["0000002_V01-Aug00"][0]
    assert (attrs["subject_id"], attrs["time_point"], attrs["augmentation"]) == (2, 1, 0)
    assert attrs["split"] == "valid" and attrs["source_format"] == "2d"
    assert attrs["sources"]["files"] == 12 and attrs["sources"]["bytes"] > 0
    assert len(attrs["fingerprint"]) == 64
    image, mask = stored["0000002_V01-Aug00"][1:]
    assert attrs["intensity"]["min"] == pytest.approx(float(image.min()))
    assert attrs["intensity"]["mean"] == pytest.approx(float(image.astype(np.float64).mean()))
    assert attrs["class_voxels_per_slice"] == mask.sum(axis=(0, 1)).tolist()
    volume_attrs = stored["0000103_V01-Aug02"][0]
    assert volume_attrs["spacing"] == [0.5, 0.5, 1.5] and volume_attrs["source_format"] == "3d"
    assert (volume_attrs["subject_id"], volume_attrs["time_point"], volume_attrs["augmentation"]) == (
        103,
        1,
        2,
    )
    other = stored["knee_ct_scan"][0]
    assert other["subject_id"] is None and other["num_classes"] == 0 and other["split"] == "valid"


def test_progress_lines_and_no_staging_left(converted):
    store, _, log = converted
    assert "preprocess: 10/10 scans (converted 10, skipped 0, failed 0)" in log
    assert not (store / ".staging").exists()


def test_store_reads_through_local_source(mixed_source, converted):
    store, _, _ = converted
    source = LocalSource(store)
    ids = {m.scan_id for m in source.list_scans(split="train")}
    assert "0000101_V00-Aug00" in ids and "0000001_V00-Aug00" in ids
    image = source.read_image("0000101_V00-Aug00", None)
    assert image.shape == (24, 20, 7) and image.dtype == np.int16


def test_rerun_skips_everything(mixed_source, converted, monkeypatch):
    store, _, _ = converted
    before = {p: p.stat().st_mtime_ns for p in store.rglob("zarr.json")}

    def no_cluster(*args, **kwargs):  # every scan is found done before a worker would start
        raise AssertionError("a re-run with nothing to convert started a Dask cluster")

    monkeypatch.setattr(preprocess_module, "dask_client", no_cluster)
    summary = run_preprocess(mixed_source, store, workers=1, progress=False)
    assert summary.skipped == 10 and summary.converted == 0 and summary.failed == 0
    assert {r.status for r in summary.results} == {SKIPPED}
    assert {p: p.stat().st_mtime_ns for p in store.rglob("zarr.json")} == before


def test_configured_layout_is_written_and_exact(tmp_path):
    source = tmp_path / "source"
    write_sample_data(source, subjects=1, visits=1, shape=(40, 36, 10), num_classes=2, splits=None)
    store = tmp_path / "store"
    layout = ChunkLayout.parse("16,16,4", shard_depth=8, codec="zstd")
    summary = run_preprocess(source, store, workers=1, layout=layout, progress=False)
    assert [r.status for r in summary.results] == [CONVERTED]
    assert_store_matches(store, source)
    meta = json.loads((store / "0000001_V00-Aug00" / "image" / "zarr.json").read_text())
    sharding = meta["codecs"][0]["configuration"]
    assert sharding["chunk_shape"] == [16, 16, 4]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [48, 48, 8]
    assert [c["name"] for c in sharding["codecs"]] == ["bytes", "zstd"]
    attrs = read_store(store)["0000001_V00-Aug00"][0]
    assert attrs["layout"] == layout.to_json() and attrs["split"] is None
    # no layout asked for: the stored scan keeps its own (tests/test_layouts.py has the CLI)
    kept = run_preprocess(source, store, workers=1, progress=False)
    assert [r.status for r in kept.results] == [SKIPPED]
    # a different layout asked for is a different fingerprint: the scan is redone, not skipped
    again = run_preprocess(source, store, workers=1, layout=ChunkLayout(), progress=False)
    assert [r.status for r in again.results] == [CONVERTED]
    assert_store_matches(store, source)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 40)),
    dtype=st.sampled_from(["float32", "int16", "uint8", "float64"]),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_scan_statistics_match_numpy(shape, dtype, classes, seed):
    """Blockwise statistics equal whole-array numpy (float64) up to rounding."""
    image, mask = random_scan(shape, classes, seed, dtype=np.dtype(dtype))
    stats = scan_statistics(image, mask, block_slices=7)
    ref = image.astype(np.float64)
    assert stats["intensity"]["min"] == ref.min() and stats["intensity"]["max"] == ref.max()
    assert stats["intensity"]["mean"] == pytest.approx(ref.mean(), rel=1e-9, abs=1e-9)
    assert stats["intensity"]["std"] == pytest.approx(ref.std(), rel=1e-7, abs=1e-9)
    assert stats["class_voxels_per_slice"] == mask.sum(axis=(0, 1)).tolist()
    assert stats["class_voxels"] == mask.sum(axis=(0, 1, 2)).tolist()
    assert scan_statistics(image, None)["class_voxels"] == []


def test_the_job_cluster_opens_no_dashboard_unless_asked():
    """With port 8787 held (as by another engineer's cluster) the job's LocalCluster neither warns
    nor listens there: its scheduler's HTTP routes take a free loopback port."""
    import socket
    import warnings

    from service.preprocess import dask_client

    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", 8787))
            holder.listen()
        except OSError:
            pass  # someone else holds it already: the same situation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with dask_client(None, 1, 1) as client:
                services = client.scheduler_info()["services"]
    assert not [w for w in caught if "8787" in str(w.message)], [str(w.message) for w in caught]
    assert services.get("dashboard") != 8787


def test_a_dashboard_asked_on_a_port_in_use_is_served_elsewhere_and_said_so(tmp_path):
    """``--dashboard 127.0.0.1:PORT`` with PORT held: Dask serves it on another port; the line
    names the address it is really at, and bokeh (the dashboard extra) is there to draw it."""
    import importlib.util
    import socket

    source = tmp_path / "source"
    write_sample_data(source, subjects=1, visits=1, shape=(16, 16, 4), num_classes=2, splits=None)
    out = io.StringIO()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        summary = run_preprocess(
            source, tmp_path / "store", workers=1, progress=False, stream=out, dashboard=f"127.0.0.1:{port}"
        )
    assert summary.converted == 1
    (line,) = [x for x in out.getvalue().splitlines() if "dashboard at" in x]
    assert line.startswith("preprocess: dashboard at http://127.0.0.1:") and f":{port}/" not in line
    assert line.endswith(f"/status (port {port} was in use)")
    assert importlib.util.find_spec("bokeh") is not None and "needs bokeh" not in out.getvalue()

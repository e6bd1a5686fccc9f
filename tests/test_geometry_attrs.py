"""Geometry and names of a scan (issue 20): the defaults for scans that record none, what a
scan records, the image's extra channels, and GET /scans/{id} giving them all."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import zarr
from conftest import make_volume
from live_server import live_server

from store.format import ScanMeta, extra_channel_arrays
from store.inventory import manifest_mismatch
from store.writer import write_scan


def _meta(**attrs):
    return ScanMeta.from_attrs({"scan_id": "s", "shape": [4, 5, 6], "dtype": "float32", **attrs})


@pytest.mark.parametrize("spacing", [[1.0, 1.0, 1.0], [0.365, 0.365, 0.7], [2.0, 0.5, 3.25]])
def test_defaults_follow_the_spacing(spacing):
    meta = _meta(num_classes=3, spacing=spacing)
    assert meta.spacing == tuple(spacing)
    np.testing.assert_array_equal(np.array(meta.affine), np.diag([*spacing, 1.0]))
    assert meta.source_affine == meta.affine
    assert meta.class_names == ["class 0", "class 1", "class 2"]
    assert meta.label_values == [1, 2, 3]
    assert (meta.channels, meta.channel_names) == (1, ["channel 0"])


def test_no_geometry_is_spacing_one_and_identity():
    meta = _meta(num_classes=0)
    assert meta.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(np.array(meta.affine), np.eye(4))
    assert meta.class_names == []


def test_recorded_values_win_and_short_name_lists_are_completed():
    affine = [[0.0, -1.0, 0.0, 10.0], [-2.0, 0.0, 0.0, 5.0], [0.0, 0.0, 3.0, -7.0], [0, 0, 0, 1]]
    meta = _meta(
        num_classes=3,
        spacing=[2.0, 1.0, 3.0],
        affine=affine,
        class_names=["femur"],
        label_values=[4, 9, 12],
        channels=2,
        channel_names=["T1", "T2"],
    )
    assert meta.affine == [[float(v) for v in row] for row in affine]
    assert meta.class_names == ["femur", "class 1", "class 2"]
    assert meta.label_values == [4, 9, 12]
    assert meta.channel_names == ["T1", "T2"]
    assert extra_channel_arrays(3) == ["image_c1", "image_c2"]


def test_bad_spacing_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^spacing: expected three positive finite numbers"):
        _ = _meta(spacing=[1.0, 0.0, 1.0]).spacing


def test_extra_channels_are_stored_beside_the_image(tmp_path):
    image, mask = make_volume((20, 18, 11), 2, seed=3)
    extra = [(image * 2 + 1).astype(np.float32), np.arange(image.size, dtype=np.int16).reshape(image.shape)]
    names = ["T1", "T2", "FLAIR"]
    attrs = write_scan(
        tmp_path / "store", "multi", image, mask, {"channel_names": names}, extra_channels=extra
    )
    assert attrs["channels"] == 3
    assert [c["label"] for c in attrs["ome"]["omero"]["channels"]] == names  # napari's layer names
    group = zarr.open_group(str(tmp_path / "store" / "multi"), mode="r")
    # one dtype for all channels, numpy's promotion (int16 with float32: float32, same values)
    np.testing.assert_array_equal(group["image"][:], image)
    for name, want in zip(["image_c1", "image_c2"], extra, strict=True):
        assert group[name].dtype == np.float32
        assert group[name].chunks == group["image"].chunks
        np.testing.assert_array_equal(group[name][:], want)
    # a version missing a channel's array is incomplete (never published as whole)
    sizes = {rel: size for rel, size in attrs["manifest"].items() if not rel.startswith("image_c2/")}
    assert manifest_mismatch(sizes, attrs) is not None


def test_extra_channel_of_another_shape_is_refused(tmp_path):
    image, _ = make_volume((8, 8, 4), 1, seed=1)
    with pytest.raises(ValueError, match=r"^s1: channel 1 has shape"):
        write_scan(tmp_path / "store", "s1", image, None, {}, extra_channels=[image[:, :, :3]])
    assert not (tmp_path / "store" / "s1").exists()


def test_scan_document_gives_geometry_and_names(tmp_path):
    root = tmp_path / "store"
    image, mask = make_volume((16, 12, 6), 2, seed=5)
    write_scan(root, "plain", image, mask, {})
    write_scan(root, "named", image, mask, {"spacing": [0.5, 0.5, 2.0], "class_names": ["bone", "cartilage"]})
    with live_server(root) as base, httpx.Client(base_url=base, timeout=30) as client:
        plain = client.get("/scans/plain").json()
        named = client.get("/scans/named").json()
        listing = {doc["scan_id"]: doc for doc in client.get("/scans").json()["scans"]}
    assert plain["spacing"] == [1.0, 1.0, 1.0]
    assert plain["affine"] == np.eye(4).tolist()
    assert plain["class_names"] == ["class 0", "class 1"]
    assert named["spacing"] == [0.5, 0.5, 2.0]
    assert named["affine"] == np.diag([0.5, 0.5, 2.0, 1.0]).tolist()
    assert named["class_names"] == ["bone", "cartilage"]
    assert listing["named"]["class_names"] == ["bone", "cartilage"]

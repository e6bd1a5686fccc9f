"""OME-Zarr (NGFF 0.5) metadata and views of scans, read back with independent readers:
ngff-zarr (with its validation), ome-zarr-py, ome-zarr-models, zarr-python and tensorstore."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorstore as ts
import zarr
from h5_sources import write_slice_files, write_volume_file
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from service.preprocess import run_preprocess
from store import ome, ome_views
from store.format import ChunkLayout
from store.shards import ShardedArrayWriter

SPACING = (0.365, 0.365, 0.7)  # [sy, sx, sz] as MedSegPy 3D files give it (service/sample_data.py)
ZYX_SCALE = [0.7, 0.365, 0.365]
VOLUME = "0000010_V00-Aug00"  # a 3D .h5 with a spacing attribute
SLICES = "0000011_V00-Aug00"  # 2D slice files: no spacing


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A MedSegPy source (a 3D volume with spacing, a 2D scan without) converted by the job."""
    root = tmp_path_factory.mktemp("ome")
    rng = np.random.default_rng(7)
    image = rng.normal(100, 30, size=(44, 30, 13)).astype(np.float32)  # edge chunks on every axis
    labels = rng.integers(-1, 3, size=image.shape)
    mask = np.stack([labels == k for k in range(3)], axis=-1).astype(np.uint8)
    write_volume_file(root / "src" / "train" / f"{VOLUME}.h5", image, mask, spacing=SPACING)
    flat = rng.integers(-500, 1500, size=(20, 24, 6)).astype(np.int16)
    write_slice_files(root / "src" / "valid", SLICES, flat)
    store = root / "store"
    layout = ChunkLayout(chunks=(16, 16, 4), shard_depth=8)
    summary = run_preprocess(root / "src", store, workers=1, layout=layout, progress=False)
    assert summary.failed == 0, summary
    return store


def stored(scan, array):
    """A stored (y, x, z) array read with zarr-python, as the independent reference."""
    return zarr.open_array(str(scan / array), mode="r")[...]


def test_ngff_zarr_validates_and_reads_the_scan_upright_with_its_spacing(converted):
    import ngff_zarr

    scan = converted / VOLUME
    multiscales = ngff_zarr.from_ngff_zarr(str(scan), validate=True)
    image = multiscales.images[0]
    assert image.dims == ("z", "y", "x")
    assert image.scale == {"z": 0.7, "y": 0.365, "x": 0.365}
    assert image.axes_units == {"z": "millimeter", "y": "millimeter", "x": "millimeter"}
    got = np.asarray(image.data)
    np.testing.assert_array_equal(got, stored(scan, "image").transpose(2, 0, 1))
    assert got.dtype == np.float32

    labels = ngff_zarr.from_ngff_zarr(str(scan / "labels" / "classes"), validate=True).images[0]
    assert labels.dims == ("z", "y", "x") and labels.scale == {"z": 0.7, "y": 0.365, "x": 0.365}
    np.testing.assert_array_equal(np.asarray(labels.data), stored(scan, "label_map").transpose(2, 0, 1))

    flat = ngff_zarr.from_ngff_zarr(str(converted / SLICES), validate=True).images[0]
    assert flat.scale == {"z": 1.0, "y": 1.0, "x": 1.0}  # no spacing in the source: 1 mm
    np.testing.assert_array_equal(
        np.asarray(flat.data), stored(converted / SLICES, "image").transpose(2, 0, 1)
    )


def test_ome_zarr_py_reads_image_and_labels_upright(converted):
    scan = converted / VOLUME
    nodes = list(Reader(parse_url(str(scan)))())
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    assert image.metadata["axes"] == [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"]
    assert image.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": ZYX_SCALE}]]
    np.testing.assert_array_equal(np.asarray(image.data[0]), stored(scan, "image").transpose(2, 0, 1))

    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1
    label_map = stored(scan, "label_map")
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), label_map.transpose(2, 0, 1))
    mask = stored(scan, "mask")  # the label map is the mask's classes: an independent check
    np.testing.assert_array_equal(label_map, np.where(mask.any(-1), mask.argmax(-1) + 1, 0))
    image_label = zarr.open_group(str(scan / "labels" / "classes"), mode="r").attrs["ome"]["image-label"]
    assert [c["label-value"] for c in image_label["colors"]] == [1, 2, 3]
    assert [c["rgba"][:3] for c in image_label["colors"]] == [list(ome.class_color(k)) for k in range(3)]
    assert [p["class"] for p in image_label["properties"]] == ["class 0", "class 1", "class 2"]


def test_scan_metadata_validates_with_ome_zarr_models(converted):
    from ome_zarr_models.v05.image import Image

    group = zarr.open_group(str(converted / VOLUME), mode="r")
    model = Image.from_zarr(group)
    assert model.attributes.ome.multiscales[0].datasets[0].path == "image_zyx"
    assert group.attrs["spacing"] == list(SPACING)  # the stored arrays' own spacing is unchanged


def test_views_decode_identically_in_tensorstore(converted):
    scan = converted / VOLUME
    for array, view in (("image", "image_zyx"), ("label_map", "labels/classes/0")):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(scan / view)}}
        got = ts.open(spec, read=True).result().read().result()
        np.testing.assert_array_equal(got, stored(scan, array).transpose(2, 0, 1))


def test_views_are_the_stored_files_hard_linked_and_in_the_manifest(converted):
    scan = converted / VOLUME
    manifest = json.loads((scan / "zarr.json").read_text())["attributes"]["manifest"]
    assert "image_zyx/zarr.json" in manifest and "labels/classes/0/zarr.json" in manifest
    for array, view in (("image", "image_zyx"), ("label_map", "labels/classes/0")):
        shards = sorted((scan / array / "c").rglob("*"))
        shards = [p for p in shards if p.is_file()]
        assert shards
        for shard in shards:
            y, x, z = shard.relative_to(scan / array / "c").parts
            linked = scan / view / "c" / z / y / x
            assert os.path.samefile(shard, linked)  # one file, two indexes: no byte stored twice
    assert not any(p.is_symlink() for p in scan.rglob("*"))  # real arrays: object storage copies them as is


def test_a_shard_without_the_view_index_is_copied_behind_one(tmp_path):
    """Shards of another writer (zarr-python's) have no (z, y, x) index at their start: the view
    gets a copy with one in front, and reads back the same."""
    data = np.random.default_rng(2).integers(0, 255, size=(20, 17, 9)).astype(np.uint8)
    data[:8, :8, :4] = 0
    zarr.create_array(
        str(tmp_path / "label_map"),
        data=data,
        chunks=(8, 8, 4),
        shards=(24, 24, 8),
        dimension_names=["y", "x", "z"],
    )
    ome_views.write_view([tmp_path / "label_map"], tmp_path / "view")
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "view"), mode="r")[...], data.transpose(2, 0, 1)
    )
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "view")}}
    np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), data.transpose(2, 0, 1))
    assert all(p.stat().st_nlink == 1 for p in (tmp_path / "view" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("codec", ["blosc-lz4", "zstd", "none"])
def test_channels_make_one_czyx_view(tmp_path, codec):
    """Image channels (``image``, ``image_c1``, ...) of one layout: one (c, z, y, x) view."""
    rng = np.random.default_rng(3)
    shape = (21, 18, 11)
    layout = ChunkLayout(chunks=(8, 8, 4), shard_depth=8, codec=codec)
    channels = [rng.integers(0, 4000, size=shape).astype(np.uint16) for _ in range(3)]
    channels[1][:8, :8, :4] = 0  # an inner chunk all fill value is not stored
    scan = tmp_path / "scan"
    for name, data in zip(("image", "image_c1", "image_c2"), channels, strict=True):
        writer = ShardedArrayWriter(scan / name, shape, data.dtype, layout)
        for z0 in range(0, shape[2], writer.slab_depth):
            writer.write_slab(z0, data[:, :, z0 : z0 + writer.slab_depth])
        writer.close()
    attrs = ome_views.write_scan_views(scan, "scan", "image", None, (0.5, 0.6, 2.0), [])
    assert attrs["multiscales"][0]["axes"][0] == {"name": "c", "type": "channel"}
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        1.0,
        2.0,
        0.5,
        0.6,
    ]
    expected = np.stack([c.transpose(2, 0, 1) for c in channels])
    np.testing.assert_array_equal(zarr.open_array(str(scan / "image_zyx"), mode="r")[...], expected)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(scan / "image_zyx")}}
    np.testing.assert_array_equal(ts.open(spec, read=True).result().read().result(), expected)
    assert not (scan / "labels").exists()
    if codec == "blosc-lz4":  # the group as the writer makes it, through ngff-zarr's validation
        import ngff_zarr

        (scan / "zarr.json").write_text(json.dumps(ome.group_document(attrs)))
        image = ngff_zarr.from_ngff_zarr(str(scan), validate=True).images[0]
        assert image.dims == ("c", "z", "y", "x") and image.scale == {"c": 1.0, "z": 2.0, "y": 0.5, "x": 0.6}
        np.testing.assert_array_equal(np.asarray(image.data), expected)


def test_unsharded_view_hard_links_the_chunks(tmp_path):
    """A predictions store's label map (zarr-python, unsharded): the view's chunk files are the
    stored ones (hard links), and it reads back transposed."""
    labels = (np.arange(30 * 20 * 9).reshape(30, 20, 9) % 5).astype(np.uint8)
    zarr.create_array(
        str(tmp_path / "label_map"), data=labels, chunks=(16, 16, 4), dimension_names=["y", "x", "z"]
    )
    attrs = ome_views.write_label_image_view(
        tmp_path, "pred", "label_map", 4, (1.0, 1.0, 3.0), ["a", "b", "c", "d"]
    )
    view = tmp_path / "label_map_zyx"
    np.testing.assert_array_equal(zarr.open_array(str(view), mode="r")[...], labels.transpose(2, 0, 1))
    chunk = next(p for p in (view / "c").rglob("*") if p.is_file())
    assert chunk.stat().st_nlink == 2
    assert attrs["image-label"]["properties"][3] == {"label-value": 4, "class": "d"}
    assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [3.0, 1.0, 1.0]


def test_bad_spacing_and_non_3d_arrays_are_refused_in_one_line():
    with pytest.raises(ValueError, match="three positive finite numbers"):
        ome.scale([0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="three positive finite numbers"):
        ome.spacing_of({"spacing": [1.0, float("nan"), 1.0]})
    assert ome.spacing_of({}) == (1.0, 1.0, 1.0)
    assert ome.class_names_of({"class_names": ["femur"]}, 3) == ["femur", "class 1", "class 2"]
    with pytest.raises(ValueError, match="3D"):
        ome_views.view_metadata({"node_type": "array", "shape": [4, 4, 4, 2]})


def test_served_store_exposes_the_views_for_neuroglancer(converted):
    """docs/viewer.md's neuroglancer sources, read over HTTP with zarr-python."""
    import httpx
    from live_server import live_server

    scan = converted / VOLUME
    with live_server(converted) as url:
        base = f"{url}/zarr/{VOLUME}"
        ome_attrs = httpx.get(f"{base}/zarr.json").json()["attributes"]["ome"]
        assert ome_attrs["multiscales"][0]["datasets"][0]["path"] == "image_zyx"
        assert httpx.get(f"{base}/labels/zarr.json").json()["attributes"]["ome"]["labels"] == ["classes"]
        for view, array in (("image_zyx", "image"), ("labels/classes/0", "label_map")):
            remote = zarr.open_array(
                zarr.storage.FsspecStore.from_url(f"{base}/{view}", read_only=True), mode="r"
            )
            np.testing.assert_array_equal(remote[...], stored(scan, array).transpose(2, 0, 1))


def test_channels_of_another_layout_are_refused_naming_them(tmp_path):
    layout = ChunkLayout(chunks=(8, 8, 4), shard_depth=8)
    for name, dtype in (("image", np.uint16), ("image_c1", np.float32)):
        writer = ShardedArrayWriter(tmp_path / name, (9, 9, 4), np.dtype(dtype), layout)
        writer.write_slab(0, np.ones((9, 9, 4), dtype))
        writer.close()
    with pytest.raises(ValueError, match="image_zyx: the channel arrays image, image_c1 differ"):
        ome_views.write_scan_views(tmp_path, "scan", "image", None, (1.0, 1.0, 1.0), [])


def test_omero_names_the_channels_and_gives_a_contrast_window(converted):
    """napari takes layer names and contrast from ``omero`` (through ome-zarr-py's reader):
    the channel's name, and mean +- 3 std of the scan's voxels within [min, max] (numpy)."""
    scan = converted / VOLUME
    image = next(iter(Reader(parse_url(str(scan)))()))
    assert image.metadata["channel_names"] == ["channel 0"]
    voxels = stored(scan, "image").astype(np.float64)
    low, high = voxels.min(), voxels.max()
    start, end = max(low, voxels.mean() - 3 * voxels.std()), min(high, voxels.mean() + 3 * voxels.std())
    got = image.metadata["contrast_limits"][0]
    np.testing.assert_allclose(got, [start, end], rtol=1e-5)
    window = zarr.open_group(str(scan), mode="r").attrs["ome"]["omero"]["channels"][0]["window"]
    np.testing.assert_allclose([window["min"], window["max"]], [low, high], rtol=1e-6)

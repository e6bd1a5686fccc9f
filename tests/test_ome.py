"""OME-Zarr (NGFF 0.5) metadata of scans and predictions, read back with independent readers."""

from __future__ import annotations

import numpy as np
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader

from store import ome


def read_nodes(path):
    return list(Reader(parse_url(str(path)))())


def test_scan_is_an_ngff_image(small_store):
    root, truth = small_store
    scan_id = "0000001_V00-Aug00"
    attrs = zarr.open_group(str(root / scan_id), mode="r").attrs.asdict()
    assert attrs["ome"]["version"] == "0.5"
    nodes = read_nodes(root / scan_id)
    image = nodes[0]
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    assert [a["name"] for a in image.metadata["axes"]] == ["y", "x", "z"]
    np.testing.assert_array_equal(np.asarray(image.data[0]), truth[scan_id][0])


def test_scan_metadata_validates_with_ome_zarr_models(small_store):
    from ome_zarr_models.v05.image import Image

    root, _ = small_store
    group = zarr.open_group(str(root / "0000001_V00-Aug00"), mode="r")
    model = Image.from_zarr(group)
    assert model.attributes.ome.multiscales[0].datasets[0].path == "image"


def test_link_labels_adds_a_label_image_without_copying(tmp_path):
    scan = tmp_path / "scan"
    image = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    labels = (np.arange(6 * 5 * 4).reshape(6, 5, 4) % 3).astype(np.uint8)
    group = zarr.open_group(str(scan), mode="w", zarr_format=3)
    group.create_array("image", data=image, dimension_names=["y", "x", "z"])
    group.create_array("label_map", data=labels, dimension_names=["y", "x", "z"])
    group.attrs["ome"] = ome.image_attrs("scan", "image")
    assert ome.link_labels(scan, "label_map", num_classes=2)
    assert (scan / "labels" / "classes" / "0").is_symlink()

    nodes = read_nodes(scan)
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(label_nodes) == 1
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), labels)
    colors = zarr.open_group(str(scan / "labels" / "classes"), mode="r").attrs["ome"]["image-label"]["colors"]
    assert [c["label-value"] for c in colors] == [1, 2]
    assert not ome.link_labels(tmp_path / "no-labels", "label_map", 2)


def test_scan_with_a_label_map_opens_with_its_labels(small_store):
    root, truth = small_store
    scan_id = "0000001_V00-Aug00"
    group = zarr.open_group(str(root / scan_id), mode="r")
    assert group.attrs["label_map"] is True
    nodes = read_nodes(root / scan_id)
    labels = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert len(labels) == 1
    mask = truth[scan_id][1]
    expected = np.where(mask.any(-1), mask.argmax(-1) + 1, 0).astype(np.uint8)  # classes are disjoint
    np.testing.assert_array_equal(np.asarray(labels[0].data[0]), expected)


def test_served_store_exposes_the_labels_for_neuroglancer(small_store):
    """docs/viewer.md's neuroglancer sources: the OME group, its labels and the linked label map."""
    import httpx
    from live_server import live_server

    root, _ = small_store
    scan_id = "0000001_V00-Aug00"
    with live_server(root) as url:
        base = f"{url}/zarr/{scan_id}"
        assert httpx.get(f"{base}/zarr.json").json()["attributes"]["ome"]["version"] == "0.5"
        assert httpx.get(f"{base}/labels/zarr.json").json()["attributes"]["ome"]["labels"] == ["classes"]
        assert "image-label" in httpx.get(f"{base}/labels/classes/zarr.json").json()["attributes"]["ome"]
        linked = httpx.get(f"{base}/labels/classes/0/zarr.json")
        assert linked.status_code == 200 and linked.json()["data_type"] == "uint8"

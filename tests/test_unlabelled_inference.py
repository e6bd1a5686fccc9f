"""Scans without a mask in test loaders: nnU-Net ``imagesTs/`` without ``labelsTs/`` and MedSegPy
image-only scans are predicted (``y_true`` and Dice None) locally and over HTTP, exported as NIfTI
in the source geometry with the source label values; batches hold the labelled scans only, and
training loaders (or batches of only unlabelled scans) refuse them in one line. References are numpy, nibabel and zarr-python on the files themselves."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import zarr
from h5_sources import run_cli
from live_server import live_server
from nifti_sources import colin, flip_permute, requires_mricron, save, v2_dataset_json, write_json

from loaders import Config, DatasetCatalog, build_loader, write_predictions
from loaders.base import build_data_loader
from loaders.build import get_dataset_dicts

IMAGE_ONLY = "0000003_V00-Aug01"  # tests/conftest.py small_store: the scan written without a mask
UNSEEN = "colin_unseen"  # the nnU-Net test case: imagesTs/ only


def pointwise(centers, width):
    """A numpy 'model': per voxel, softmax over closeness to ``centers`` (float32, pointwise, so
    predicting slices of the stored scan or the whole source volume gives the same voxels)."""
    centers = np.asarray(centers, np.float32)

    def model(x):
        scores = -(((np.asarray(x, np.float32) - centers) / np.float32(width)) ** 2)
        scores -= scores.max(axis=-1, keepdims=True)
        e = np.exp(scores)
        return e / e.sum(axis=-1, keepdims=True)

    return model


T1_MODEL = pointwise([40.0, 90.0, 105.0, 115.0], 10.0)  # background + three categories (T1: uint8)
SMALL_MODEL = pointwise([60.0, 100.0, 140.0], 30.0)  # background + two categories


def predict_loader(name, categories=(), background=True):
    cfg = Config(CATEGORIES=categories, INCLUDE_BACKGROUND=background)
    return build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)


# -- (a) nnU-Net imagesTs without labelsTs ------------------------------------------------------
@pytest.fixture(scope="module")
def nnunet_ts(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabelled")
    c = colin()
    dataset = root / "Dataset002_ColinTs"
    save(c.t1, dataset / "imagesTr/colin_ras_0000.nii.gz")
    save(c.labels, dataset / "labelsTr/colin_ras.nii.gz")
    # flipped and permuted: the store reorients it, the export must undo exactly that
    save(flip_permute(c.t1), dataset / f"imagesTs/{UNSEEN}_0000.nii.gz")
    write_json(dataset / "dataset.json", v2_dataset_json(c.kept, num_training=1))
    store = root / "store"
    result = run_cli("preprocess", dataset, store, "--workers", "1", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 converted, 0 skipped, 0 failed" in result.stdout
    DatasetCatalog.remove("ts")
    DatasetCatalog.register("ts", str(store), split="test")
    yield dataset, store
    DatasetCatalog.remove("ts")


@requires_mricron
def test_unlabelled_case_records_the_dataset_classes(nnunet_ts):
    _, store = nnunet_ts
    kept = colin().kept
    attrs = dict(zarr.open_group(str(store), mode="r")[UNSEEN].attrs)
    assert attrs["num_classes"] == 0 and attrs["split"] == "test"
    assert "mask" not in zarr.open_group(str(store / UNSEEN), mode="r")
    assert attrs["class_names"] == [n for _, n in kept] and attrs["label_values"] == [v for v, _ in kept]
    with live_server(store) as url:
        doc = httpx.get(f"{url}/scans/{UNSEEN}").json()
    assert doc["num_classes"] == 0 and doc["class_names"] == [n for _, n in kept]


@requires_mricron
def test_unlabelled_case_predicts_and_exports_in_the_source_geometry(nnunet_ts, tmp_path):
    import nibabel as nib
    from nibabel import orientations

    dataset, _ = nnunet_ts
    kept = colin().kept
    picked = [kept[7], kept[1], kept[4]]  # by name, out of value order on purpose
    loader = predict_loader("ts", tuple(name for _, name in picked))
    assert [s.scan_id for s in loader.scans] == [UNSEEN]
    assert loader.scans[0].categories == ((7,), (1,), (4,)) and loader.num_classes() == 4
    inputs, outputs = next(iter(loader.inference(T1_MODEL)))
    assert inputs["scan_id"] == UNSEEN and outputs["y_true"] is None
    assert outputs["y_pred"].shape == (*loader.scans[0].shape, 4)

    pred, out = tmp_path / "pred", tmp_path / "out"
    summary = write_predictions(loader, T1_MODEL, pred, progress=False)
    assert summary.written == (UNSEEN,) and summary.dice == {UNSEEN: None}
    assert summary.dice_by_class() == {UNSEEN: None}
    stored = zarr.open_group(str(pred / UNSEEN), mode="r")
    assert stored.attrs["prediction"]["class_names"] == [name for _, name in picked]
    assert stored.attrs["prediction"]["dice"] is None

    result = run_cli("export", pred, out, "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    source = nib.load(dataset / f"imagesTs/{UNSEEN}_0000.nii.gz")
    exported = nib.load(out / f"{UNSEEN}.nii.gz")
    data = np.asanyarray(exported.dataobj)
    assert data.shape == source.shape
    np.testing.assert_array_equal(exported.affine, source.affine)
    values = np.array([0, *(v for v, _ in picked)])
    assert set(np.unique(data).tolist()) <= set(values.tolist())
    # the stored label map (value k + 1 = category k) mapped to source values and back to the
    # source's voxel order the documented way (store-format.md: the ingest's reorientation undone)
    attrs = stored.attrs["prediction"]
    ornt = orientations.ornt_transform(
        orientations.axcodes2ornt(("P", "L", "S")),
        orientations.io_orientation(np.array(attrs["source_affine"])),
    )
    back = orientations.apply_orientation(values[stored["label_map"][...]], ornt)
    np.testing.assert_array_equal(data, back)
    # and independently: the model on the source file's voxels, in source order
    probs = T1_MODEL(np.asarray(source.dataobj).astype(np.float32)[..., None])
    np.testing.assert_array_equal(data, values[probs.argmax(-1)])
    assert len(np.unique(data)) > 2  # the check compares real labels, not an empty map


# -- (b) a MedSegPy image-only scan, locally and over HTTP -----------------------------------------
@pytest.fixture
def image_only(small_store):
    root, truth = small_store
    DatasetCatalog.remove("image_only")
    DatasetCatalog.register("image_only", str(root), scan_id=[IMAGE_ONLY])
    yield root, truth[IMAGE_ONLY][0]
    DatasetCatalog.remove("image_only")


def test_image_only_scan_predicts_locally_and_over_http(image_only, tmp_path):
    root, image = image_only
    probs = SMALL_MODEL(image.astype(np.float32)[..., None])
    expected = probs.argmax(-1).astype(np.uint8)
    loader = predict_loader("image_only", (0, 2))  # no mask, no names: numbers as given
    assert loader.scans[0].categories == ((0,), (2,))
    _, outputs = next(iter(loader.inference(SMALL_MODEL)))
    assert outputs["y_true"] is None
    np.testing.assert_array_equal(outputs["y_pred"], probs)
    local = write_predictions(loader, SMALL_MODEL, tmp_path / "local", progress=False)
    assert local.dice == {IMAGE_ONLY: None}
    with live_server(root) as url:
        DatasetCatalog.register("image_only_remote", url, scan_id=[IMAGE_ONLY])
        try:
            remote_loader = predict_loader("image_only_remote", (0, 2))
            remote = write_predictions(remote_loader, SMALL_MODEL, tmp_path / "remote", progress=False)
        finally:
            DatasetCatalog.remove("image_only_remote")
    assert remote.dice == {IMAGE_ONLY: None}
    for where in ("local", "remote"):
        group = zarr.open_group(str(tmp_path / where / IMAGE_ONLY), mode="r")
        np.testing.assert_array_equal(group["label_map"][...], expected)
        np.testing.assert_array_equal(group["probabilities"][...], probs.astype(np.float16))
        assert group.attrs["prediction"]["dice"] is None
        assert group.attrs["prediction"]["class_names"] == ["class 0", "class 2"]

    with live_server(root, predictions=tmp_path / "local") as url:
        one = httpx.get(f"{url}/scans/{IMAGE_ONLY}")
        assert one.status_code == 200
        doc = one.json()
        assert doc["has_prediction"] is True and doc["prediction_dice"] is None
        assert doc["prediction_class_names"] == ["class 0", "class 2"] and doc["class_names"] == []
        listing = httpx.get(f"{url}/scans")
        assert listing.status_code == 200
        by_id = {s["scan_id"]: s for s in listing.json()["scans"]}
        assert by_id[IMAGE_ONLY]["has_prediction"] is True and by_id[IMAGE_ONLY]["prediction_dice"] is None
        preview = httpx.get(f"{url}/scans/{IMAGE_ONLY}/preview.png", params={"overlay": "prediction"})
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
        viewer = httpx.get(f"{url}/viewer")
        assert viewer.status_code == 200


def test_image_only_scan_takes_the_categories_of_the_labelled_scans(small_store, tmp_path):
    """A scan with neither mask nor names beside a labelled one: one model, the same channels."""
    root, _ = small_store
    DatasetCatalog.register("mixed_test", str(root), split=["valid", "test"])
    try:
        loader = predict_loader("mixed_test", (3, 1))
        assert {s.scan_id: s.categories for s in loader.scans} == {
            "0000002_V00-Aug00": ((3,), (1,)),
            IMAGE_ONLY: ((3,), (1,)),
        }
        with pytest.raises(
            ValueError, match=r"^CATEGORIES: scan '0000002_V00-Aug00': class 7 is out of range"
        ):
            predict_loader("mixed_test", (7,))
        summary = write_predictions(loader, SMALL_MODEL, tmp_path / "pred", progress=False)
        assert summary.dice[IMAGE_ONLY] is None and len(summary.dice["0000002_V00-Aug00"]) == 2
    finally:
        DatasetCatalog.remove("mixed_test")


def test_image_only_scan_without_names_refuses_a_name(image_only):
    with pytest.raises(ValueError) as info:
        predict_loader("image_only", ("femur",))
    message = str(info.value)
    assert "\n" not in message
    assert f"scan '{IMAGE_ONLY}' has no mask and records no class names" in message
    assert "--class-names" in message


# -- (c) training loaders refuse, (d) batches refuse ---------------------------------------------
def test_training_loader_refuses_an_unlabelled_scan_in_one_line(image_only):
    with pytest.raises(ValueError) as info:
        build_loader(Config(), "image_only", batch_size=2, is_test=False, shuffle=True, drop_last=False)
    message = str(info.value)
    assert "\n" not in message and f"scan '{IMAGE_ONLY}' has no mask" in message
    assert "training loaders need labels" in message and "is_test=True" in message
    dicts = get_dataset_dicts("image_only", filter_empty=False)
    with pytest.raises(
        ValueError, match=rf"^scan '{IMAGE_ONLY}' has no mask; training loaders need labelled scans"
    ):
        build_data_loader(Config(), dicts, is_test=False, batch_size=2)


def test_batches_hold_the_labelled_scans_and_inference_all_of_them(small_store):
    """A test loader over labelled and unlabelled scans: its batches (x, y), what Keras'
    evaluate reads, are the labelled scans' slices exactly (numpy); inference covers every scan."""
    root, truth = small_store
    DatasetCatalog.register("all_for_batches", str(root))
    try:
        loader = build_loader(
            Config(CATEGORIES=(0, 1), INCLUDE_BACKGROUND=True),
            "all_for_batches",
            batch_size=1,
            is_test=True,
            shuffle=False,
            drop_last=False,
        )
        labelled = [s for s in loader.scans if s.scan_id != IMAGE_ONLY]
        assert IMAGE_ONLY in [s.scan_id for s in loader.scans]
        shown = []
        for x, y in (loader[i][:2] for i in range(len(loader))):
            shown.append((x[0, ..., 0], y[0]))
        expected = []
        for scan in labelled:
            image, mask = truth[scan.scan_id]
            for z in range(image.shape[2]):
                m = mask[:, :, z, :2].astype(np.float32)
                expected.append(
                    (image[:, :, z].astype(np.float32), np.concatenate([1 - m.sum(-1, keepdims=True), m], -1))
                )
        assert len(shown) == len(expected) == sum(truth[s.scan_id][0].shape[2] for s in labelled)
        for (x, y), (want_x, want_y) in zip(shown, expected, strict=True):
            np.testing.assert_array_equal(x, want_x)
            np.testing.assert_array_equal(y, want_y)
        predicted = [inputs["scan_id"] for inputs, _ in loader.inference(SMALL_MODEL)]
        assert predicted == [s.scan_id for s in loader.scans]
    finally:
        DatasetCatalog.remove("all_for_batches")


def test_batches_of_a_loader_of_unlabelled_scans_refuse_in_one_line(image_only):
    loader = predict_loader("image_only", (0, 1))
    expected = (
        rf"^scan '{IMAGE_ONLY}' has no mask, so there are no batches \(x, y\) to give; predict it with "
        r"loader.inference\(model\) or write_predictions\(loader, model, path\)$"
    )
    with pytest.raises(ValueError, match=expected):
        loader[0]
    with pytest.raises(ValueError, match=expected):
        next(iter(loader))
    with pytest.raises(ValueError, match=expected):
        loader.load_batch(loader.batch_elements(0))


def test_medsegpy_image_only_scan_records_class_names(tmp_path):
    """``--class-names`` names an image-only scan's classes too: its prediction names them."""
    from h5_sources import random_scan, write_volume_file

    image, mask = random_scan((12, 10, 3), 2, seed=3)
    write_volume_file(tmp_path / "src/0000001_V00-Aug00.h5", image, mask)
    write_volume_file(tmp_path / "src/0000002_V00-Aug00.h5", image)
    store = tmp_path / "store"
    result = run_cli(
        "preprocess", tmp_path / "src", store, "--workers", "1", "-q", "--class-names", "fat,muscle"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    group = zarr.open_group(str(store), mode="r")
    assert group["0000002_V00-Aug00"].attrs["num_classes"] == 0
    assert group["0000002_V00-Aug00"].attrs["class_names"] == ["fat", "muscle"]
    DatasetCatalog.register("named_image_only", str(store), scan_id=["0000002_V00-Aug00"])
    try:
        loader = predict_loader("named_image_only", ("muscle",))
        assert loader.scans[0].categories == ((1,),) and loader.scans[0].meta.label_values == [1, 2]
        model = pointwise([0.0, 1.0], 1.0)  # background + the one category
        summary = write_predictions(loader, model, tmp_path / "pred", progress=False)
    finally:
        DatasetCatalog.remove("named_image_only")
    assert summary.dice_by_class() == {"0000002_V00-Aug00": None}
    assert summary.class_names == {"0000002_V00-Aug00": ["muscle"]}

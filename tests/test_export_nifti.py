"""Class names in CATEGORIES and predictions, and the NIfTI export, against numpy and nibabel.

A NIfTI-like scan is built by hand: a source label map on a known (L, S, P) grid, reoriented
to the store's (P, L, S) with nibabel and written with the contract's attributes (affine,
source_affine, label_values, class_names). A MedSegPy scan comes from an .h5 source through
``scancache preprocess``. Predictions go through the real loader and ``write_predictions``;
the exported files are read back with nibabel and compared exactly with the source arrays.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import SMALL_SCANS, build_store
from h5_sources import run_cli, write_volume_file
from live_server import live_server
from nibabel import orientations

from loaders import Config, DatasetCatalog, build_loader, export_nifti, write_predictions
from store.writer import write_scan

# Source grid: voxel axes point to L, S, P (io_orientation), float32-exact numbers throughout.
SOURCE_AFFINE = np.array(
    [[-0.75, 0.0, 0.0, 10.0], [0.0, 0.0, -1.25, 30.0], [0.0, 1.5, 0.0, -20.0], [0.0, 0.0, 0.0, 1.0]]
)
SOURCE_SHAPE = (9, 11, 5)
LABEL_VALUES = [2, 5, 7]  # the source label values, in increasing order: mask channels 0, 1, 2
NAMES = ["liver", "kidney", "spleen"]
CENTERS = np.array([0.0, 100.0, 200.0, 300.0], np.float32)  # background, liver, kidney, spleen


def pointwise_model(x):
    """A numpy 'model': softmax over closeness of each voxel to the four CENTERS."""
    x = np.asarray(x, np.float32)
    scores = -(((x - CENTERS) / np.float32(60.0)) ** 2)
    scores -= scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def source_volume(seed):
    """A source image and label map in source voxel order: intensities near each label's
    centre with noise, so some voxels are predicted wrong."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, size=SOURCE_SHAPE)
    labels = np.array([0, *LABEL_VALUES])[classes].astype(np.uint8)
    image = (CENTERS[classes] + rng.normal(0, 40, size=SOURCE_SHAPE)).astype(np.float32)
    return image, labels


def to_stored(array, affine):
    """Reorient source-order data to (P, L, S) as the NIfTI ingest does; returns (data, affine)."""
    ornt = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(("P", "L", "S"))
    )
    return orientations.apply_orientation(array, ornt), affine @ orientations.inv_ornt_aff(
        ornt, array.shape[:3]
    )


def write_nifti_like(root, scan_id, seed, names=NAMES):
    image, labels = source_volume(seed)
    stored_image, affine = to_stored(image, SOURCE_AFFINE)
    stored_labels, _ = to_stored(labels, SOURCE_AFFINE)
    mask = np.stack([stored_labels == v for v in LABEL_VALUES], axis=-1).astype(np.uint8)
    attrs = {
        "split": "train",
        "spacing": np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).tolist(),
        "affine": affine.tolist(),
        "source_affine": SOURCE_AFFINE.tolist(),
        "source_shape": list(SOURCE_SHAPE),
        "label_values": LABEL_VALUES,
        "class_names": list(names),
    }
    write_scan(root, scan_id, np.ascontiguousarray(stored_image), mask, attrs)
    return image, labels


@pytest.fixture(scope="module")
def nifti_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti") / "store"
    truth = {s: write_nifti_like(root, s, seed) for seed, s in enumerate(["case_001", "case_002"])}
    DatasetCatalog.remove("nifti_like")
    DatasetCatalog.register("nifti_like", str(root), split="train")
    yield root, truth
    DatasetCatalog.remove("nifti_like")


def loader_for(dataset, categories, background=True):
    cfg = Config(CATEGORIES=categories, INCLUDE_BACKGROUND=background)
    return build_loader(cfg, dataset, batch_size=4, is_test=True, shuffle=False, drop_last=False)


def numpy_dice(truth, predicted):
    total = truth.sum() + predicted.sum()
    return 2 * (truth & predicted).sum() / total if total else 1.0


def test_categories_by_name_select_the_same_channels_as_numbers(nifti_store):
    by_number = loader_for("nifti_like", (2, (0, 1)))
    by_name = loader_for("nifti_like", ("spleen", ("liver", "kidney")))
    mixed = loader_for("nifti_like", ("spleen", (0, "kidney")))
    assert [s.categories for s in by_name.scans] == [((2,), (0, 1))] * 2
    for a, b, c in zip(by_number, by_name, mixed, strict=True):
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[1], c[1])


def test_bad_names_are_one_line(nifti_store, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^CATEGORIES: scan 'case_001': no class named 'lung'; the classes are 'liver', 'kidney', 'spleen'$",
    ):
        loader_for("nifti_like", ("lung",))
    with pytest.raises(ValueError, match=r"scan 'case_001': categories 0 and 1 select the same classes"):
        loader_for("nifti_like", ("liver", 0))
    # scans that name their classes in another order: the channel would mean two classes
    root = tmp_path / "disagree"
    write_nifti_like(root, "case_001", 0)
    write_nifti_like(root, "case_002", 1, names=["kidney", "liver", "spleen"])
    DatasetCatalog.register("disagree", str(root))
    try:
        with pytest.raises(ValueError) as info:
            loader_for("disagree", ("liver",))
        assert "'liver' is class 1 of scan 'case_002' but class 0 of scan 'case_001'" in str(info.value)
        assert "\n" not in str(info.value)
        loader_for("disagree", (0,))  # numbers work as today
    finally:
        DatasetCatalog.remove("disagree")


def test_categories_by_name_over_http(nifti_store):
    root, _ = nifti_store
    local = loader_for("nifti_like", ("kidney", ("liver", "spleen")))
    with live_server(root) as url:
        mask = httpx.get(f"{url}/scans/case_001/mask", params={"categories": '["kidney",["liver","spleen"]]'})
        short = httpx.get(f"{url}/scans/case_001/mask", params={"categories": "kidney,liver+spleen"})
        assert mask.status_code == 200 and mask.content == short.content
        numbers = httpx.get(f"{url}/scans/case_001/mask", params={"categories": "[1,[0,2]]"})
        assert numbers.content == mask.content
        bad = httpx.get(f"{url}/scans/case_001/mask", params={"categories": '["lung"]'})
        assert bad.status_code == 422
        detail = bad.json()
        assert "no class named 'lung'" in json.dumps(detail) and "/" not in str(detail.get("detail", ""))
        DatasetCatalog.register("nifti_remote", url, split="train")
        try:
            remote = loader_for("nifti_remote", ("kidney", ("liver", "spleen")))
            for a, b in zip(local, remote, strict=True):
                np.testing.assert_array_equal(a[1], b[1])
        finally:
            DatasetCatalog.remove("nifti_remote")


@pytest.fixture(scope="module")
def nifti_predictions(nifti_store, tmp_path_factory):
    pred = tmp_path_factory.mktemp("pred") / "pred"
    summary = write_predictions(
        loader_for("nifti_like", ("liver", "kidney", "spleen")), pointwise_model, pred
    )
    return pred, summary


def reference_labels(image):
    """What the model predicts in source voxel order: 0 background, else the class's source value."""
    probs = pointwise_model(image[..., None])  # the label map is taken before float16 storage
    return probs.astype(np.float16), np.array([0, *LABEL_VALUES])[probs.argmax(-1)]


def test_predictions_record_names_and_dice_per_class(nifti_store, nifti_predictions):
    root, truth = nifti_store
    pred, summary = nifti_predictions
    for scan_id, (image, labels) in truth.items():
        _, predicted = reference_labels(image)
        expected = {
            n: numpy_dice(labels == v, predicted == v) for n, v in zip(NAMES, LABEL_VALUES, strict=True)
        }
        got = summary.dice_by_class()[scan_id]
        assert list(got) == NAMES
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=0, atol=1e-12)
        attrs = zarr.open_group(str(pred / scan_id), mode="r").attrs["prediction"]
        assert attrs["class_names"] == NAMES and attrs["channel_names"] == ["background", *NAMES]
        assert attrs["categories"] == [0, 1, 2]
    with live_server(root, predictions=pred) as url:
        doc = httpx.get(f"{url}/scans/case_001").json()
        assert doc["prediction_class_names"] == NAMES
        assert doc["prediction_dice"] == summary.dice["case_001"]


def test_export_is_the_source_grid_with_source_values(nifti_store, nifti_predictions, tmp_path):
    _, truth = nifti_store
    pred, _ = nifti_predictions
    out = tmp_path / "out"
    done = export_nifti(pred, out, probabilities=True, progress=False)
    assert [d.scan_id for d in done] == ["case_001", "case_002"]
    for scan_id, (image, _labels) in truth.items():
        probs, predicted = reference_labels(image)
        label_img = nib.load(out / f"{scan_id}.nii.gz")
        data = np.asanyarray(label_img.dataobj)
        assert data.dtype == np.uint8 and data.shape == SOURCE_SHAPE
        np.testing.assert_array_equal(data, predicted)
        np.testing.assert_array_equal(label_img.affine, SOURCE_AFFINE)
        assert label_img.header["sform_code"] == 1 and label_img.header["qform_code"] == 1
        np.testing.assert_array_equal(label_img.header.get_qform(), SOURCE_AFFINE)
        prob_img = nib.load(out / f"{scan_id}_probabilities.nii.gz")
        assert prob_img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asanyarray(prob_img.dataobj), probs.astype(np.float32))
        np.testing.assert_array_equal(prob_img.affine, SOURCE_AFFINE)
        sidecar = json.loads((out / f"{scan_id}.json").read_text())
        assert sidecar["labels"] == {"0": "background", "2": "liver", "5": "kidney", "7": "spleen"}
        assert sidecar["label_values"] == "source" and sidecar["channels"] == ["background", *NAMES]
        assert sidecar["probabilities"] == f"{scan_id}_probabilities.nii.gz"


def test_an_export_stopped_in_a_scan_leaves_none_of_its_files(nifti_predictions, tmp_path, monkeypatch):
    """Ctrl-C while a scan's probabilities are written: the scans before it are whole, and of
    that scan nothing is in OUT_DIR, neither a label map without its sidecar nor a hidden
    partial file; the same export run again completes."""
    import loaders.export as export

    pred, _ = nifti_predictions
    out = tmp_path / "out"
    written = export._write_nifti
    calls = []

    def stopped_at_the_fourth_file(nib_module, path, data, affine, header=None):
        calls.append(path.name)
        written(nib_module, path, data, affine, header)
        if len(calls) == 4:  # case_002's probabilities, on disk under their hidden name
            raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_nifti", stopped_at_the_fourth_file)
    with pytest.raises(KeyboardInterrupt):
        export_nifti(pred, out, probabilities=True, progress=False)
    assert calls[2:] == [".case_002.partial.nii.gz", ".case_002_probabilities.partial.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == [
        "case_001.json",
        "case_001.nii.gz",
        "case_001_probabilities.nii.gz",
    ]
    monkeypatch.setattr(export, "_write_nifti", written)
    done = export_nifti(pred, out, scans=["case_002"], probabilities=True, progress=False)
    assert [d.scan_id for d in done] == ["case_002"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("case_002")) == [
        "case_002.json",
        "case_002.nii.gz",
        "case_002_probabilities.nii.gz",
    ]


def test_an_export_stopped_between_renames_is_completed_without_overwrite(
    nifti_predictions, tmp_path, monkeypatch
):
    """Stopped after a scan's sidecar was renamed into place and before its label map: the scan
    is not exported (no label map), so the same export run again writes it, without asking for
    --overwrite; a scan whose label map is there is still refused."""
    import loaders.export as export

    pred, _ = nifti_predictions
    out = tmp_path / "out"
    renamed = []
    real_replace = os.replace

    def stopped_before_the_label_map(src, dst):
        if str(dst).endswith("case_002.nii.gz"):
            raise KeyboardInterrupt
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", stopped_before_the_label_map)
    with pytest.raises(KeyboardInterrupt):
        export_nifti(pred, out, progress=False)
    assert "case_002.json" in renamed and not (out / "case_002.nii.gz").exists()
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]
    monkeypatch.setattr(export.os, "replace", real_replace)
    with pytest.raises(FileExistsError, match=r"case_001\.nii\.gz exists"):
        export_nifti(pred, out, progress=False)
    done = export_nifti(pred, out, scans=["case_002"], progress=False)
    assert [d.scan_id for d in done] == ["case_002"]
    sidecar = json.loads((out / "case_002.json").read_text())
    assert sidecar["label_map"] == "case_002.nii.gz"
    clean = tmp_path / "clean"  # the same scan exported in one go
    export_nifti(pred, clean, scans=["case_002"], progress=False)
    for name in ("case_002.nii.gz", "case_002.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_exported_and_stored_describe_the_same_world(nifti_predictions, tmp_path):
    """Every exported voxel, mapped through source_affine to mm and back through the stored
    affine, lands on the stored voxel with the same label (numpy only)."""
    pred, _ = nifti_predictions
    export_nifti(pred, tmp_path, scans=["case_002"], progress=False)
    exported = np.asanyarray(nib.load(tmp_path / "case_002.nii.gz").dataobj)
    scan = zarr.open_group(str(pred / "case_002"), mode="r")
    stored = np.array([0, *LABEL_VALUES])[scan["label_map"][...]]
    affine = np.array(scan.attrs["prediction"]["affine"])
    ijk = np.indices(exported.shape).reshape(3, -1)
    world = SOURCE_AFFINE @ np.vstack([ijk, np.ones(ijk.shape[1])])
    stored_ijk = np.rint(np.linalg.inv(affine) @ world)[:3].astype(int)
    np.testing.assert_array_equal(stored[tuple(stored_ijk)], exported[tuple(ijk)])
    assert not np.array_equal(stored.shape, exported.shape)  # the grids really differ


def test_export_refuses_in_one_line(nifti_predictions, tmp_path):
    pred, _ = nifti_predictions
    out = tmp_path / "out"
    first = run_cli("export", pred, out, "--scans", "case_001")
    assert first.returncode == 0, first.stderr
    assert "exported 1 scan (" in first.stdout and first.stderr == "scancache export: 1/1 scan (case_001)\n"
    again = run_cli("export", pred, out, "--scans", "case_001", "--quiet")
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "case_001.nii.gz exists (1 scan of 1 already exported); pass --skip-existing" in again.stderr
    unknown = run_cli("export", pred, out, "--scans", "case_009", "--overwrite")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "scan 'case_009' has no prediction" in unknown.stderr and "case_001, case_002" in unknown.stderr
    replaced = run_cli("export", pred, out, "--overwrite", "-q", "--probabilities")  # -q as preprocess's
    assert (
        replaced.returncode == 0
        and replaced.stderr == ""
        and sorted(p.name for p in out.iterdir())
        == [
            f"{s}{suffix}"
            for s in ("case_001", "case_002")
            for suffix in (".json", ".nii.gz", "_probabilities.nii.gz")
        ]
    )


def test_an_empty_predictions_store_exports_nothing_and_says_so(tmp_path):
    """A predictions store whose every run failed (its root made, no scan written): one line and
    a non-zero exit, not "exported 0 scans"."""
    from loaders.predictions import _root
    from store.storage import open_storage

    empty = tmp_path / "empty"
    _root(open_storage(empty))
    result = run_cli("export", empty, tmp_path / "out")
    assert result.returncode == 1 and result.stderr.strip() == (
        f"scancache export: error: {empty}: the predictions store holds no predictions"
    ), result.stderr


def test_old_predictions_export_with_the_scan_store(nifti_store, nifti_predictions, tmp_path):
    """A prediction written before names and geometry were recorded: readable, exported the
    same once the scan store gives the geometry."""
    root, _ = nifti_store
    pred, _ = nifti_predictions
    old = tmp_path / "old"
    run_cli("export", pred, tmp_path / "new", "--scans", "case_001", "--quiet")
    shutil.copytree(pred, old, symlinks=True)
    doc_path = (old / "case_001").resolve() / "zarr.json"
    doc = json.loads(doc_path.read_text())
    for key in ("class_names", "channel_names", "scan_shape", "spacing", "affine", "source_affine",
                "scan_class_names", "label_values", "source_shape"):  # fmt: skip
        del doc["attributes"]["prediction"][key]
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"records no geometry.*--store STORE"):
        export_nifti(old, tmp_path / "x", scans=["case_001"], progress=False)
    assert not (tmp_path / "x").exists()  # refused before writing: no empty folder left
    export_nifti(old, tmp_path / "x", scans=["case_001"], scan_store=root, progress=False)
    a = nib.load(tmp_path / "x" / "case_001.nii.gz")
    b = nib.load(tmp_path / "new" / "case_001.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, b.affine)
    assert json.loads((tmp_path / "x" / "case_001.json").read_text())["labels"]["5"] == "kidney"
    with live_server(root, predictions=old) as url:
        doc = httpx.get(f"{url}/scans/case_001").json()
        assert doc["has_prediction"] and doc["prediction_class_names"] is None
    # a prediction that records its geometry, with a --store that does not hold its scan: the
    # flag was meant, so it is checked, not ignored
    elsewhere = tmp_path / "elsewhere"
    build_store(elsewhere, scans=SMALL_SCANS[:1], image_only=())
    refused = run_cli("export", pred, tmp_path / "y", "--scans", "case_001", "--store", elsewhere)
    assert (
        refused.returncode == 1
        and "the scan store given (--store, scan_store=) has no scan of that id" in refused.stderr
    )


@pytest.fixture(scope="module")
def medsegpy_store(tmp_path_factory):
    """A MedSegPy 3D .h5 source with a spacing, preprocessed by the CLI."""
    base = tmp_path_factory.mktemp("medsegpy")
    rng = np.random.default_rng(5)
    classes = rng.integers(0, 4, size=(20, 16, 6))
    volume = (CENTERS[classes] + rng.normal(0, 40, size=classes.shape)).astype(np.float32)
    seg = np.stack([classes == k + 1 for k in range(3)], axis=-1).astype(np.uint8)
    write_volume_file(
        base / "source" / "train" / "0000001_V00-Aug00.h5", volume, seg, spacing=[0.5, 0.5, 2.0]
    )
    result = run_cli("preprocess", base / "source", base / "store", "--workers", "1")
    assert result.returncode == 0, result.stderr
    return base / "store", volume, seg


def test_medsegpy_export_with_merged_categories(medsegpy_store, tmp_path):
    root, volume, seg = medsegpy_store
    DatasetCatalog.register("medsegpy_export", str(root), split="train")
    try:
        loader = loader_for("medsegpy_export", ("class 0", ("class 1", 2)), background=False)
        summary = write_predictions(
            loader, lambda x: pointwise_model(x)[..., 1:3], tmp_path / "pred", progress=False
        )
    finally:
        DatasetCatalog.remove("medsegpy_export")
    out = tmp_path / "out"
    export_nifti(tmp_path / "pred", out, progress=False)
    img = nib.load(out / "0000001_V00-Aug00.nii.gz")
    np.testing.assert_array_equal(img.affine, np.diag([0.5, 0.5, 2.0, 1.0]))
    # without background: the most probable category where it reaches 0.5, else 0
    probs = pointwise_model(volume[..., None])[..., 1:3].astype(np.float32)
    best = probs.argmax(-1)
    expected = np.where(np.take_along_axis(probs, best[..., None], -1)[..., 0] >= 0.5, best + 1, 0)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected)
    sidecar = json.loads((out / "0000001_V00-Aug00.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "class 0", "2": "class 1+class 2"}
    assert sidecar["label_values"] == "categories" and sidecar["channels"] == ["class 0", "class 1+class 2"]
    merged = [seg[..., 0] > 0, (seg[..., 1] + seg[..., 2]) > 0]
    want = [numpy_dice(t, expected == k + 1) for k, t in enumerate(merged)]
    got = summary.dice_by_class()["0000001_V00-Aug00"]
    assert list(got) == ["class 0", "class 1+class 2"]
    np.testing.assert_allclose(list(got.values()), want, rtol=0, atol=1e-12)
    assert sidecar["dice"] == got


def test_some_slices_export_on_the_whole_grid(nifti_store, tmp_path):
    """A per-slice dataset predicts stored slices 1 and 3 only: the export has them in place
    (through the affines, numpy only) and 0 everywhere else."""
    from loaders.catalog import scan_dict, shared_source

    root, truth = nifti_store
    meta = shared_source(str(root)).metadata("case_001")
    DatasetCatalog.register(
        "nifti_slices", lambda: [{**scan_dict(str(root), meta), "slice_id": z} for z in (2, 4)]
    )
    try:
        write_predictions(loader_for("nifti_slices", None), pointwise_model, tmp_path / "pred")
    finally:
        DatasetCatalog.remove("nifti_slices")
    export_nifti(tmp_path / "pred", tmp_path / "out", progress=False)
    exported = np.asanyarray(nib.load(tmp_path / "out" / "case_001.nii.gz").dataobj)
    _, predicted = reference_labels(truth["case_001"][0])  # every voxel, source order
    ijk = np.indices(SOURCE_SHAPE).reshape(3, -1)
    world = SOURCE_AFFINE @ np.vstack([ijk, np.ones(ijk.shape[1])])
    stored_z = np.rint(np.linalg.inv(np.array(meta.affine)) @ world)[2].astype(int)
    expected = np.where(np.isin(stored_z, [1, 3]), predicted[tuple(ijk)], 0)
    np.testing.assert_array_equal(exported[tuple(ijk)], expected)
    assert 0 < np.count_nonzero(expected) < expected.size


def _converted_predicted_exported(dataset, case, tmp_path):
    """The one-case NIfTI ``dataset`` preprocessed, predicted with ``pointwise_model`` and
    exported: the exported label map of ``case``, as nibabel loads it."""
    store, pred, out = tmp_path / "store", tmp_path / "pred", tmp_path / "out"
    result = run_cli("preprocess", dataset, store, "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    DatasetCatalog.register("exported_case", str(store), split="train")
    try:
        write_predictions(loader_for("exported_case", tuple(NAMES)), pointwise_model, pred, progress=False)
    finally:
        DatasetCatalog.remove("exported_case")
    export_nifti(pred, out, progress=False)
    return nib.load(out / f"{case}.nii.gz")


@pytest.mark.parametrize("shape", [(9, 11, 5), (10, 10, 4)])
def test_a_case_rotated_by_exactly_45_degrees_exports_on_its_source_grid(tmp_path, shape):
    """At an exact 45-degree in-plane rotation two axes tie for the nearest world direction.
    The ingest picks one reorientation from the source affine; the export must undo that one
    (read off the two affines), not pick again from the stored affine: it refused such a case,
    and a square one would have come out transposed."""
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    affine = np.array([[c, -s, 0.0, 5.0], [s, c, 0.0, -3.0], [0.0, 0.0, 2.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
    rng = np.random.default_rng(45)
    classes = rng.integers(0, 4, size=shape)
    labels = np.array([0, *LABEL_VALUES], np.uint8)[classes]
    image = (CENTERS[classes] + rng.normal(0, 40, size=shape)).astype(np.float32)
    ds = tmp_path / "Dataset045_Tilt"
    for data, where in ((image, "imagesTr/tilt_0000.nii.gz"), (labels, "labelsTr/tilt.nii.gz")):
        (ds / where).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), ds / where)
    source_affine = nib.load(ds / "imagesTr/tilt_0000.nii.gz").affine  # as the header holds it
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, **dict(zip(NAMES, LABEL_VALUES, strict=True))},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            }
        )
    )
    exported = _converted_predicted_exported(ds, "tilt", tmp_path)
    _, expected = reference_labels(image)
    assert exported.shape == shape
    np.testing.assert_array_equal(np.asanyarray(exported.dataobj), expected)
    np.testing.assert_array_equal(exported.affine, source_affine)


def test_an_export_that_ran_out_of_room_is_finished_with_skip_existing(nifti_predictions, tmp_path):
    """A full disk midway (a file size limit stands in: the same OSError from the same write)
    is one line naming the scan, the file and how far the run got; --skip-existing then
    exports the rest and leaves the scans already there byte for byte."""
    import resource
    import subprocess
    import sys

    pred, _ = nifti_predictions
    out = tmp_path / "out"
    assert run_cli("export", pred, out, "--scans", "case_001", "-q").returncode == 0
    first = (out / "case_001.nii.gz").read_bytes()

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    argv = [sys.executable, "-m", "service.cli", "export", str(pred), str(out), "-q", "--skip-existing"]
    full = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_files, timeout=240)
    assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
    assert "scan 'case_002': " in full.stderr and "File too large (0 of 1 exported; " in full.stderr
    assert sorted(p.name for p in out.iterdir()) == ["case_001.json", "case_001.nii.gz"]  # nothing partial
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "exported 1 scan (" in done.stdout and (out / "case_001.nii.gz").read_bytes() == first
    export_nifti(pred, tmp_path / "whole", scans=["case_002"], progress=False)  # one run, no stop
    resumed, whole = nib.load(out / "case_002.nii.gz"), nib.load(tmp_path / "whole" / "case_002.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(resumed.dataobj), np.asanyarray(whole.dataobj))
    np.testing.assert_array_equal(resumed.affine, whole.affine)
    both = run_cli("export", pred, out, "--overwrite", "--skip-existing")
    assert both.returncode == 1 and "not both" in both.stderr
    # asked for probabilities too: a scan without them is not complete, so it is written again
    more = run_cli("export", pred, out, "-q", "--skip-existing", "--probabilities", "--scans", "case_001")
    assert more.returncode == 0 and "exported 1 scan (" in more.stdout, more.stderr
    assert (out / "case_001_probabilities.nii.gz").exists()
    again = run_cli("export", pred, out, "-q", "--skip-existing", "--probabilities", "--scans", "case_001")
    assert again.returncode == 0 and "exported 0 scans (" in again.stdout


@pytest.mark.parametrize(
    "shape, sform_code, qform_code",
    [((9, 11, 5), 2, 0), ((9, 11, 5), 0, 1), ((9, 11, 5), 4, 1), ((12, 10), 1, 1), ((9, 11, 5), 0, 0)],
    ids=["aligned-sform-only", "qform-only", "mni-sform", "2d", "no-transform"],
)
def test_the_export_keeps_the_sources_header_codes_and_axes(tmp_path, shape, sform_code, qform_code):
    """A source's sform/qform codes (2 aligned, 4 MNI; a transform left unset) and a 2D file's
    two axes come back as they were, as nnU-Net's evaluation compares them."""
    affine = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 12.0], [0, 0, 2.5, -4.0], [0, 0, 0, 1.0]])
    rng = np.random.default_rng(7)
    classes = rng.integers(0, 4, size=shape)
    labels = np.array([0, *LABEL_VALUES], np.uint8)[classes]
    image = (CENTERS[classes] + rng.normal(0, 40, size=shape)).astype(np.float32)
    ds = tmp_path / "Dataset046_Codes"
    for data, where in ((image, "imagesTr/c_0000.nii.gz"), (labels, "labelsTr/c.nii.gz")):
        (ds / where).parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(data, None)
        img.set_sform(affine if sform_code else None, code=sform_code)
        img.set_qform(affine if qform_code else None, code=qform_code)
        nib.save(img, ds / where)
    source = nib.load(ds / "imagesTr/c_0000.nii.gz")
    labels_json = {"background": 0, **dict(zip(NAMES, LABEL_VALUES, strict=True))}
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels_json}))
    exported = _converted_predicted_exported(ds, "c", tmp_path)
    _, expected = reference_labels(image)
    assert exported.shape == shape
    np.testing.assert_array_equal(np.asanyarray(exported.dataobj), expected)
    assert (int(exported.header["sform_code"]), int(exported.header["qform_code"])) == (
        sform_code,
        qform_code,
    )
    np.testing.assert_allclose(exported.affine, source.affine, rtol=0, atol=1e-6)

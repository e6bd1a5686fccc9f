"""nnU-Net / Decathlon datasets of real NIfTI files (mricron-data) through `scancache preprocess`:
voxels, geometry, labels and names checked exactly against nibabel; bad cases fail one by one."""

from __future__ import annotations

import gzip
import json
import shutil
import struct

import numpy as np
import pytest
import zarr
from h5_sources import run_cli
from nifti_sources import (
    ANISO_ZOOMS,
    BAD_CASES,
    INTER,
    SLOPE,
    V2_CASES,
    build_bad_dataset,
    build_decathlon_dataset,
    build_two_channel_dataset,
    build_v2_dataset,
    colin,
    flip_permute,
    qform_only,
    requires_mricron,
    save,
    save_scaled,
    v2_dataset_json,
    write_json,
)

from store.label_map import LABEL_MAP

pytestmark = requires_mricron


def source_on_stored_grid(stored_affine, source_affine, source, shape):
    """The source's voxels at the stored voxels' world points: stored index i is world point
    ``A @ i``, which must be a source voxel centre ``B @ j`` (a lossless reorientation maps
    voxel centres onto voxel centres). Plain numpy on the two affines, no orientation code."""
    index = np.indices(shape).reshape(3, -1)
    homogeneous = np.vstack([index, np.ones((1, index.shape[1]))])
    j = (np.linalg.inv(np.asarray(source_affine)) @ np.asarray(stored_affine) @ homogeneous)[:3]
    rounded = np.rint(j).astype(np.int64)
    assert np.abs(j - rounded).max() < 1e-6, "stored voxel centres are source voxel centres"
    assert (rounded >= 0).all() and all((rounded[a] < source.shape[a]).all() for a in range(3))
    return source[tuple(rounded)].reshape(shape)


def convert(dataset, store, *more):
    result = run_cli("preprocess", dataset, store, "--workers", "1", "-q", *more)
    return result


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    dataset, store = build_v2_dataset(root / "Dataset001_Colin"), root / "store"
    result = convert(dataset, store)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 converted, 0 skipped, 0 failed" in result.stdout
    return dataset, store


def test_voxels_affine_spacing_and_labels_equal_nibabel(v2):
    import nibabel as nib
    from nibabel.affines import voxel_sizes
    from nibabel.orientations import aff2axcodes

    dataset, store = v2
    group = zarr.open_group(str(store), mode="r")
    kept = colin().kept
    for case in (*V2_CASES, "colin_test"):
        folder = "imagesTs" if case == "colin_test" else "imagesTr"
        labels_folder = "labelsTs" if case == "colin_test" else "labelsTr"
        img = nib.load(dataset / f"{folder}/{case}_0000.nii.gz")
        lab = nib.load(dataset / f"{labels_folder}/{case}.nii.gz")
        scan = group[case]
        attrs = dict(scan.attrs)
        affine = np.asarray(attrs["affine"])
        assert attrs["split"] == ("test" if case == "colin_test" else "train")
        assert np.array_equal(np.asarray(attrs["source_affine"]), img.affine), case
        assert attrs["source_shape"] == list(img.shape)
        assert aff2axcodes(affine) == ("P", "L", "S"), case
        assert attrs["spacing"] == pytest.approx(voxel_sizes(affine).tolist(), abs=1e-12)
        assert attrs["class_names"] == [name for _, name in kept]
        assert attrs["label_values"] == [value for value, _ in kept]
        assert attrs["channels"] == 1 and attrs["channel_names"] == ["T1"]
        image = scan["image"][...]
        truth = np.asarray(img.dataobj)
        assert image.dtype == truth.dtype, case
        assert np.array_equal(image, source_on_stored_grid(affine, img.affine, truth, image.shape)), case
        label_truth = source_on_stored_grid(affine, lab.affine, np.asarray(lab.dataobj), image.shape)
        mask = scan["mask"][...]
        assert mask.shape == (*image.shape, len(kept)) and mask.dtype == np.uint8
        for c, (value, _) in enumerate(kept):
            assert np.array_equal(mask[..., c], (label_truth == value).astype(np.uint8)), (case, c)
        label_map = scan[LABEL_MAP][...]
        expected_map = np.zeros(image.shape, np.uint8)
        for c, (value, _) in enumerate(kept):
            expected_map[label_truth == value] = c + 1
        assert np.array_equal(label_map, expected_map), case


def test_header_rules_sform_qform_scaling_and_spacing(v2):
    import nibabel as nib

    dataset, store = v2
    group = zarr.open_group(str(store), mode="r")
    c = colin()
    # integer data without scaling stays integer, in its own type
    assert group["colin_ras"]["image"].dtype == c.t1.get_data_dtype() == np.uint8
    # scl_slope/scl_inter applied: float, raw * slope + inter
    scaled = nib.load(dataset / "imagesTr/colin_scaled_0000.nii.gz")
    header = gzip.decompress((dataset / "imagesTr/colin_scaled_0000.nii.gz").read_bytes())[:348]
    assert struct.unpack_from("<ff", header, 112) == (SLOPE, INTER)  # scl_slope, scl_inter
    assert (scaled.dataobj.slope, scaled.dataobj.inter) == (SLOPE, INTER)  # nibabel moves them here
    stored = group["colin_scaled"]["image"][...]
    assert stored.dtype.kind == "f"
    raw = scaled.dataobj.get_unscaled().astype(np.float64) * SLOPE + INTER
    assert raw.dtype.kind == "f" and np.array_equal(np.unique(stored), np.unique(raw))
    ras = group["colin_ras"]["image"][...]
    assert np.array_equal(stored, ras.astype(np.float64) * SLOPE + INTER)
    # qform only (sform_code 0, a decoy sform matrix): the qform is the affine
    qform = nib.load(dataset / "imagesTr/colin_qform_0000.nii.gz")
    assert int(qform.header["sform_code"]) == 0 and int(qform.header["qform_code"]) == 1
    _, qaffine = qform_only(c.t1)
    assert np.allclose(group["colin_qform"].attrs["source_affine"], qaffine, rtol=0, atol=1e-5)
    shifted = np.asarray(group["colin_ras"].attrs["affine"])
    shifted[:3, 3] += (3.5, -2.0, 7.0)
    assert np.allclose(group["colin_qform"].attrs["affine"], shifted, rtol=0, atol=1e-5)
    assert np.array_equal(group["colin_qform"]["image"][...], ras)
    # the source's sform (mricron's files) is used as it is
    assert int(c.t1.header["sform_code"]) > 0 and int(c.t1.header["qform_code"]) == 0
    # stored axes (P, L, S) come from source axes (A, R, S) of a RAS file: spacing follows them
    sx, sy, sz = ANISO_ZOOMS
    assert group["colin_aniso"].attrs["spacing"] == pytest.approx([sy, sx, sz], abs=1e-6)
    assert np.array_equal(group["colin_aniso"]["image"][...], ras)


def test_a_reoriented_copy_is_stored_as_the_same_image(v2):
    """colin_flip holds colin_ras's voxels permuted and flipped with the matching affine: the
    same world image, so the same stored voxels and the same stored affine."""
    import nibabel as nib
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    dataset, store = v2
    group = zarr.open_group(str(store), mode="r")
    flip, ras = group["colin_flip"], group["colin_ras"]
    assert np.array_equal(flip["image"][...], ras["image"][...])
    assert np.array_equal(flip["mask"][...], ras["mask"][...])
    assert np.allclose(flip.attrs["affine"], ras.attrs["affine"], rtol=0, atol=1e-9)
    assert not np.allclose(flip.attrs["source_affine"], ras.attrs["source_affine"])
    # back to the source's voxel order, as docs/store-format.md says
    affine, source_affine = np.asarray(flip.attrs["affine"]), np.asarray(flip.attrs["source_affine"])
    back = ornt_transform(axcodes2ornt(("P", "L", "S")), io_orientation(source_affine))
    shape = flip["image"].shape
    assert np.allclose(affine @ inv_ornt_aff(back, shape), source_affine, atol=1e-9)
    source = nib.load(dataset / "imagesTr/colin_flip_0000.nii.gz")
    assert np.array_equal(apply_orientation(flip["image"][...], back), np.asarray(source.dataobj))


def test_two_channels_and_the_decathlon_form(tmp_path):
    import nibabel as nib

    two = build_two_channel_dataset(tmp_path / "two")
    decathlon = build_decathlon_dataset(tmp_path / "msd")
    for dataset, store in ((two, tmp_path / "s2"), (decathlon, tmp_path / "sd")):
        result = convert(dataset, store)
        assert result.returncode == 0, result.stdout + result.stderr
    scan = zarr.open_group(str(tmp_path / "s2"), mode="r")["colin2"]
    assert scan.attrs["channels"] == 2 and scan.attrs["channel_names"] == ["T1", "T1 brain"]
    affine = np.asarray(scan.attrs["affine"])
    for name, file in (("image", "colin2_0000"), ("image_c1", "colin2_0001")):
        img = nib.load(two / f"imagesTr/{file}.nii.gz")
        stored = scan[name][...]
        assert stored.dtype == img.get_data_dtype()
        assert np.array_equal(
            stored, source_on_stored_grid(affine, img.affine, np.asarray(img.dataobj), stored.shape)
        )
    msd = zarr.open_group(str(tmp_path / "sd"), mode="r")
    train, test = msd["colin_003"], msd["colin_004"]
    assert train.attrs["split"] == "train" and test.attrs["split"] == "test"
    assert train.attrs["class_names"] == [n for _, n in colin().kept]
    assert train.attrs["channel_names"] == ["MRI"]
    assert test.attrs["num_classes"] == 0 and "mask" not in test  # imagesTs without a label
    assert np.array_equal(test["image"][...], train["image"][...])  # a flipped copy: same image
    assert np.array_equal(msd["colin_0005"]["image"][...], train["image"][...])
    assert msd["colin_0005"].attrs["split"] == "train"
    result = run_cli("verify", decathlon, tmp_path / "sd")
    assert result.returncode == 0 and "store is exact" in result.stdout


def test_channels_of_different_dtypes_are_stored_in_one_and_verify_exactly(tmp_path):
    """A scaled int16 T1 (float64 once scaled) beside a plain brain-extracted T1: every channel
    is stored in their common dtype with the source's values, and verify finds it exact."""
    import nibabel as nib

    c = colin()
    dataset = tmp_path / "mixed"
    (dataset / "imagesTr").mkdir(parents=True)
    save_scaled(c.t1, dataset / "imagesTr/mixed_0000.nii.gz")
    save(c.t1_bet, dataset / "imagesTr/mixed_0001.nii.gz")
    save(c.labels, dataset / "labelsTr/mixed.nii.gz")
    write_json(dataset / "dataset.json", v2_dataset_json(c.kept, channels=("T1", "T1 brain"), num_training=1))
    result = convert(dataset, tmp_path / "store")
    assert result.returncode == 0, result.stdout + result.stderr
    scan = zarr.open_group(str(tmp_path / "store"), mode="r")["mixed"]
    affine = np.asarray(scan.attrs["affine"])
    sources = [nib.load(dataset / f"imagesTr/mixed_000{k}.nii.gz") for k in (0, 1)]
    want = np.result_type(*(np.asarray(img.dataobj).dtype for img in sources))
    assert np.asarray(sources[0].dataobj).dtype != np.asarray(sources[1].dataobj).dtype
    for name, img in zip(("image", "image_c1"), sources, strict=True):
        stored = scan[name][...]
        assert stored.dtype == want
        truth = source_on_stored_grid(affine, img.affine, np.asarray(img.dataobj), stored.shape)
        assert np.array_equal(stored, truth.astype(want))
    verified = run_cli("verify", dataset, tmp_path / "store")
    assert verified.returncode == 0 and "store is exact" in verified.stdout, verified.stdout


def test_a_decathlon_file_with_channels_along_its_4th_axis(tmp_path):
    import nibabel as nib

    c = colin()
    dataset = tmp_path / "msd4d"
    both = np.stack([np.asarray(c.t1.dataobj), np.asarray(c.t1_bet.dataobj)], axis=-1)
    save(nib.Nifti1Image(both, c.t1.affine), dataset / "imagesTr/brain_001.nii.gz")
    doc = {"modality": {"0": "T1", "1": "T1 brain"}, "labels": {"0": "background", "33": "a", "34": "b"}}
    write_json(dataset / "dataset.json", doc)
    labels = np.where(np.isin(np.asarray(c.labels.dataobj), [33, 34]), np.asarray(c.labels.dataobj), 0)
    save(nib.Nifti1Image(labels.astype(np.uint8), c.labels.affine), dataset / "labelsTr/brain_001.nii.gz")
    result = convert(dataset, tmp_path / "store")
    assert result.returncode == 0, result.stdout + result.stderr
    scan = zarr.open_group(str(tmp_path / "store"), mode="r")["brain_001"]
    assert scan.attrs["channels"] == 2 and scan.attrs["channel_names"] == ["T1", "T1 brain"]
    assert scan.attrs["class_names"] == ["a", "b"] and scan.attrs["label_values"] == [33, 34]
    affine = np.asarray(scan.attrs["affine"])
    for k, name in enumerate(("image", "image_c1")):
        stored = scan[name][...]
        assert np.array_equal(stored, source_on_stored_grid(affine, c.t1.affine, both[..., k], stored.shape))
    mask = scan["mask"][...]
    truth = source_on_stored_grid(affine, c.t1.affine, labels, mask.shape[:3])
    assert np.array_equal(mask[..., 1], (truth == 34).astype(np.uint8))


def test_each_bad_case_fails_in_one_line_and_the_good_one_converts(tmp_path):
    dataset, store = build_bad_dataset(tmp_path / "bad"), tmp_path / "store"
    result = convert(dataset, store)
    assert result.returncode == 1
    assert "1 converted, 0 skipped, 7 failed" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    for case, cause in BAD_CASES.items():
        (line,) = [line for line in lines if line.startswith(f"{case}: ")]
        assert cause in line, line
    assert zarr.open_group(str(store), mode="r")["good"].attrs["channels"] == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"labels": {"background": 0, "a": 1}', "does not parse as JSON"),
        (
            '{"labels": {"background": 0, "tumour": [1, 2], "core": 2}}',
            "label 'tumour' is a region ([1, 2]); give each value its own label "
            '("label 1": 1, "label 2": 2) and select the regions as overlapping CATEGORIES',
        ),
        ('{"labels": {"background": 0, "a": 1}, "file_ending": ".png"}', "is not NIfTI"),
        ('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply to be a dataset.json"),
    ],
)
def test_an_unusable_dataset_json_is_one_line_naming_it(tmp_path, text, words):
    dataset = build_two_channel_dataset(tmp_path / "ds")
    (dataset / "dataset.json").write_text(text)
    result = convert(dataset, tmp_path / "store")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert str(dataset / "dataset.json") in line and words in line, line


def test_rerun_skips_a_renamed_label_reconverts_and_verify_finds_a_bad_file(v2, tmp_path):
    dataset, store = v2
    copy, copy_store = tmp_path / "ds", tmp_path / "store"
    shutil.copytree(dataset, copy)  # copy2: same sizes and mtimes, so the same fingerprints
    shutil.copytree(store, copy_store, symlinks=True)
    again = convert(copy, copy_store)
    assert "0 converted, 6 skipped, 0 failed" in again.stdout, again.stdout
    doc = json.loads((copy / "dataset.json").read_text())
    first_name = next(name for name, value in doc["labels"].items() if value)
    doc["labels"]["renamed"] = doc["labels"].pop(first_name)
    (copy / "dataset.json").write_text(json.dumps(doc))
    renamed = convert(copy, copy_store)
    assert "6 converted, 0 skipped, 0 failed" in renamed.stdout, renamed.stdout
    names = zarr.open_group(str(copy_store), mode="r")["colin_ras"].attrs["class_names"]
    assert names[0] == "renamed"
    verified = run_cli("verify", copy, copy_store)
    assert verified.returncode == 0 and "6 ok; store is exact" in verified.stdout, verified.stdout
    bad = copy / "imagesTr/colin_scaled_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: one bad file
    verified = run_cli("verify", copy, copy_store)
    assert verified.returncode == 1
    assert "5 ok, 1 failed" in verified.stdout
    (line,) = [ln for ln in verified.stdout.splitlines() if ln.startswith("FAILED")]
    assert "colin_scaled: imagesTr/colin_scaled_0000.nii.gz: cannot read as NIfTI" in line


def stored_view_of_ras(volume):
    """A RAS crop as stored (axes P, L, S), by hand: stored[i, j, k] = source[nx-1-j, ny-1-i, k]."""
    return np.flip(volume.transpose(1, 0, 2), axis=(0, 1))


def test_a_loader_epoch_equals_numpy_slices_of_the_nibabel_data(v2):
    from loaders import Config, DatasetCatalog, build_loader

    _, store = v2
    c = colin()
    t1 = stored_view_of_ras(np.asarray(c.t1.dataobj))
    labels = stored_view_of_ras(np.asarray(c.labels.dataobj))
    # every training case is the crop's world image (or its voxels on another grid): the same
    # stored voxels, colin_scaled's rescaled
    images = {case: t1.astype(np.float32) for case in V2_CASES}
    images["colin_scaled"] = (t1.astype(np.float64) * SLOPE + INTER).astype(np.float32)
    values = [value for value, _ in c.kept]
    categories = (0, (1, 2), 9)
    DatasetCatalog.remove("colin_train")
    DatasetCatalog.register("colin_train", str(store), split="train")
    try:
        cfg = Config(SEED=0, CATEGORIES=categories, INCLUDE_BACKGROUND=True, IMG_SIZE=(56, 48, 1))
        loader = build_loader(cfg, "colin_train", batch_size=8, is_test=False, shuffle=False, drop_last=False)
        slices = [(case, z) for case in sorted(V2_CASES) for z in range(t1.shape[2])]
        seen = 0
        for b in range(len(loader)):
            x, y = loader[b]
            chunk = slices[b * 8 : (b + 1) * 8]
            x_ref = np.stack([images[case][:, :, z, None] for case, z in chunk])
            groups = [
                np.isin(labels[:, :, z], [values[i] for i in (g if isinstance(g, tuple) else (g,))])
                for _, z in chunk
                for g in categories
            ]
            fg = np.stack(groups).reshape(len(chunk), len(categories), *t1.shape[:2]).transpose(0, 2, 3, 1)
            y_ref = np.concatenate([(fg.sum(-1, keepdims=True) == 0), fg], -1).astype(np.float32)
            np.testing.assert_array_equal(x, x_ref)
            np.testing.assert_array_equal(y, y_ref)
            seen += len(chunk)
        assert seen == len(slices) == 5 * 40
    finally:
        DatasetCatalog.remove("colin_train")


@pytest.mark.slow
def test_a_tiny_unet_trains_on_the_converted_dataset(v2):
    import keras

    from loaders import Config, DatasetCatalog, build_loader

    _, store = v2
    DatasetCatalog.remove("colin_fit")
    DatasetCatalog.register("colin_fit", str(store), split="train")
    try:
        cfg = Config(SEED=0, CATEGORIES=(8, 9), INCLUDE_BACKGROUND=True, IMG_SIZE=(56, 48, 1))
        train = build_loader(cfg, "colin_fit", batch_size=8, is_test=False, shuffle=True, drop_last=True)
        keras.utils.set_random_seed(0)
        inputs = keras.Input((56, 48, 1))
        scaled = keras.layers.Rescaling(1 / 128.0)(inputs)
        c1 = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(scaled)
        down = keras.layers.MaxPooling2D()(c1)
        c2 = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(down)
        merged = keras.layers.Concatenate()([keras.layers.UpSampling2D()(c2), c1])
        outputs = keras.layers.Conv2D(cfg.get_num_classes(), 1, activation="softmax")(merged)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
        losses = model.fit(train, epochs=3, verbose=0).history["loss"]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert losses[-1] < 0.8 * losses[0], losses
    finally:
        DatasetCatalog.remove("colin_fit")


def test_medsegpy_class_names_and_spacing_flags(tmp_path):
    from service.sample_data import SPACING, write_sample_data

    data = write_sample_data(
        tmp_path / "src", subjects=2, visits=1, shape=(16, 16, 4), num_classes=3, fmt="both", splits=None
    )
    kinds = {scan.scan_id: scan.kind for scan in data.scans}
    store = tmp_path / "store"
    plain = convert(data.root, store)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    group = zarr.open_group(str(store), mode="r")
    for scan_id in kinds:  # without flags: as before, no names, no affine
        attrs = dict(group[scan_id].attrs)
        assert "class_names" not in attrs and "affine" not in attrs
    named = convert(data.root, store, "--class-names", "femur, tibia,patella", "--spacing", "0.5,0.25,2")
    assert "2 converted, 0 skipped, 0 failed" in named.stdout, named.stdout  # the flags re-convert
    group = zarr.open_group(str(store), mode="r")
    for scan_id, kind in kinds.items():
        attrs = dict(group[scan_id].attrs)
        assert attrs["class_names"] == ["femur", "tibia", "patella"]
        if kind == "2d":  # no spacing in the files: the flag's
            assert attrs["spacing"] == [0.5, 0.25, 2.0]
            assert attrs["affine"] == np.diag([0.5, 0.25, 2.0, 1.0]).tolist()
        else:  # the file's own spacing wins
            assert attrs["spacing"] == pytest.approx(list(SPACING)) and "affine" not in attrs
    assert (
        "0 converted, 2 skipped"
        in convert(data.root, store, "--class-names", "femur,tibia,patella", "--spacing", "0.5,0.25,2").stdout
    )
    wrong = convert(data.root, store, "--class-names", "a,b")
    assert wrong.returncode == 1 and "0 converted, 0 skipped, 2 failed" in wrong.stdout
    assert wrong.stdout.count("--class-names gives 2 names, the scan has 3 classes") == 2
    for flag, value, words in (
        ("--spacing", "0,1,1", "is not three positive numbers"),
        ("--spacing", "1,1", "is not three positive numbers"),
        ("--class-names", "a,,b", "has an empty name"),
        ("--class-names", "a,b,a", "names 'a' twice"),
    ):
        refused = convert(data.root, store, flag, value)
        assert refused.returncode == 2
        assert words in refused.stderr.strip().splitlines()[-1]


def test_flags_for_medsegpy_only_are_refused_for_a_dataset(v2, tmp_path):
    dataset, _ = v2
    refused = convert(dataset, tmp_path / "store", "--class-names", "a")
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "--class-names and --spacing are for MedSegPy sources" in line


def test_a_dataset_into_object_storage_resumes_and_verifies(v2, s3_url):
    """The same Dask job: an s3:// store, skip-by-fingerprint and verify work for NIfTI too."""
    dataset, _ = v2
    first = convert(dataset, s3_url)
    assert first.returncode == 0 and "6 converted, 0 skipped, 0 failed" in first.stdout, (
        first.stdout + first.stderr
    )
    again = convert(dataset, s3_url)
    assert "0 converted, 6 skipped, 0 failed" in again.stdout, again.stdout + again.stderr
    verified = run_cli("verify", dataset, s3_url)
    assert verified.returncode == 0 and "6 ok; store is exact" in verified.stdout, verified.stdout


def test_predictions_export_onto_each_source_grid(v2, tmp_path):
    """Predictions on the converted cases, exported as NIfTI: each file lies on its own source's
    grid (affine, shape) and holds the source label values; the flipped copy's export is the
    plain one's under the known flip, and the plain one's equals numpy's reference."""
    import nibabel as nib

    from loaders import Config, DatasetCatalog, build_loader, export_nifti, write_predictions

    dataset, store = v2
    c = colin()
    names = [name for _, name in c.kept[:3]]
    values = np.array([0, *[value for value, _ in c.kept[:3]]])
    centers = np.array([0.0, 60.0, 110.0, 170.0], np.float32)  # background and three classes

    def model(x):  # intensity bins as a softmax: a deterministic numpy 'model'
        scores = -(((np.asarray(x, np.float32) - centers) / np.float32(40.0)) ** 2)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    DatasetCatalog.remove("colin_predict")
    DatasetCatalog.register("colin_predict", str(store), scan_id=["colin_ras", "colin_flip", "colin_qform"])
    try:
        cfg = Config(CATEGORIES=tuple(names), INCLUDE_BACKGROUND=True)
        loader = build_loader(
            cfg, "colin_predict", batch_size=8, is_test=True, shuffle=False, drop_last=False
        )
        write_predictions(loader, model, tmp_path / "pred", progress=False)
    finally:
        DatasetCatalog.remove("colin_predict")
    export_nifti(tmp_path / "pred", tmp_path / "out", progress=False)
    exported = {}
    for case in ("colin_ras", "colin_flip", "colin_qform"):
        source = nib.load(dataset / f"imagesTr/{case}_0000.nii.gz")
        out = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        assert out.shape == source.shape and np.allclose(out.affine, source.affine, rtol=0, atol=1e-5), case
        exported[case] = np.asarray(out.dataobj)
        assert set(np.unique(exported[case])) <= set(values.tolist())
    t1 = np.asarray(c.t1.dataobj)
    stored = stored_view_of_ras(t1)
    # the (R, A, S) <-> (P, L, S) swap-and-flip is its own inverse: applied again, source order
    reference = stored_view_of_ras(values[model(stored[..., None]).argmax(-1)])
    assert len(np.unique(reference)) >= 3  # background and several classes predicted
    assert np.array_equal(exported["colin_ras"], reference)
    flipped = flip_permute(nib.Nifti1Image(exported["colin_ras"], c.t1.affine))
    assert np.array_equal(exported["colin_flip"], np.asarray(flipped.dataobj))
    assert np.array_equal(exported["colin_qform"], exported["colin_ras"])


@pytest.mark.parametrize(
    ("slope", "inter", "stored_dtype"),
    [(1.0, -1024.0, np.int16), (2.0, 40000.0, np.int32), (0.5, -1024.0, np.float64)],
)
def test_integer_scaled_voxels_are_stored_as_integers(tmp_path, slope, inter, stored_dtype):
    """CT as scanners write it (uint16 with scl_inter -1024): integers after scaling, stored in
    the smallest of int16/int32 that holds them instead of nibabel's float64, equal to
    nibabel's scaled values voxel for voxel; a fractional slope stays float64. verify agrees."""
    import nibabel as nib

    c = colin()
    dataset = tmp_path / "ct"
    (dataset / "imagesTr").mkdir(parents=True)
    save_scaled(c.t1, dataset / "imagesTr/ct_0000.nii.gz", slope=slope, inter=inter, raw_dtype=np.uint16)
    save(c.labels, dataset / "labelsTr/ct.nii.gz")
    write_json(dataset / "dataset.json", v2_dataset_json(c.kept, num_training=1))
    result = convert(dataset, tmp_path / "store")
    assert result.returncode == 0, result.stdout + result.stderr
    scan = zarr.open_group(str(tmp_path / "store"), mode="r")["ct"]
    stored = scan["image"][...]
    assert stored.dtype == stored_dtype
    source = nib.load(dataset / "imagesTr/ct_0000.nii.gz")
    assert np.dtype(source.get_data_dtype()) == np.uint16 and source.dataobj.slope == slope
    truth = source_on_stored_grid(
        np.asarray(scan.attrs["affine"]), source.affine, source.get_fdata(), stored.shape
    )
    assert np.array_equal(stored.astype(np.float64), truth)
    verified = run_cli("verify", dataset, tmp_path / "store")
    assert verified.returncode == 0 and "store is exact" in verified.stdout, verified.stdout


def test_verify_takes_the_float64_an_older_scancache_stored_for_integer_scaled_voxels():
    from service.verify import _stored_as

    assert _stored_as(np.dtype(np.float64), np.dtype(np.int16))
    assert _stored_as(np.dtype(np.int16), np.dtype(np.int16))
    assert not _stored_as(np.dtype(np.float32), np.dtype(np.int16))
    assert not _stored_as(np.dtype(np.float64), np.dtype(np.uint8))  # never scaled: its own type

"""``loaders.write_predictions``: a predictions store exact against numpy, atomic, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from live_server import live_server

from loaders import Config, DatasetCatalog, build_loader, write_predictions

CENTERS = np.array([40.0, 80.0, 100.0, 120.0, 160.0], np.float32)


def softmax_model(x):
    """A pointwise numpy 'model': softmax over closeness of each voxel to five intensities."""
    x = np.asarray(x, np.float32)
    scores = -(((x - CENTERS) / np.float32(30.0)) ** 2)
    scores -= scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def reference(image, mask):
    """Expected probabilities, labels and Dice, from the raw arrays with numpy alone."""
    probs = softmax_model(image.astype(np.float32)[..., None])
    labels = probs.argmax(-1)  # channel 0 is background -> 0; channel k -> category k-1 = label k
    dice = []
    for k in range(mask.shape[-1]):
        truth, pred = mask[..., k] > 0, labels == k + 1
        total = truth.sum() + pred.sum()
        dice.append(2 * (truth & pred).sum() / total if total else 1.0)
    return probs.astype(np.float16), labels.astype(np.uint8), dice


@pytest.fixture(scope="module")
def train_dataset(small_store):
    root, truth = small_store
    DatasetCatalog.remove("pred_train")
    DatasetCatalog.register("pred_train", str(root), split="train")
    yield "pred_train", truth
    DatasetCatalog.remove("pred_train")


def make_loader(name, tag="DefaultDataLoader", **extra):
    cfg = Config(TAG=tag, CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True, **extra)
    return build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)


def check_store(path, truth, scan_ids, loader="DefaultDataLoader"):
    group = zarr.open_group(str(path), mode="r")
    for scan_id in scan_ids:
        image, mask = truth[scan_id]
        probs, labels, dice = reference(image, mask)
        scan = group[scan_id]
        assert scan["probabilities"].dtype == np.float16 and scan["label_map"].dtype == np.uint8
        np.testing.assert_array_equal(scan["probabilities"][...], probs)
        np.testing.assert_array_equal(scan["label_map"][...], labels)
        attrs = scan.attrs["prediction"]
        np.testing.assert_allclose(attrs["dice"], dice, rtol=0, atol=1e-12)
        assert attrs["categories"] == [0, 1, 2, 3] and attrs["include_background"] is True
        assert attrs["written_at"].endswith("+00:00") and attrs["written_by"]["loader"] == loader


def test_written_store_matches_numpy_and_reruns_skip(train_dataset, tmp_path, capsys):
    name, truth = train_dataset
    path = tmp_path / "pred"
    summary = write_predictions(make_loader(name), softmax_model, path)
    scan_ids = ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    assert list(summary.written) == scan_ids and summary.skipped == ()
    check_store(path, truth, scan_ids)
    assert not (path / ".staging").exists()  # this writer's staging is gone
    assert all((path / s).is_symlink() for s in scan_ids)  # published as versions (store/publish.py)

    stamps = {s: (path / s / "zarr.json").stat().st_mtime_ns for s in scan_ids}
    again = write_predictions(make_loader(name), softmax_model, path)
    assert again.written == () and list(again.skipped) == scan_ids
    assert {s: (path / s / "zarr.json").stat().st_mtime_ns for s in scan_ids} == stamps
    # a re-run reports the Dice each skipped scan was stored with
    assert again.dice == summary.dice and list(again.dice) == scan_ids
    assert again.dice_by_class() == summary.dice_by_class()
    # the per-class mean over the scans, from numpy's Dice of each
    per_scan = [reference(*truth[s])[2] for s in scan_ids]
    names = summary.class_names[scan_ids[0]]
    want = {n: float(np.mean([d[k] for d in per_scan])) for k, n in enumerate(names)}
    assert summary.mean_dice() == pytest.approx(want, rel=1e-12) and len(want) == 4

    # a half-written scan (left in staging by a crash) is invisible; overwrite redoes every scan
    (path / ".staging" / "crashed-writer" / "0000001_V00-Aug00.1234").mkdir(parents=True)
    listed = zarr.open_group(str(path), mode="r").group_keys()  # in the filesystem's order
    assert sorted(s for s in listed if not s.startswith(".")) == scan_ids
    old = {s: (path / s).resolve() for s in scan_ids}
    capsys.readouterr()
    redo = write_predictions(make_loader(name), softmax_model, path, overwrite=True, progress=True)
    assert list(redo.written) == scan_ids
    assert "write_predictions: 2/2 scans (" in capsys.readouterr().err  # progress (a bar on a terminal)
    assert all((path / s).resolve() != old[s] for s in scan_ids)
    assert not (path / ".staging").exists()  # the dead writer's folder was cleaned
    check_store(path, truth, scan_ids)


def test_patch_loader_and_remote_dataset_write_the_same(train_dataset, small_store, tmp_path):
    name, truth = train_dataset
    root, _ = small_store
    patch = make_loader(name, "PatchDataLoader", IMG_SIZE=(16, 16, 4, 1), IMG_STRIDE=(12, 12, 3))
    write_predictions(patch, softmax_model, tmp_path / "patch")
    check_store(tmp_path / "patch", truth, ["0000001_V00-Aug00", "0000001_V01-Aug00"], "PatchDataLoader")
    with live_server(root) as url:
        DatasetCatalog.remove("pred_remote")
        DatasetCatalog.register("pred_remote", url, split="train")
        try:
            write_predictions(make_loader("pred_remote"), softmax_model, tmp_path / "remote")
        finally:
            DatasetCatalog.remove("pred_remote")
    check_store(tmp_path / "remote", truth, ["0000001_V00-Aug00", "0000001_V01-Aug00"])


def test_refuses_to_write_into_a_scan_store(train_dataset, small_store):
    name, _ = train_dataset
    root, _ = small_store
    before = json.loads((root / "zarr.json").read_text())
    with pytest.raises(ValueError, match="not a predictions store"):
        write_predictions(make_loader(name), softmax_model, root)
    assert json.loads((root / "zarr.json").read_text()) == before


def test_prediction_is_an_ngff_label_image(train_dataset, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    name, truth = train_dataset
    path = tmp_path / "pred"
    write_predictions(make_loader(name), softmax_model, path)
    scan_id = "0000001_V00-Aug00"
    nodes = list(Reader(parse_url(str(path / scan_id)))())
    node = nodes[0]
    assert any(isinstance(spec, Label) for spec in node.specs)
    _, labels, _ = reference(*truth[scan_id])
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels.transpose(2, 0, 1))  # upright: (z, y, x)
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": [1.0, 1.0, 1.0]}]]

    from ome_zarr_models.v05.image_label import ImageLabel  # a second, strict NGFF 0.5 reader

    model = ImageLabel.from_zarr(zarr.open_group(str(path / scan_id), mode="r"))
    assert [c.label_value for c in model.attributes.ome.image_label.colors] == [1, 2, 3, 4]


def test_prediction_label_image_has_the_scans_spacing(tmp_path):
    """A scan with a spacing: its prediction opens in ngff-zarr (validated) in millimetres."""
    import ngff_zarr

    from store.writer import write_scan

    rng = np.random.default_rng(5)
    image = rng.normal(100, 40, size=(24, 20, 6)).astype(np.float32)
    mask = np.stack([rng.random(image.shape) < 0.2, np.zeros(image.shape, bool)], -1).astype(np.uint8)
    write_scan(
        tmp_path / "store", "0000009_V00-Aug00", image, mask, {"split": "train", "spacing": [0.4, 0.5, 1.5]}
    )
    DatasetCatalog.remove("pred_spacing")
    DatasetCatalog.register("pred_spacing", str(tmp_path / "store"), split="train")
    try:
        cfg = Config(CATEGORIES=(0, 1), INCLUDE_BACKGROUND=True)
        loader = build_loader(cfg, "pred_spacing", batch_size=2, is_test=True, shuffle=False, drop_last=False)
        write_predictions(loader, softmax_model, tmp_path / "pred")
    finally:
        DatasetCatalog.remove("pred_spacing")
    scan = tmp_path / "pred" / "0000009_V00-Aug00"
    label_image = ngff_zarr.from_ngff_zarr(str(scan), validate=True).images[0]
    assert label_image.dims == ("z", "y", "x") and label_image.scale == {"z": 1.5, "y": 0.4, "x": 0.5}
    stored = zarr.open_array(str(scan / "label_map"), mode="r")[...]
    np.testing.assert_array_equal(np.asarray(label_image.data), stored.transpose(2, 0, 1))


def test_second_writer_fails_at_once_naming_the_first(train_dataset, tmp_path):
    """Two runs into one folder: the second is refused while the first writes (before, both
    found every scan missing and both published it)."""
    import os
    import socket
    import threading

    from store.lock import StoreLocked

    name, truth = train_dataset
    path = tmp_path / "pred"
    inside, go_on = threading.Event(), threading.Event()

    def slow_model(x):
        inside.set()
        assert go_on.wait(30)
        return softmax_model(x)

    results = {}
    first = threading.Thread(
        target=lambda: results.update(first=write_predictions(make_loader(name), slow_model, path))
    )
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(StoreLocked) as refused:
            write_predictions(make_loader(name), softmax_model, path)
    finally:
        go_on.set()
        first.join(30)
    message = str(refused.value)
    assert "\n" not in message and "another write_predictions is writing" in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and ".lock" in message
    scan_ids = ["0000001_V00-Aug00", "0000001_V01-Aug00"]
    assert list(results["first"].written) == scan_ids
    assert not (path / ".lock").exists()  # released at the end
    again = write_predictions(make_loader(name), softmax_model, path)
    assert again.written == () and list(again.skipped) == scan_ids
    check_store(path, truth, scan_ids)


def test_more_categories_than_a_label_map_holds_is_one_line_naming_the_scan(train_dataset, tmp_path):
    """A model with 256 outputs (an atlas of hundreds of regions) and no background channel:
    refused before anything of the scan is written; 255 categories plus background fit."""
    name, _ = train_dataset
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=False)
    loader = build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)
    first = sorted(s.scan_id for s in loader.scans)[0]
    wide = lambda x: np.full((*x.shape[:3], 256), 1 / 256, np.float32)  # noqa: E731
    with pytest.raises(ValueError) as err:
        write_predictions(loader, wide, tmp_path / "pred", progress=False)
    assert str(err.value) == (
        f"scan {first!r}: 256 categories do not fit the predictions' uint8 label map (at most 255); "
        "predict at most 255 at a time (CATEGORIES)"
    )
    assert not (tmp_path / "pred" / first).exists() and not any((tmp_path / "pred" / ".staging").glob("*"))
    from loaders.predictions import label_map

    probs = np.zeros((2, 256), np.float32)
    probs[0, 255] = probs[1, 0] = 1.0
    np.testing.assert_array_equal(label_map(probs, include_background=True), [255, 0])


def test_model_outputs_that_cannot_be_stored_as_they_are_say_so_naming_the_scan(train_dataset, tmp_path):
    """NaN in a scan's output is refused (a label map of zeros and Dice 0 would look like a
    result); a pooled or flat output names the scan and the window; a model of other categories
    is stored with a warning (no names, no Dice), not silently."""
    name, _ = train_dataset
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)

    def loader():
        return build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)

    first = sorted(s.scan_id for s in loader().scans)[0]
    nan = lambda x: np.full((*x.shape[:3], 5), np.nan, np.float32)  # noqa: E731
    with pytest.raises(
        ValueError,
        match=rf"^scan '{first}': the model's output holds \d+ NaN or infinite values; nothing written$",
    ):
        write_predictions(loader(), nan, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / first).exists()
    pooled = lambda x: np.ones((x.shape[0], x.shape[1] // 2, x.shape[2] // 2, 5), np.float32)  # noqa: E731
    flat = lambda x: np.ones((x.shape[0], 5), np.float32)  # noqa: E731
    for model, shape in ((pooled, "(20, 18, 5)"), (flat, "(5,)")):
        with pytest.raises(ValueError) as info:
            list(loader().inference(model))
        assert str(info.value).startswith(
            f"scan '{first}': the model's output for one example is {shape}, but"
        )
        assert "one value per voxel of its 40x36x1 window" in str(info.value)
    three = lambda x: np.full((*x.shape[:3], 3), 1 / 3, np.float32)  # noqa: E731
    with pytest.warns(
        UserWarning, match=r"the model predicts 3 channels, but the loader's categories .* are 5"
    ):
        assert write_predictions(loader(), three, tmp_path / "three", progress=False).written


def test_logits_are_stored_with_one_warning_a_run(train_dataset, tmp_path):
    """A model ending without softmax (nnU-Net's networks give logits): its outputs are stored as
    they are, with one warning for the run naming the range, not one per scan nor none."""
    import warnings

    name, _ = train_dataset
    loader = make_loader(name)
    logits = lambda x: np.concatenate([x * 0.0 - 8.0, *[x * 0.0 + 8.0 * k for k in range(4)]], axis=-1)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = write_predictions(loader, logits, tmp_path / "logits", progress=False)
    said = [str(w.message) for w in caught if "not probabilities" in str(w.message)]
    assert len(said) == 1 and len(summary.written) == len(loader.scans) >= 2
    assert "range from -8 to 24, not probabilities in [0, 1] (logits?)" in said[0]
    # a softmax's float32 rounding past 1 is no reason to warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_predictions(make_loader(name), softmax_model, tmp_path / "softmax", progress=False)
    assert not [w for w in caught if "not probabilities" in str(w.message)]

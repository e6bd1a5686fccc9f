"""``loader.inference(model)``: per-scan outputs, and exact stitching of overlapping patches."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import zarr
from conftest import build_store

from loaders import Config, DatasetCatalog, build_loader

# Shapes no grid below divides: patches (8, 7, 4) with strides (5, 4, 3) and the tail snapped.
ODD_SCANS = [
    ("0000011_V00-Aug00", (21, 19, 11), 3, "test", 11, 0, 0, np.float32),
    ("0000012_V00-Aug00", (13, 23, 6), 3, "test", 12, 0, 0, np.int16),
    ("0000013_V00-Aug00", (7, 9, 3), 3, "test", 13, 0, 0, np.float32),  # smaller than one patch
]


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd") / "store"
    build_store(root, scans=ODD_SCANS, image_only=())
    group = zarr.open_group(str(root), mode="r")
    arrays = {s[0]: (group[s[0]]["image"][...], group[s[0]]["mask"][...]) for s in ODD_SCANS}
    DatasetCatalog.remove("odd_test")
    DatasetCatalog.register("odd_test", str(root), split="test")
    yield root, arrays
    DatasetCatalog.remove("odd_test")


def pointwise(x):
    """A numpy model whose output at a voxel depends on that voxel only (float32 exact ops)."""
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([x * np.float32(2.0) + np.float32(1.0), x * x], axis=-1)


def keras_pointwise():
    inputs = keras.Input((None, None, None, 1))
    outputs = keras.layers.Lambda(
        lambda t: keras.ops.concatenate([t * 2.0 + 1.0, t * t], axis=-1), output_shape=(None, None, None, 2)
    )(inputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("blend", ["average", "gaussian"])
@pytest.mark.parametrize("pad", [(), 2])
def test_stitched_patches_of_a_pointwise_model_are_exact(odd_store, blend, pad):
    _, arrays = odd_store
    cfg = Config(
        TAG="PatchDataLoader",
        IMG_SIZE=(8, 7, 4, 1),
        IMG_STRIDE=(5, 4, 3),
        IMG_PAD_SIZE=pad,
        IMG_PAD_MODE="reflect",
        BLEND_MODE=blend,
        CATEGORIES=(0, (1, 2)),
        INCLUDE_BACKGROUND=True,
    )
    loader = build_loader(cfg, "odd_test", batch_size=7, is_test=True, shuffle=False, drop_last=False)
    results = list(loader.inference(pointwise))
    assert [i["scan_id"] for i, _ in results] == sorted(arrays)
    for inputs, outputs in results:
        image, mask = arrays[inputs["scan_id"]]
        volume = image.astype(np.float32)
        np.testing.assert_array_equal(inputs["x"], volume)
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(volume[..., None]))
        assert outputs["y_pred"].dtype == np.float32
        merged = np.stack([mask[..., 0], mask[..., 1] + mask[..., 2]], -1)
        background = (merged.sum(-1, keepdims=True) == 0).astype(np.float32)
        np.testing.assert_array_equal(outputs["y_true"], np.concatenate([background, merged], -1))
        assert outputs["time_elapsed"] >= 0
        assert inputs["scan_split"] == "test" and inputs["subject_id"] == inputs["scan_subject_id"]


def test_a_keras_model_stitches_exactly_too(odd_store):
    _, arrays = odd_store
    cfg = Config(TAG="PatchDataLoader", IMG_SIZE=(8, 7, 4, 1), IMG_STRIDE=(3, 5, 2), BLEND_MODE="gaussian")
    loader = build_loader(cfg, "odd_test", batch_size=16, is_test=True, shuffle=False, drop_last=False)
    model = keras_pointwise()
    for inputs, outputs in loader.inference(model, batch_size=16):
        volume = arrays[inputs["scan_id"]][0].astype(np.float32)
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(volume[..., None]))
        assert outputs["y_true"].shape == (*volume.shape, 3)


def test_2d_and_25d_inference_restore_volumes(odd_store):
    _, arrays = odd_store
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(2,))
    loader = build_loader(cfg, "odd_test", batch_size=4, is_test=True, shuffle=False, drop_last=False)
    for inputs, outputs in loader.inference(pointwise, workers=4, use_multiprocessing=False):
        image, mask = arrays[inputs["scan_id"]]
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(image.astype(np.float32)[..., None]))
        np.testing.assert_array_equal(outputs["y_true"], mask[..., 2:3].astype(np.float32))

    cfg = Config(TAG="S25dDataLoader", IMG_SIZE=(0, 0, 3), CATEGORIES=(1, 2))

    def centre_only(x):  # (N, H, W, 3) -> the centre slice's pointwise output
        return pointwise(x[..., 1:2])

    loader = build_loader(cfg, "odd_test", batch_size=5, is_test=True, shuffle=False, drop_last=False)
    for inputs, outputs in loader.inference(centre_only):
        image, mask = arrays[inputs["scan_id"]]
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(image.astype(np.float32)[..., None]))
        np.testing.assert_array_equal(outputs["y_true"], mask[..., 1:3].astype(np.float32))

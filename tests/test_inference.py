"""``loader.inference(model)``: per-scan outputs, and exact stitching of overlapping patches."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import zarr
from conftest import build_store
from hypothesis import given, settings
from hypothesis import strategies as st

from loaders import Config, DatasetCatalog, build_loader
from loaders.build import get_dataset_dicts
from loaders.geometry import PatchGrid, blend_weights
from loaders.patches import PatchDataLoader
from loaders.stitching import Aggregator, windows_disjoint

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
        spacing = zarr.open_group(str(odd_store[0]), mode="r")[inputs["scan_id"]].attrs.get(
            "spacing", [1, 1, 1]
        )
        assert inputs["scan_spacing"] == tuple(float(s) for s in spacing)


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

    cfg = Config(TAG="S25dDataLoader", IMG_SIZE=(288, 288, 3), CATEGORIES=(1, 2))

    def centre_only(x):  # (N, H, W, 3) -> the centre slice's pointwise output
        return pointwise(x[..., 1:2])

    loader = build_loader(cfg, "odd_test", batch_size=5, is_test=True, shuffle=False, drop_last=False)
    for inputs, outputs in loader.inference(centre_only):
        image, mask = arrays[inputs["scan_id"]]
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(image.astype(np.float32)[..., None]))
        np.testing.assert_array_equal(outputs["y_true"], mask[..., 1:3].astype(np.float32))


# -- stitching internals: overlap detection, float32 running mean, zero weights ----------------


def coverage_count(windows, shape):
    count = np.zeros(shape, np.int32)
    for window in windows:
        count[
            tuple(slice(max(a, 0), max(min(b, n), 0)) for (a, b), n in zip(window, shape, strict=True))
        ] += 1
    return count


@st.composite
def window_sets(draw):
    shape = tuple(draw(st.integers(1, 9)) for _ in range(3))
    if draw(st.booleans()):  # a grid, overlapping or not
        patch = tuple(draw(st.integers(1, 6)) for _ in range(3))
        stride = tuple(draw(st.integers(1, p)) for p in patch)
        return shape, list(PatchGrid.build(shape, patch, stride).windows())
    starts = st.integers(-3, 9)
    windows = []
    for _ in range(draw(st.integers(1, 6))):
        lo = [draw(starts) for _ in range(3)]
        windows.append(tuple((a, a + draw(st.integers(1, 5))) for a in lo))
    return shape, windows


@settings(max_examples=150, deadline=None)
@given(window_sets())
def test_windows_disjoint_never_claims_an_overlap_away(case):
    shape, windows = case
    if windows_disjoint(windows, shape):
        assert coverage_count(windows, shape).max() <= 1


def test_windows_disjoint_recognises_slices_and_plain_grids():
    shape = (7, 5, 6)
    assert windows_disjoint([((0, 7), (0, 5), (z, z + 1)) for z in range(6)], shape)
    assert windows_disjoint([((0, 7), (x, x + 1), (0, 6)) for x in range(5)], shape)
    assert windows_disjoint(PatchGrid.build((8, 6, 4), (4, 3, 2)).windows(), (8, 6, 4))
    assert not windows_disjoint(PatchGrid.build((9, 6, 4), (4, 3, 2)).windows(), (9, 6, 4))  # snapped tail
    assert not windows_disjoint([((0, 2), (0, 2), (0, 2))] * 2, shape)


@pytest.mark.parametrize("mode", ["average", "gaussian"])
def test_blending_different_predictions_matches_a_float64_reference(mode):
    """Overlaps of *different* predictions: the float32 running mean equals sum(w p) / sum(w)."""
    shape, patch, channels = (13, 11, 9), (6, 5, 4), 3
    grid = PatchGrid.build(shape, patch, (4, 3, 3), (1, 0, 2))
    weights = blend_weights(patch, mode)
    rng = np.random.default_rng(7)
    agg = Aggregator(shape, channels)
    num = np.zeros((*shape, channels))
    den = np.zeros(shape)
    for window in grid.windows():
        pred = rng.normal(size=(*patch, channels)).astype(np.float32)
        agg.add(window, pred, weights)
        inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(window, shape, strict=True))
        local = tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(inside, window, strict=True))
        w = weights.astype(np.float32).astype(np.float64)[local]
        num[inside] += pred[local].astype(np.float64) * w[..., None]
        den[inside] += w
    result = agg.result()
    assert result.dtype == np.float32 and (den > 0).all()
    np.testing.assert_allclose(result, num / den[..., None], rtol=2e-5, atol=2e-6)


def test_disjoint_windows_are_copied_exactly_and_zero_weights_uncover():
    shape = (6, 4, 5)
    windows = list(PatchGrid.build(shape, (3, 2, 5)).windows())
    rng = np.random.default_rng(3)
    preds = [rng.normal(size=(3, 2, 5, 2)) for _ in windows]  # float64: rounds once to float32
    weights = blend_weights((3, 2, 5), "gaussian")
    weights[0, 0, 0] = 0.0  # a custom loader may leave a voxel out
    fast, blended = Aggregator(shape, 2, disjoint=True), Aggregator(shape, 2)
    truth = np.zeros((*shape, 2), np.float32)
    for window, pred in zip(windows, preds, strict=True):
        fast.add(window, pred, weights)
        blended.add(window, pred, weights)
        region = tuple(slice(a, b) for a, b in window)
        truth[region] = pred
        truth[region][0, 0, 0] = 0
    np.testing.assert_array_equal(fast.result(), truth)
    np.testing.assert_array_equal(blended.result(), truth)
    left_out = np.zeros(shape, bool)
    for window in windows:
        left_out[window[0][0], window[1][0], window[2][0]] = True
    np.testing.assert_array_equal(fast.covered(), ~left_out)
    np.testing.assert_array_equal(blended.covered(), ~left_out)


def test_an_overriding_preprocess_sees_the_real_targets(odd_store):
    """inference cuts targets for preprocess only when a loader overrides it, and then correctly."""
    _, arrays = odd_store
    seen = []

    class Recording(PatchDataLoader):
        def preprocess(self, x, y):
            seen.append((x.copy(), y.copy()))
            return x * np.float32(2.0), y

    cfg = Config(TAG="PatchDataLoader", IMG_SIZE=(8, 7, 4, 1), IMG_STRIDE=(5, 4, 3), CATEGORIES=(1, 2))
    loader = Recording(cfg, get_dataset_dicts("odd_test"), is_test=True, shuffle=False, batch_size=4)
    for inputs, outputs in loader.inference(pointwise):
        image = arrays[inputs["scan_id"]][0]
        np.testing.assert_array_equal(outputs["y_pred"], pointwise(2 * image.astype(np.float32)[..., None]))
    assert seen and all(y.shape == (*x.shape[:-1], 2) for x, y in seen)
    # each batch's y is the mask window of each x (a pointwise check on in-volume windows)
    y0 = seen[0][1]
    volume_mask = arrays[sorted(arrays)[0]][1][..., 1:3].astype(np.float32)
    np.testing.assert_array_equal(y0[0], volume_mask[0:8, 0:7, 0:4])


def test_inference_inputs_carry_the_scans_spacing(tmp_path):
    """MedSegPy's evaluators read ``scan_spacing`` (mm) for surface distances: the store's
    spacing attribute, as zarr-python reads it, reaches each scan's inference inputs."""
    from store.writer import write_scan

    root = tmp_path / "store"
    image = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
    mask = np.stack([image % 2 == 0, image % 2 == 1], -1).astype(np.uint8)
    write_scan(root, "0000009_V00-Aug00", image, mask, {"split": "test", "spacing": [0.31, 0.29, 0.7]})
    DatasetCatalog.remove("spaced")
    DatasetCatalog.register("spaced", str(root), split="test")
    try:
        cfg = Config(TAG="PatchDataLoader", IMG_SIZE=(6, 5, 3, 1))
        loader = build_loader(cfg, "spaced", batch_size=1, is_test=True, shuffle=False, drop_last=False)
        [(inputs, _)] = list(loader.inference(pointwise))
    finally:
        DatasetCatalog.remove("spaced")
    want = zarr.open_group(str(root), mode="r")["0000009_V00-Aug00"].attrs["spacing"]
    assert inputs["scan_spacing"] == tuple(want) == (0.31, 0.29, 0.7)


@pytest.mark.parametrize("setting", [{"Y_DTYPE": "uint8"}, {"Y_FORMAT": "class_index"}])
def test_y_true_comes_in_the_loaders_y_dtype(odd_store, setting):
    """uint8 y (Y_DTYPE or class indices) keeps inference's y_true uint8: a quarter of the
    memory of float32, which is most of it for many classes; the values are the same."""
    _, arrays = odd_store
    cfg = Config(
        TAG="PatchDataLoader",
        IMG_SIZE=(8, 7, 4, 1),
        IMG_STRIDE=(5, 4, 3),
        CATEGORIES=(0, (1, 2)),
        INCLUDE_BACKGROUND=True,
        **setting,
    )
    loader = build_loader(cfg, "odd_test", batch_size=7, is_test=True, shuffle=False, drop_last=False)
    for inputs, outputs in loader.inference(lambda x: np.zeros((*np.shape(x)[:-1], 3), np.float32)):
        _, mask = arrays[inputs["scan_id"]]
        merged = np.stack([mask[..., 0], mask[..., 1] + mask[..., 2]], -1)
        background = (merged.sum(-1, keepdims=True) == 0).astype(np.uint8)
        assert outputs["y_true"].dtype == np.uint8
        np.testing.assert_array_equal(outputs["y_true"], np.concatenate([background, merged], -1))


def test_a_callable_giving_a_list_of_one_prediction_per_example_is_stacked():
    """A plain callable may return one array per example (a list): stacked into the batch, as
    before several outputs were told apart; a list of outputs each with the batch axis is
    several outputs (the first stitched)."""
    from loaders.inference import predict_batch

    x = np.arange(2 * 5 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 1)
    per_example = predict_batch(lambda b: [e * 2 for e in b], x, {})
    np.testing.assert_array_equal(per_example, x * 2)
    outputs = predict_batch(lambda b: [b * 3, b[:, ::2, ::2]], x, {})
    np.testing.assert_array_equal(outputs, x * 3)
    # told apart by rank, not by a length that may equal the batch (2 channels, 2 examples)
    two = np.zeros((2, 6, 5, 2), np.float32)
    stacked = predict_batch(lambda b: [e + 1 for e in b], two, {"channels_first": True})
    np.testing.assert_array_equal(stacked, two + 1)

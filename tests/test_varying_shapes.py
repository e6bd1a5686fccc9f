"""Scans whose slices differ in shape (nnU-Net cases do) with Keras and tf.data: the spec leaves
the varying axes free, so fit/evaluate on the loader and on ``as_tf_dataset()`` see every
batch whatever the order, each equal to the store's voxels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_store

from loaders import Config, DatasetCatalog, build_loader

SCANS = [
    ("0000001_V00-Aug00", (24, 20, 3), 3, "train", 1, 0, 0, np.float32),
    ("0000002_V00-Aug00", (20, 28, 2), 3, "train", 2, 0, 0, np.float32),
    ("0000003_V00-Aug00", (24, 20, 2), 3, "train", 3, 0, 0, np.float32),
]


@pytest.fixture(scope="module")
def varying(tmp_path_factory):
    root = tmp_path_factory.mktemp("varying") / "store"
    truth = build_store(root, SCANS, image_only=())
    DatasetCatalog.register("varying_shapes", str(root), split="train")
    yield truth
    DatasetCatalog.remove("varying_shapes")


def _model():
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(inputs))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def _loader(is_test: bool, shuffle: bool):
    cfg = Config(TAG="DefaultDataLoader", SEED=0, CATEGORIES=(1, 2))
    return build_loader(cfg, "varying_shapes", 1, is_test, shuffle, False)


def _slices(truth):
    return {(s, z): truth[s][0][:, :, z] for s in truth for z in range(truth[s][0].shape[2])}


def test_tf_dataset_spec_leaves_varying_axes_free_and_gives_the_stored_slices(varying):
    pytest.importorskip("tensorflow")
    loader = _loader(is_test=False, shuffle=False)
    ds = loader.as_tf_dataset()
    x_spec, y_spec = ds.element_spec
    assert tuple(x_spec.shape) == (1, None, None, 1) and tuple(y_spec.shape) == (1, None, None, 2)
    got = [x.numpy()[0, :, :, 0] for x, _ in ds]
    want = list(_slices(varying).values())  # unshuffled: scan by scan, slice by slice
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("is_test", [False, True], ids=["train", "test"])
def test_fit_and_evaluate_on_the_loader_take_every_slice_shape(varying, is_test):
    loader = _loader(is_test=is_test, shuffle=False)  # the first two batches share one shape
    model = _model()
    if not is_test:
        history = model.fit(loader, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all() and len(history.history["loss"]) == 2
    # evaluate's loss is the mean over the slices, each scored at its own shape
    want = np.mean([float(model.evaluate(loader[b][0], loader[b][1], verbose=0)) for b in range(len(loader))])
    assert np.isclose(model.evaluate(loader, verbose=0), want, rtol=1e-5)

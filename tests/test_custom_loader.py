"""Runs the worked example of docs/custom-dataloader.md (the code is taken from the page)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from loaders import LOADER_REGISTRY, Config, DataLoader, DatasetCatalog, build_loader, register_loader

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom-dataloader.md"
SCAN = "0000001_V00-Aug00"


@pytest.fixture(scope="module")
def example():
    """Execute the page's first Python block, which defines and registers the loaders."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    yield namespace
    for name in ("SagittalSliceLoader", "ZScoreDataLoader"):
        LOADER_REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def dataset(small_store):
    root, _ = small_store
    DatasetCatalog.remove("custom_train")
    DatasetCatalog.register("custom_train", str(root), split="train", time_point=0)
    group = zarr.open_group(str(root), mode="r")
    yield "custom_train", group[SCAN]["image"][...], group[SCAN]["mask"][...]
    DatasetCatalog.remove("custom_train")


def test_the_example_registers_loaders_selected_by_tag(example, dataset):
    name, image, mask = dataset
    assert issubclass(LOADER_REGISTRY["SagittalSliceLoader"], DataLoader)
    cfg = Config(TAG="SagittalSliceLoader", CATEGORIES=(0, (1, 2), 3), INCLUDE_BACKGROUND=True, SEED=1)
    loader = build_loader(cfg, name, batch_size=5, is_test=False, shuffle=True, drop_last=True)
    assert type(loader).__name__ == "SagittalSliceLoader"
    assert len(loader) == image.shape[1] // 5
    x, y = loader[1]
    assert x.shape == (5, image.shape[0], image.shape[2], 1) and y.shape == (
        5,
        image.shape[0],
        image.shape[2],
        4,
    )
    for i, element in enumerate(loader.batch_elements(1)):
        col = element.window[1][0]
        np.testing.assert_array_equal(x[i, ..., 0], image[:, col, :])
        merged = np.stack(
            [mask[:, col, :, 0], mask[:, col, :, 1] + mask[:, col, :, 2], mask[:, col, :, 3]], -1
        )
        np.testing.assert_array_equal(y[i, ..., 1:], merged)
        np.testing.assert_array_equal(y[i, ..., 0], merged.sum(-1) == 0)


def test_the_example_runs_inference_back_to_volumes(example, dataset):
    name, image, _ = dataset
    cfg = Config(TAG="SagittalSliceLoader", CATEGORIES=(1,))
    loader = build_loader(cfg, name, batch_size=8, is_test=True, shuffle=False, drop_last=False)
    ((inputs, outputs),) = list(loader.inference(lambda x: x * np.float32(3.0)))
    assert inputs["scan_id"] == SCAN
    np.testing.assert_array_equal(outputs["y_pred"][..., 0], image * np.float32(3.0))


def test_the_normalizing_example(example, dataset):
    name, image, _ = dataset
    cfg = Config(TAG="ZScoreDataLoader", CATEGORIES=(1,))
    loader = build_loader(cfg, name, batch_size=4, is_test=True, shuffle=False, drop_last=False)
    x, _, x_raw = loader[0]
    np.testing.assert_array_equal(x_raw[..., 0], np.moveaxis(image[:, :, :4], 2, 0))
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-4)  # each slice, each channel
    np.testing.assert_allclose(x.std(axis=(1, 2)), 1, atol=1e-3)


def test_a_loader_ported_with_medsegpys_hooks_is_refused_naming_what_to_override():
    """MedSegPy's _load_input / _preprocess would never be called: the batches would silently
    be the defaults. Defining one is refused where the class is defined."""
    from loaders import DefaultDataLoader

    with pytest.raises(TypeError) as info:

        class Ported(DefaultDataLoader):
            def _preprocess(self, inputs, outputs):
                return inputs * 2, outputs

    assert str(info.value) == (
        "Ported defines MedSegPy's _preprocess, which scancache's loaders never call: "
        "override preprocess(x, y) instead (docs/custom-dataloader.md)"
    )
    with pytest.raises(TypeError, match=r"_load_input.*override model_input\(image, element\)"):

        class PortedInput(DataLoader):
            def _load_input(self, dataset_dict):
                return None


def test_medsegpys_registry_spelling_and_legacy_tags_work(dataset):
    """``@LOADER_REGISTRY.register()`` (MedSegPy's fvcore form) registers; MedSegPy's legacy
    TAG "oai_2d" is its DefaultDataLoader; N5dDataLoader names the loader to use instead."""
    from loaders import DefaultDataLoader
    from store.errors import NotRegistered

    name, image, _ = dataset

    @LOADER_REGISTRY.register()
    class RegisteredTheMedSegPyWay(DefaultDataLoader):
        pass

    try:
        assert LOADER_REGISTRY["RegisteredTheMedSegPyWay"] is RegisteredTheMedSegPyWay
        loader = build_loader(
            Config(TAG="oai_2d"), name, batch_size=1, is_test=False, shuffle=False, drop_last=False
        )
        assert type(loader) is DefaultDataLoader
        np.testing.assert_array_equal(loader[0][0][0, ..., 0], image[:, :, 0])
        with pytest.raises(
            NotRegistered, match=r"'N5dDataLoader' .*use S25dDataLoader with IMG_SIZE=\(H, W, k\)"
        ):
            build_loader(
                Config(TAG="N5dDataLoader"), name, batch_size=1, is_test=False, shuffle=False, drop_last=False
            )
    finally:
        LOADER_REGISTRY.pop("RegisteredTheMedSegPyWay", None)


def test_medsegpy_style_dataset_dicts_get_a_line_saying_what_is_missing(small_store):
    """A MedSegPy OAI dict names its scan "0000001_V00" and no source: each is one line
    saying what to give (the key, or the stored id that is meant)."""
    from store.errors import ScanNotFound

    root, _ = small_store
    for name, dicts in (
        ("msp_no_source", [{"scan_id": "0000001_V00", "file_name": "x.im"}]),
        ("msp_short_id", [{"scan_id": "0000001_V00", "source": str(root)}]),
    ):
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda dicts=dicts: dicts)
    try:
        with pytest.raises(ValueError) as info:
            DatasetCatalog.get("msp_no_source")
        assert str(info.value) == (
            "dataset 'msp_no_source': item 0 has no 'source' (each dict needs 'scan_id' and 'source', "
            "the store path or server URL holding the scan)"
        )
        with pytest.raises(ScanNotFound) as missing:
            build_loader(
                Config(), "msp_short_id", batch_size=1, is_test=False, shuffle=False, drop_last=False
            )
        assert str(missing.value) == (
            f"dataset dict: scan '0000001_V00' is not in {root} (did you mean '0000001_V00-Aug00'?)"
        )
    finally:
        DatasetCatalog.remove("msp_no_source")
        DatasetCatalog.remove("msp_short_id")


def test_a_private_helper_named_like_a_medsegpy_hook_is_fine_beside_its_counterpart():
    from loaders import DefaultDataLoader

    class Helped(DefaultDataLoader):
        def _preprocess(self, x):
            return x * 2

        def preprocess(self, x, y):
            return self._preprocess(x), y

    assert Helped.preprocess is not DefaultDataLoader.preprocess


def test_epochs_of_different_lengths_and_a_wrong_from_prediction_are_named(dataset):
    """Keras fixes its steps from the first epoch: an epoch_elements of another length later is
    refused naming both counts; a from_prediction of the wrong shape is named, not the model."""
    from loaders import DefaultDataLoader

    name, image, _ = dataset

    class Growing(DefaultDataLoader):
        def epoch_elements(self, epoch):
            return self._base_elements[: 4 + 2 * epoch]

    loader = Growing(Config(SEED=1), DatasetCatalog.get(name), False, True, True, 2)
    with pytest.raises(ValueError, match=r"Growing.epoch_elements\(1\) gave 6 examples, the first epoch 4"):
        loader.set_epoch(1)

    class Halving(DefaultDataLoader):
        def from_prediction(self, prediction, element):
            return prediction[::2, ::2, None]

    test = Halving(Config(), DatasetCatalog.get(name), True, False, False, 4)
    with pytest.raises(ValueError) as info:
        list(test.inference(lambda x: np.ones((*x.shape[:3], 2), np.float32)))
    h, w = image.shape[:2]
    assert f"Halving.from_prediction returned ({(h + 1) // 2}, {(w + 1) // 2}, 1, 2)" in str(info.value)
    assert f"it must return the {h}x{w}x1 window with channels last" in str(info.value)


def test_register_loader_takes_a_name_first_or_by_keyword():
    """``@register_loader("Tag")``, as a registry's ``register("name")`` is written, registers
    the class under that tag (it failed with "'str' object has no attribute '__name__'")."""
    from loaders import LOADER_REGISTRY, DefaultDataLoader, register_loader

    @register_loader("TaggedFirst")
    class First(DefaultDataLoader):
        pass

    @register_loader(name="TaggedByKeyword")
    class Second(DefaultDataLoader):
        pass

    assert LOADER_REGISTRY["TaggedFirst"] is First and LOADER_REGISTRY["TaggedByKeyword"] is Second


@pytest.mark.parametrize(
    "tag, size, y_format",
    [("DefaultDataLoader", (16, 16, 1), "one_hot"), ("RandomPatchDataLoader", (8, 8, 4, 1), "class_index")],
)
def test_the_augmentation_recipe_flips_slices_and_patches_alike(dataset, tag, size, y_format):
    """The page's "Random augmentation" block, pasted into a subclass of a 2D and a 3D patch
    loader: each example of x and of y is the unflipped one or the one flipped along its rows,
    the same choice for both."""
    name, _, _ = dataset
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "crc32" in b)
    namespace: dict = {"np": np}
    exec(compile(textwrap.dedent(block), str(DOC), "exec"), namespace)
    register_loader(type("Augmented" + tag, (LOADER_REGISTRY[tag],), {"preprocess": namespace["preprocess"]}))
    try:
        settings = dict(
            IMG_SIZE=size, CATEGORIES=(0, (1, 2), 3), SEED=4, Y_FORMAT=y_format, PATCHES_PER_SCAN=4
        )
        plain = build_loader(Config(TAG=tag, **settings), name, 4, False, True, True)
        flipped = build_loader(Config(TAG="Augmented" + tag, **settings), name, 4, False, True, True)
    finally:
        LOADER_REGISTRY.pop("Augmented" + tag, None)
    choices = set()
    for b in range(min(4, len(plain))):
        (x0, y0), (x1, y1) = plain[b], flipped[b]
        for i in range(len(x0)):
            same = np.array_equal(x1[i], x0[i]) and np.array_equal(y1[i], y0[i])
            mirrored = np.array_equal(x1[i], x0[i][::-1]) and np.array_equal(y1[i], y0[i][::-1])
            assert same or mirrored
            choices.add(mirrored)
    assert choices == {True, False}

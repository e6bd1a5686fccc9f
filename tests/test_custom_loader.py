"""Runs the worked example of docs/custom-dataloader.md (the code is taken from the page)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from loaders import LOADER_REGISTRY, Config, DataLoader, DatasetCatalog, build_loader

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
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(1, 2, 3)), 1, atol=1e-3)

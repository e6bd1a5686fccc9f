"""Keras 3 data loaders over a scancache store or server, with MedSegPy's API, e.g.::

>>> from loaders import Config, DatasetCatalog, build_loader
>>> DatasetCatalog.register("knee_train", "http://server:8000", split="train")
>>> cfg = Config(TAG="DefaultDataLoader", TRAIN_DATASET="knee_train", CATEGORIES=(0, (1, 2), 3))
>>> train = build_loader(cfg, cfg.TRAIN_DATASET, batch_size=8, is_test=False, shuffle=True, drop_last=True)
"""

from __future__ import annotations

from loaders.backend import import_keras

import_keras()  # the backend chosen (and TensorFlow quiet) before Keras' first import

from loaders.base import LOADER_REGISTRY, DataLoader, Element, register_loader  # noqa: E402
from loaders.build import build_loader, get_dataset_dicts  # noqa: E402
from loaders.catalog import DatasetCatalog, open_source  # noqa: E402
from loaders.checkpoint import LoaderCheckpoint  # noqa: E402
from loaders.config import Config  # noqa: E402
from loaders.patches import PatchDataLoader, RandomPatchDataLoader  # noqa: E402
from loaders.predictions import PredictionSummary, write_predictions  # noqa: E402
from loaders.slices import DefaultDataLoader, S25dDataLoader  # noqa: E402

__all__ = [
    "LOADER_REGISTRY",
    "Config",
    "DataLoader",
    "DatasetCatalog",
    "DefaultDataLoader",
    "Element",
    "LoaderCheckpoint",
    "PatchDataLoader",
    "PredictionSummary",
    "RandomPatchDataLoader",
    "S25dDataLoader",
    "build_loader",
    "get_dataset_dicts",
    "open_source",
    "register_loader",
    "write_predictions",
]

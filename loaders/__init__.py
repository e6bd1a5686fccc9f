"""Keras 3 data loaders over a scancache store or server, with MedSegPy's API, e.g.::

>>> from loaders import Config, DatasetCatalog, build_loader
>>> DatasetCatalog.register("knee_train", "http://server:8000", split="train")
>>> cfg = Config(TAG="DefaultDataLoader", TRAIN_DATASET="knee_train", CATEGORIES=(0, (1, 2), 3))
>>> train = build_loader(cfg, cfg.TRAIN_DATASET, batch_size=8, is_test=False, shuffle=True, drop_last=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Nothing heavy at `import loaders`: each name is imported on first use, so Keras and its
# backend (seconds, and TensorFlow's start-up) load only with what needs them (the loaders,
# build_loader, LoaderCheckpoint), and Config / DatasetCatalog never need them.
# loaders.backend sets TF_CPP_MIN_LOG_LEVEL now, before anything can import TensorFlow.
from loaders import backend as _backend  # noqa: F401

if TYPE_CHECKING:
    from loaders.base import LOADER_REGISTRY, DataLoader, Element, register_loader
    from loaders.build import build_loader, get_dataset_dicts
    from loaders.catalog import DatasetCatalog, close_shared_sources, open_source
    from loaders.checkpoint import LoaderCheckpoint
    from loaders.config import Config
    from loaders.export import ExportedScan, export_nifti
    from loaders.patches import PatchDataLoader, RandomPatchDataLoader
    from loaders.predictions import PredictionSummary, write_predictions
    from loaders.slices import DefaultDataLoader, S25dDataLoader

_HOME = {
    "LOADER_REGISTRY": "loaders.base",
    "DataLoader": "loaders.base",
    "Element": "loaders.base",
    "register_loader": "loaders.base",
    "build_loader": "loaders.build",
    "get_dataset_dicts": "loaders.build",
    "DatasetCatalog": "loaders.catalog",
    "open_source": "loaders.catalog",
    "close_shared_sources": "loaders.catalog",
    "LoaderCheckpoint": "loaders.checkpoint",
    "Config": "loaders.config",
    "ExportedScan": "loaders.export",
    "export_nifti": "loaders.export",
    "PatchDataLoader": "loaders.patches",
    "RandomPatchDataLoader": "loaders.patches",
    "PredictionSummary": "loaders.predictions",
    "write_predictions": "loaders.predictions",
    "DefaultDataLoader": "loaders.slices",
    "S25dDataLoader": "loaders.slices",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'loaders' has no attribute {name!r}")
    if home == "loaders.base":  # the registry with the built-in loaders in it
        importlib.import_module("loaders.slices")
        importlib.import_module("loaders.patches")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "LOADER_REGISTRY",
    "Config",
    "DataLoader",
    "DatasetCatalog",
    "DefaultDataLoader",
    "Element",
    "ExportedScan",
    "LoaderCheckpoint",
    "PatchDataLoader",
    "PredictionSummary",
    "RandomPatchDataLoader",
    "S25dDataLoader",
    "build_loader",
    "close_shared_sources",
    "export_nifti",
    "get_dataset_dicts",
    "open_source",
    "register_loader",
    "write_predictions",
]

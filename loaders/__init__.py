"""Keras 3 data loaders over a scancache store or server, with MedSegPy's API, e.g.::

>>> from loaders import Config, DatasetCatalog, build_loader
>>> DatasetCatalog.register("knee_train", "http://server:8000", split="train")
>>> cfg = Config(TAG="DefaultDataLoader", TRAIN_DATASET="knee_train", CATEGORIES=(0, (1, 2), 3))
>>> train = build_loader(cfg, cfg.TRAIN_DATASET, batch_size=8, is_test=False, shuffle=True, drop_last=True)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# TensorFlow's C++ start-up logging (oneDNN, CUDA probing, CPU features) hides real messages;
# quiet by default, unless the user set the level. Only effective before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKEND_EXTRAS = {"tensorflow": "loaders", "torch": "torch", "jax": "jax"}


def _configured_backend() -> str | None:
    """The backend the user chose: $KERAS_BACKEND, else keras.json's (where Keras reads it)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return str(backend) if backend else None


def _check_keras_backend() -> None:
    """Keras defaults to TensorFlow (installed by the ``loaders`` extra). A backend the user chose
    is never overridden; if none was chosen and TensorFlow is absent, an installed one is used.
    Where the needed backend is missing, say so in one line naming the extra."""
    if "keras" in sys.modules:  # imported already: its backend is settled
        return
    chosen = _configured_backend()
    if chosen is not None:
        if chosen in BACKEND_EXTRAS and importlib.util.find_spec(chosen) is None:
            raise ImportError(
                f'Keras backend {chosen!r} is selected but not installed: pip install -e ".[{BACKEND_EXTRAS[chosen]}]"'
            )
        return
    for name in ("tensorflow", "jax", "torch"):
        if importlib.util.find_spec(name) is not None:
            if name != "tensorflow":
                os.environ["KERAS_BACKEND"] = name
            return
    raise ImportError(
        'no Keras backend is installed: pip install -e ".[loaders]" (TensorFlow), or ".[torch]" / ".[jax]"'
    )


_check_keras_backend()

from loaders.base import LOADER_REGISTRY, DataLoader, Element, register_loader  # noqa: E402
from loaders.build import build_loader, get_dataset_dicts  # noqa: E402
from loaders.catalog import DatasetCatalog, close_shared_sources, open_source  # noqa: E402
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
    "close_shared_sources",
    "get_dataset_dicts",
    "open_source",
    "register_loader",
    "write_predictions",
]

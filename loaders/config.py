"""``Config``: MedSegPy's data fields and defaults, plus a few of scancache's own.

Field names and defaults follow ``medsegpy/config.py`` so that a MedSegPy script's config
lines run unchanged. Where scancache reads a field differently, the comment says so.
"""

from __future__ import annotations

import copy
from typing import Any


class Config:
    """Data-loading configuration. ``Config(TAG="PatchDataLoader", IMG_SIZE=(32, 32, 8, 1))``."""

    # The loader class, by its registered name (see loaders.base.register_loader).
    TAG: str = "DefaultDataLoader"
    # Dataset names registered in DatasetCatalog.
    TRAIN_DATASET: str = ""
    VAL_DATASET: str = ""
    TEST_DATASET: str = ""
    # Items are a class index or a tuple of class indices summed into one channel. MedSegPy's
    # default [] selects nothing; here an empty value means every class of the store.
    CATEGORIES: Any = []
    INCLUDE_BACKGROUND: bool = False
    # 2D: (H, W, 1); 2.5D: (H, W, k) with k odd; 3D patches: (h, w, d, 1) or (h, w, d).
    IMG_SIZE: tuple[int, ...] = (288, 288, 1)
    # Patch loaders: padding per side (int or per axis), its numpy mode, and the grid stride.
    # MedSegPy's stride default is 1 voxel; here an empty stride means the patch size.
    IMG_PAD_SIZE: Any = ()
    IMG_PAD_MODE: str = "edge"
    IMG_STRIDE: Any = ()
    # Background threads that prefetch batches (at least 1).
    NUM_WORKERS: int = 1
    # None: a fresh random order every run, as in MedSegPy.
    SEED: int | None = None
    # Refused when True: the store's decoded-chunk cache (SCANCACHE_LOCAL_CACHE_BYTES, or the
    # server's --cache-bytes) is what holds a data set in memory here (docs/user-guide.md).
    PRELOAD_DATA: bool = False

    # scancache's own fields.
    PREFETCH_BATCHES: int = 4  # batches read ahead (the bounded queue)
    BLEND_MODE: str = "gaussian"  # "average" or "gaussian", for overlapping patch predictions
    PATCHES_PER_SCAN: int = 8  # RandomPatchDataLoader: samples per scan per epoch
    FOREGROUND_RATIO: float = 0.33  # RandomPatchDataLoader: share of patches centred on a class
    # dtype of y: "float32" (MedSegPy's) or "uint8" (4x fewer bytes; cast on the device, e.g.
    # keras.ops.cast(y, "float32") in the loss). Values are the same 0/1 (or summed) class counts.
    Y_DTYPE: str = "float32"
    # 2D / 2.5D loaders: examples come in blocks (a scan's slices sharing one inner chunk along
    # z, read and decoded once) and the shuffled order interleaves this many blocks at a time:
    # consecutive examples come from different blocks (different scans where the data set has
    # enough), and about 2x this many blocks are in memory (loaders/blocks.py). 0: every example
    # is read on its own, in the per-example order (each slice decodes its whole chunk).
    SHUFFLE_BLOCKS: int = 16
    # y as "one_hot" channels (MedSegPy's) or "class_index": a uint8 label map per example
    # (0 background, category c is c + 1), for one-hot on the device (docs/user-guide.md).
    Y_FORMAT: str = "one_hot"

    def __init__(self, **overrides: Any) -> None:
        # Mutable class defaults (CATEGORIES = []) are copied per instance: appending to one
        # config's CATEGORIES must not change every other config's.
        for key in dir(type(self)):
            if key.isupper() and isinstance(getattr(type(self), key), (list, dict, set)):
                object.__setattr__(self, key, copy.copy(getattr(type(self), key)))
        for key, value in overrides.items():
            self.__setattr__(key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        if not key.isupper() or not hasattr(type(self), key):
            raise AttributeError(f"Config has no field {key!r}")
        object.__setattr__(self, key, value)

    def get_num_classes(self, store_classes: int | None = None) -> int:
        """Output channels, as MedSegPy computes them.

        An empty CATEGORIES means every class of the store, which the config alone does not
        know: pass the store's class count (``loader.num_classes()`` gives the whole answer,
        or ``DatasetCatalog.get(name)[0]["num_classes"]``).
        """
        background = 1 if self.INCLUDE_BACKGROUND else 0
        if self.CATEGORIES:
            return len(self.CATEGORIES) + background
        if store_classes is None:
            raise ValueError(
                "get_num_classes: CATEGORIES is empty (every class of the store); pass the store's "
                "class count, get_num_classes(store_classes), or use loader.num_classes()"
            )
        return int(store_classes) + background

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in dir(type(self)) if k.isupper()}

    def copy(self) -> Config:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Config({fields})"


Y_DTYPES = ("float32", "uint8")
Y_FORMATS = ("one_hot", "class_index")


def check_config(cfg: Config) -> None:
    """Refuse settings a loader cannot honour, in one line naming the field."""
    if cfg.PRELOAD_DATA:
        raise ValueError(
            "PRELOAD_DATA=True is not supported: the store's decoded-chunk cache holds scans in memory "
            "(set SCANCACHE_LOCAL_CACHE_BYTES, or the server's --cache-bytes); leave PRELOAD_DATA False"
        )
    if (
        not isinstance(cfg.SHUFFLE_BLOCKS, int)
        or isinstance(cfg.SHUFFLE_BLOCKS, bool)
        or cfg.SHUFFLE_BLOCKS < 0
    ):
        raise ValueError(f"SHUFFLE_BLOCKS must be a whole number >= 0, got {cfg.SHUFFLE_BLOCKS!r}")
    if str(cfg.Y_DTYPE) not in Y_DTYPES:
        raise ValueError(f"Y_DTYPE must be one of {', '.join(Y_DTYPES)}, got {cfg.Y_DTYPE!r}")
    if str(cfg.Y_FORMAT) not in Y_FORMATS:
        raise ValueError(f"Y_FORMAT must be one of {', '.join(Y_FORMATS)}, got {cfg.Y_FORMAT!r}")

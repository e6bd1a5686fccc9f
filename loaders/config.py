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
    PRELOAD_DATA: bool = False  # accepted for compatibility; the store's cache does this job

    # scancache's own fields.
    PREFETCH_BATCHES: int = 4  # batches read ahead (the bounded queue)
    BLEND_MODE: str = "gaussian"  # "average" or "gaussian", for overlapping patch predictions
    PATCHES_PER_SCAN: int = 8  # RandomPatchDataLoader: samples per scan per epoch
    FOREGROUND_RATIO: float = 0.33  # RandomPatchDataLoader: share of patches centred on a class

    def __init__(self, **overrides: Any) -> None:
        for key, value in overrides.items():
            self.__setattr__(key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        if not key.isupper() or not hasattr(type(self), key):
            raise AttributeError(f"Config has no field {key!r}")
        object.__setattr__(self, key, value)

    def get_num_classes(self) -> int:
        """Output channels, as MedSegPy computes them (needs CATEGORIES set)."""
        return len(self.CATEGORIES) + (1 if self.INCLUDE_BACKGROUND else 0)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in dir(type(self)) if k.isupper()}

    def copy(self) -> Config:
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Config({fields})"

"""``Config``: MedSegPy's data fields and defaults, plus a few of scancache's own.

Field names and defaults follow ``medsegpy/config.py`` so that a MedSegPy script's data
config lines run unchanged. Where scancache reads a field differently, the comment says so.
MedSegPy's training fields (batch sizes, epochs, learning rate, ...) are not data settings:
setting one is refused with where its value goes instead (``build_loader``'s arguments, Keras).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loaders.geometry import BLEND_MODES, PAD_MODES
from store.categories import parse_categories


class Config:
    """Data-loading configuration. ``Config(TAG="PatchDataLoader", IMG_SIZE=(32, 32, 8, 1))``."""

    # The loader class, by its registered name (see loaders.base.register_loader).
    TAG: str = "DefaultDataLoader"
    # Dataset names registered in DatasetCatalog.
    TRAIN_DATASET: str = ""
    VAL_DATASET: str = ""
    TEST_DATASET: str = ""
    # Items are a class (its index, or its name: one of the scans' class_names) or a tuple of
    # classes summed into one channel, e.g. (0, ("tibia", "patella")). MedSegPy's default []
    # selects nothing; here an empty value means every class of the store.
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
            raise AttributeError(_no_field(key))
        # Checked (and made a plain typed value) here, where it enters: a wrong value fails
        # now, in one line naming the field, not at the first batch with a message naming none.
        check = FIELD_CHECKS.get(key)
        object.__setattr__(self, key, check(key, value) if check is not None else value)

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
        """Its own object, with its own lists, dicts, sets and arrays, so that a later edit of
        this Config (a notebook building its next loader) changes nothing in the copy. Other
        values are shared as they are (a module, a model or a lock cannot be copied)."""
        own = copy.copy(self)
        for name, value in vars(own).items():
            if isinstance(value, (list, dict, set, np.ndarray)):
                try:
                    setattr(own, name, copy.deepcopy(value))
                except Exception:  # a container of things that do not copy: the container alone
                    setattr(own, name, copy.copy(value))
        return own

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Config({fields})"


# MedSegPy config fields that belong to training, not to data loading: where each one's value
# goes with scancache, for the one-line refusal of a MedSegPy script's config line.
TRAINING_FIELDS = {
    "TRAIN_BATCH_SIZE": "build_loader(cfg, name, batch_size=...)",
    "VALID_BATCH_SIZE": "build_loader(cfg, name, batch_size=...)",
    "TEST_BATCH_SIZE": "build_loader(cfg, name, batch_size=...)",
    "N_EPOCHS": "model.fit(..., epochs=...)",
    "INITIAL_LEARNING_RATE": "the optimizer (keras.optimizers.Adam(learning_rate=...))",
    "LOSS": "model.compile(loss=...)",
    "OPTIMIZER": "model.compile(optimizer=...)",
    "MODEL_NAME": "your model code",
    "EXP_NAME": "your training script",
    "DESCRIPTION": "your training script",
    "OUTPUT_DIR": "your training script (LoaderCheckpoint(backup_dir) for the loader's state)",
    "USE_EARLY_STOPPING": "keras.callbacks.EarlyStopping",
    "NUM_GRAD_STEPS": "your training loop",
    "CLASS_WEIGHTS": "the loss",
    "AUGMENT_DATA": "a custom loader's preprocess(x, y) (docs/custom-dataloader.md)",
    "FILE_TYPES": "nothing: the store holds each scan's image and mask",
    "TISSUES": "CATEGORIES (MedSegPy's newer name for it too)",
}


def _no_field(key: str) -> str:
    """The refusal of an unknown field: where a MedSegPy training field's value goes instead,
    or the field a misspelt name may mean."""
    import difflib

    if key in TRAINING_FIELDS:
        return (
            f"Config has no field {key!r}: it is a MedSegPy training setting, not a data one; "
            f"with scancache it goes to {TRAINING_FIELDS[key]}"
        )
    names = [k for k in dir(Config) if k.isupper()]
    close = difflib.get_close_matches(key.upper(), names, n=1)
    return f"Config has no field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


Y_DTYPES = ("float32", "uint8")
Y_FORMATS = ("one_hot", "class_index")
MAX_SEED = 2**63 - 1  # the seed travels in a signed 64-bit table to torch workers


def whole_number(name: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``; anything else (a string, a float, a
    bool) refused in one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"within {minimum}..{maximum}"
        raise ValueError(f"{name} must be a whole number {bounds}, got {value!r}")
    return number


def _minimum(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, value: whole_number(name, value, minimum)


def _seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return whole_number(name, value, 0, MAX_SEED)
    except ValueError:
        raise ValueError(
            f"{name} must be None (a random seed) or a whole number within 0..2**63-1, got {value!r}"
        ) from None


def _flag(name: str, value: Any) -> bool:
    # numpy's bool is not a bool; "no" or 2 is a mistake, not a truth value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _one_of(choices: Sequence[str]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number within [0, 1], got {value!r}")
    return float(value)


def _img_size(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(f"{name} must be a tuple of whole numbers >= 1, got {value!r}")
    try:
        return tuple(whole_number(name, v, 1) for v in value)
    except ValueError:
        raise ValueError(f"{name} must be a tuple of whole numbers >= 1, got {value!r}") from None


def _per_axis(minimum: int, none_ok: bool) -> Callable[[str, Any], Any]:
    """IMG_STRIDE / IMG_PAD_SIZE: () or None (the default), one number for every axis, or one
    per axis (None in IMG_PAD_SIZE: no padding on that axis)."""

    def check(name: str, value: Any) -> Any:
        if value is None:
            return ()
        what = f"{name} must be (), a whole number >= {minimum} or a tuple of them, got {value!r}"
        if isinstance(value, (str, bytes)):
            raise ValueError(what)
        try:
            if isinstance(value, Sequence):
                return tuple(None if v is None and none_ok else whole_number(name, v, minimum) for v in value)
            return whole_number(name, value, minimum)
        except ValueError:
            raise ValueError(what) from None

    return check


def _categories(name: str, value: Any) -> Any:
    """CATEGORIES' form checked now (the scans' classes check indices and names when a loader
    is built); the value is kept as given, so ``cfg.CATEGORIES.append(...)`` still works."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return value
    parse_categories(value, name)
    return value


# Each field's check, run by Config.__setattr__ (fields not listed take any value).
FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "SEED": _seed,
    "CATEGORIES": _categories,
    "NUM_WORKERS": _minimum(1),
    "PREFETCH_BATCHES": _minimum(1),
    "PATCHES_PER_SCAN": _minimum(1),
    "SHUFFLE_BLOCKS": _minimum(0),
    "INCLUDE_BACKGROUND": _flag,
    "PRELOAD_DATA": _flag,
    "IMG_SIZE": _img_size,
    "IMG_STRIDE": _per_axis(1, none_ok=False),
    "IMG_PAD_SIZE": _per_axis(0, none_ok=True),
    "IMG_PAD_MODE": _one_of(PAD_MODES),
    "BLEND_MODE": _one_of(BLEND_MODES),
    "FOREGROUND_RATIO": _ratio,
    "Y_DTYPE": _one_of(Y_DTYPES),
    "Y_FORMAT": _one_of(Y_FORMATS),
}


def check_config(cfg: Config) -> None:
    """Refuse settings a loader cannot honour, in one line naming the field (each field's own
    value is checked when it is set: ``FIELD_CHECKS``)."""
    if cfg.PRELOAD_DATA:
        raise ValueError(
            "PRELOAD_DATA=True is not supported: the store's decoded-chunk cache holds scans in memory "
            "(set SCANCACHE_LOCAL_CACHE_BYTES, or the server's --cache-bytes); leave PRELOAD_DATA False"
        )


def check_batching(batch_size: Any, num_replicas: Any, rank: Any) -> tuple[int, int, int]:
    """``build_loader``'s batch_size / num_replicas / rank as ints, in one line naming the argument."""
    size = whole_number("batch_size", batch_size, 1)
    replicas = whole_number("num_replicas", num_replicas, 1)
    return size, replicas, whole_number("rank", rank, 0, replicas - 1)

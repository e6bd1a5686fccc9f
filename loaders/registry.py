"""What a loader is made of and how it is found: ``Element``, ``register_loader``, target
marks, and ``build_data_loader`` (``cfg.TAG`` to the registered class, MedSegPy's tags included).

(Imported by ``loaders.base``, which re-exports these names.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from loaders.geometry import Window
from store.errors import NotRegistered

if TYPE_CHECKING:
    from loaders.base import DataLoader
    from loaders.config import Config

L = TypeVar("L", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class LoaderRegistry(dict[str, type[Any]]):
    """Name -> DataLoader subclass. ``@LOADER_REGISTRY.register()`` is MedSegPy's (fvcore's)
    spelling of ``@register_loader``, so a ported loader registers unchanged."""

    def register(self, obj: L | None = None) -> Any:
        return register_loader(obj) if obj is not None else register_loader


LOADER_REGISTRY = LoaderRegistry()
KEEPS_VALUES = "_scancache_keeps_values"
SELECTS_VOXELS = "_scancache_selects_voxels"


def keeps_values(method: F) -> F:
    """Mark a ``model_target`` that only selects/reshapes (no arithmetic): it may be given the
    uint8 mask, and the float32 conversion is done while copying into the batch (faster).
    A subclass that overrides ``model_target`` without this mark gets float32, as always."""
    setattr(method, KEEPS_VALUES, True)
    return method


def selects_voxels(method: F) -> F:
    """Mark a ``model_target`` that only indexes the spatial axes (the first three) and keeps
    the class axis last and whole: it may be given a scan's label map ``(h, w, d)`` in place of
    its mask ``(h, w, d, C)``, and the loader then writes y straight from the selected labels
    (one table gather per voxel, no merged uint8 mask in between). Implies ``keeps_values``."""
    setattr(method, SELECTS_VOXELS, True)
    return keeps_values(method)


# MedSegPy's DataLoader hooks and what takes their place here: a class ported with one of them,
# and none of its counterparts, is refused, as the loader would never call it (the batches
# would be the defaults, silently). With a counterpart of its own, the hook is a helper it calls.
MEDSEGPY_COUNTERPARTS = {
    "_load_input": ("model_input", "model_target", "load_batch"),
    "_load_batch": ("model_input", "model_target", "load_batch"),
    "_preprocess": ("preprocess",),
    "_restructure_data": ("from_prediction",),
    "_load_patch": ("build_elements", "model_input", "model_target", "load_batch"),
}
MEDSEGPY_HOOKS = {
    "_load_input": "model_input(image, element) and model_target(mask, element) (the loader reads each window)",
    "_load_batch": "model_input / model_target per example (load_batch reads the windows)",
    "_preprocess": "preprocess(x, y)",
    "_restructure_data": "from_prediction(prediction, element) (inference stitches each scan)",
    "_load_patch": "build_elements (the windows) and model_input / model_target",
}


def refuse_medsegpy_hooks(klass: type) -> None:
    """One line naming the hook a class ported from MedSegPy defines and what to override."""

    def own(name: str) -> bool:  # defined outside scancache's loaders: the user's
        return not str(getattr(getattr(klass, name, None), "__module__", "loaders.")).startswith("loaders.")

    ported = [h for h in MEDSEGPY_HOOKS if own(h) and not any(own(c) for c in MEDSEGPY_COUNTERPARTS[h])]
    if ported:
        hook = ported[0]
        raise TypeError(
            f"{klass.__name__} defines MedSegPy's {hook}, which scancache's loaders never call: "
            f"override {MEDSEGPY_HOOKS[hook]} instead (docs/custom-dataloader.md)"
        )


def register_loader(cls: L | str | None = None, *, name: str | None = None) -> Any:
    """Class decorator: ``@register_loader`` makes ``cfg.TAG = "ClassName"`` pick the class;
    ``@register_loader("Tag")`` (or ``name="Tag"``) registers it under another name."""
    if isinstance(cls, str):  # the name given first, as a registry's register("name") takes it
        if name is not None and name != cls:
            raise TypeError(f"register_loader: two names given, {cls!r} and name={name!r}")
        cls, name = None, cls

    def add(klass: L) -> L:
        key = name or klass.__name__
        if key in LOADER_REGISTRY and LOADER_REGISTRY[key] is not klass:
            raise ValueError(f"a loader named {key!r} is already registered")
        LOADER_REGISTRY[key] = klass
        return klass

    return add(cls) if cls is not None else add


@dataclass(frozen=True)
class Element:
    """One example: the image ``window`` of scan ``scan`` and the mask/prediction ``target``."""

    scan: int
    window: Window
    target: Window | None = None

    @property
    def output_window(self) -> Window:
        return self.target if self.target is not None else self.window


def build_data_loader(cfg: Config, dataset_dicts: Sequence[dict[str, Any]], **kwargs: Any) -> DataLoader:
    """The loader registered under ``cfg.TAG``, built over ``dataset_dicts``."""
    from loaders import patches, slices  # noqa: F401  (they register the built-in loaders)

    tag = MEDSEGPY_TAGS.get(cfg.TAG, cfg.TAG) if cfg.TAG not in LOADER_REGISTRY else cfg.TAG
    try:
        cls: Callable[..., DataLoader] = LOADER_REGISTRY[tag]
    except KeyError:
        known = ", ".join(sorted(LOADER_REGISTRY))
        instead = MEDSEGPY_INSTEAD.get(cfg.TAG, "")
        raise NotRegistered(
            f"cfg.TAG {cfg.TAG!r} is not a registered loader{instead}; registered: {known}"
        ) from None
    return cls(cfg, dataset_dicts, **kwargs)


# MedSegPy's legacy TAGs, which it maps to its DefaultDataLoader too
MEDSEGPY_TAGS = dict.fromkeys(("oai_aug", "oai", "oai_2d", "oai_aug_2d"), "DefaultDataLoader")
# MedSegPy loaders with no loader of that name here: what to use instead
MEDSEGPY_INSTEAD = {
    "N5dDataLoader": " (MedSegPy's N.5D slices: use S25dDataLoader with IMG_SIZE=(H, W, k))",
}

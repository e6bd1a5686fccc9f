"""What a loader is made of and how it is found: ``Element``, ``register_loader``, target marks.

(Imported by ``loaders.base``, which re-exports these names.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loaders.stitching import Window

LOADER_REGISTRY: dict[str, type[Any]] = {}  # name -> DataLoader subclass
L = TypeVar("L", bound=type)
F = TypeVar("F", bound=Callable[..., Any])
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


def register_loader(cls: L | None = None, *, name: str | None = None) -> Any:
    """Class decorator: ``@register_loader`` makes ``cfg.TAG = "ClassName"`` pick the class."""

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

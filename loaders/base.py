"""The loader base class and registry: what a custom loader subclasses.

A loader is a list of *elements*, one per training example. An element is a scan and a window
of it, ``((y0, y1), (x0, x1), (z0, z1))``, that may reach outside the volume (the outside is
filled with ``cfg.IMG_PAD_MODE``), plus an optional ``target`` window for the mask and the
prediction (2.5D reads k slices of image but predicts the centre one). The base class does
the rest, identically for a local store and a server:

* batches: reads every window of a batch in one ``read_regions`` call per source, in
  background threads ahead of time (``loaders.prefetch``), and shuffles per epoch from SEED;
* ``inference(model)``: per scan, runs the model over the scan's elements and stitches the
  predictions back into a volume (``loaders.inference``, ``loaders.stitching``), blending overlaps.

A subclass implements :meth:`DataLoader.build_elements` and, if the model's tensors are not
the window's own shape, :meth:`model_input`, :meth:`model_target` and :meth:`from_prediction`.
Decorate it with :func:`register_loader` and select it with ``cfg.TAG``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import keras
import numpy as np

from client.layout import IMAGE, MASK
from client.protocol import RegionRequest, ScanSource
from loaders import inference
from loaders.config import Config
from loaders.geometry import AxisRead, check_pad_mode, take_window
from loaders.prefetch import Prefetcher
from loaders.scans import (
    ScanEntry,
    read_grouped,
    scans_from_dicts,
    window_reads,
)
from loaders.stitching import Window

LOADER_REGISTRY: dict[str, type[DataLoader]] = {}
L = TypeVar("L", bound="type[DataLoader]")
F = TypeVar("F", bound=Callable[..., Any])
_KEEPS_VALUES = "_scancache_keeps_values"


def keeps_values(method: F) -> F:
    """Mark a ``model_target`` that only selects/reshapes (no arithmetic): it may be given the
    uint8 mask, and the float32 conversion is done while copying into the batch (faster).
    A subclass that overrides ``model_target`` without this mark gets float32, as always."""
    setattr(method, _KEEPS_VALUES, True)
    return method


def _roi(axes: Sequence[AxisRead]) -> tuple[slice, ...]:
    return tuple(slice(a.lo, a.hi) for a in axes)


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


class DataLoader(keras.utils.PyDataset):
    """Base class of scancache loaders (a Keras ``PyDataset``). See the module docstring."""

    def __init__(
        self,
        cfg: Config,
        dataset_dicts: Sequence[dict[str, Any]],
        is_test: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int = 1,
    ) -> None:
        # Keras' thread enqueuer reads ahead in whatever batch order fit() picks (it shuffles by
        # default); our prefetcher covers plain loops over loader[i] and steps aside otherwise.
        super().__init__(
            workers=max(2, int(cfg.NUM_WORKERS)),
            use_multiprocessing=False,
            max_queue_size=max(2, int(cfg.PREFETCH_BATCHES)),
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._cfg = cfg
        self.is_test = bool(is_test)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.batch_size = int(batch_size)
        self.pad_mode = check_pad_mode(cfg.IMG_PAD_MODE)
        self.scans = scans_from_dicts(dataset_dicts, cfg)
        self.seed = cfg.SEED if cfg.SEED is not None else random.SystemRandom().randrange(2**31)
        self._random = random.Random(self.seed)
        self.epoch = 0
        elements = list(self.build_elements())
        order = list(range(len(elements)))
        if self.shuffle:
            self._random.shuffle(order)
        # (elements, order) is replaced as one tuple, so a background read sees one epoch's plan.
        self._plan: tuple[list[Any], list[int]] = (elements, order)
        self._prefetcher: Prefetcher[tuple[np.ndarray, ...]] = Prefetcher(
            self._load_index, workers=max(1, int(cfg.NUM_WORKERS)), depth=int(cfg.PREFETCH_BATCHES)
        )

    # -- what subclasses define -----------------------------------------------------------------
    def build_elements(self) -> Sequence[Any]:
        """The examples of one epoch, usually one :class:`Element` per slice or patch."""
        raise NotImplementedError

    def model_input(self, image: np.ndarray, element: Element) -> np.ndarray:
        """The model's input for a window of the image (float32). Default: add a channel."""
        return image[..., None]

    @keeps_values
    def model_target(self, mask: np.ndarray, element: Element) -> np.ndarray:
        """The target for a window of the mask ``(h, w, d, C)``. Default: unchanged."""
        return mask

    def from_prediction(self, prediction: np.ndarray, element: Element) -> np.ndarray:
        """Map one prediction back to its ``output_window`` shape + C. Default: unchanged."""
        return prediction

    def blend_weights(self, element: Element) -> np.ndarray | None:
        """Weights of one prediction where windows overlap (None: all equal)."""
        return None

    def preprocess(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hook for normalization/augmentation of a batch; must not modify ``x`` in place."""
        return x, y

    def inference_elements(self, scan: ScanEntry) -> Sequence[Element]:
        """The elements whose predictions make up ``scan``'s output (default: its own)."""
        return [e for e in self._plan[0] if e.scan == scan.index]

    # -- batches ----------------------------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self._cfg

    def _num_elements(self) -> int:
        return len(self._plan[0])

    def num_scans(self) -> int:
        return len(self.scans)

    def __len__(self) -> int:
        n = self._num_elements()
        if not self.is_test and self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"batch {index} out of range for {length} batches")
        return self._prefetcher.get(index, length)

    def batch_elements(self, index: int) -> list[Any]:
        elements, order = self._plan
        start = index * self.batch_size
        return [elements[i] for i in order[start : min(start + self.batch_size, len(order))]]

    def _load_index(self, index: int) -> tuple[np.ndarray, ...]:
        x, y = self.load_batch(self.batch_elements(index))
        x_in, y_out = self.preprocess(x, y)
        return (x_in, y_out, x) if self.is_test else (x_in, y_out)

    def read_elements(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image window, mask window) per element, all read in one round per source.

        The mask is as the source returns it (uint8, categories merged); images keep the
        store's dtype. :meth:`load_batch` converts both to float32 once, into the batch.
        """
        requests: list[tuple[ScanSource, RegionRequest]] = []
        plans = []
        background = bool(self._cfg.INCLUDE_BACKGROUND)
        for e in elements:
            scan = self.scans[e.scan]
            img_axes = window_reads(e.window, scan.shape, self.pad_mode)
            mask_axes = img_axes if e.target is None else window_reads(e.target, scan.shape, self.pad_mode)
            requests.append((scan.source, RegionRequest(scan.scan_id, IMAGE, _roi(img_axes))))
            requests.append(
                (scan.source, RegionRequest(scan.scan_id, MASK, _roi(mask_axes), scan.categories, background))
            )
            plans.append((img_axes, mask_axes))
        arrays = read_grouped(requests)
        return [
            (take_window(arrays[2 * i], img_axes), take_window(arrays[2 * i + 1], mask_axes))
            for i, (img_axes, mask_axes) in enumerate(plans)
        ]

    def load_batch(self, elements: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """x and y of a batch, float32, before :meth:`preprocess`.

        Each example is converted straight into its slot of one preallocated x and y (no
        per-example float32 copy, no ``np.stack``): at 384^2 x 5 classes those copies cost
        more than reading the chunks. ``model_target`` sees float32 unless it is marked
        :func:`keeps_values` (a pure view/selection), which then gets the uint8 mask and the
        conversion happens in the copy into the batch, with identical values.
        """
        pairs = self.read_elements(elements)
        target_casts = getattr(type(self).model_target, _KEEPS_VALUES, False)
        x: np.ndarray | None = None
        y: np.ndarray | None = None
        for i, ((img, mask), e) in enumerate(zip(pairs, elements, strict=True)):
            xi = self.model_input(img if img.dtype == np.float32 else img.astype(np.float32), e)
            yi = self.model_target(mask if target_casts else mask.astype(np.float32), e)
            if x is None or y is None:
                x = np.empty((len(pairs), *xi.shape), np.float32)
                y = np.empty((len(pairs), *yi.shape), np.float32)
            elif xi.shape != x.shape[1:] or yi.shape != y.shape[1:]:
                self._mixed_shapes(elements, [xi.shape, x.shape[1:]], [yi.shape, y.shape[1:]])
            np.copyto(x[i], xi, casting="unsafe")
            np.copyto(y[i], yi, casting="unsafe")
        if x is None or y is None:
            raise ValueError("a batch needs at least one element")
        return x, y

    def _mixed_shapes(self, elements: Sequence[Element], xs: list[Any], ys: list[Any]) -> None:
        names = sorted({self.scans[e.scan].scan_id for e in elements})
        shapes = sorted({tuple(s) for s in xs}) if xs[0] != xs[1] else sorted({tuple(s) for s in ys})
        raise ValueError(f"one batch mixes input shapes {shapes} (scans {', '.join(names)})")

    def on_epoch_end(self) -> None:
        self.epoch += 1
        elements, order = self._plan
        if self.shuffle:
            order = list(order)
            self._random.shuffle(order)
        self._plan = (self.next_epoch_elements(elements), order)
        self._prefetcher.reset()

    def next_epoch_elements(self, elements: list[Any]) -> list[Any]:
        """Elements of the next epoch (random samplers draw new ones). Default: the same."""
        return elements

    def close(self) -> None:
        self._prefetcher.close()

    # -- inference (loaders.inference) ----------------------------------------------------------
    def _read_scan(self, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray]:
        """The whole image and merged mask of a scan, float32 (the mask is ``y_true``)."""
        return inference.read_scan(self, scan)

    def predict_scan(
        self,
        model: Any,
        scan: ScanEntry,
        image: np.ndarray,
        predict_kwargs: dict[str, Any],
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """The stitched (H, W, D, C) float32 prediction of one scan (``loaders.inference``)."""
        return inference.predict_scan(self, model, scan, image, predict_kwargs, mask)

    def inference(self, model: Any, **predict_kwargs: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Yield ``(input, output)`` per scan, as MedSegPy's ``DataLoader.inference``.

        input: ``{"x": (H, W, D) image, "scan_id": ..., "scan_<attr>": ...}``; output:
        ``{"y_true": (H, W, D, C), "y_pred": (H, W, D, C), "time_elapsed": seconds}`` (reading
        included). The next scan is read while this one is predicted; memory stays within
        two scans' inputs and one scan's output. Per-slice datasets give D = their slices.
        """
        return inference.run_inference(self, model, predict_kwargs)


def build_data_loader(cfg: Config, dataset_dicts: Sequence[dict[str, Any]], **kwargs: Any) -> DataLoader:
    """The loader registered under ``cfg.TAG``, built over ``dataset_dicts``."""
    try:
        cls: Callable[..., DataLoader] = LOADER_REGISTRY[cfg.TAG]
    except KeyError:
        known = ", ".join(sorted(LOADER_REGISTRY))
        raise KeyError(f"cfg.TAG {cfg.TAG!r} is not a registered loader; registered: {known}") from None
    return cls(cfg, dataset_dicts, **kwargs)

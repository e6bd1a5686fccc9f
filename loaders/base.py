"""The loader base class and registry: what a custom loader subclasses.

A loader is a list of *elements*, one per training example. An element is a scan and a window
of it, ``((y0, y1), (x0, x1), (z0, z1))``, that may reach outside the volume (the outside is
filled with ``cfg.IMG_PAD_MODE``), plus an optional ``target`` window for the mask and the
prediction (2.5D reads k slices of image but predicts the centre one). The base class does
the rest, identically for a local store and a server:

* batches: reads every window of a batch in one ``read_regions`` call per source, in
  background threads ahead of time (``loaders.prefetch``), and shuffles per epoch from SEED;
* ``inference(model)``: per scan, runs the model over the scan's elements and stitches the
  predictions back into a volume (``loaders.stitching``), blending overlaps.

A subclass implements :meth:`DataLoader.build_elements` and, if the model's tensors are not
the window's own shape, :meth:`model_input`, :meth:`model_target` and :meth:`from_prediction`.
Decorate it with :func:`register_loader` and select it with ``cfg.TAG``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import keras
import numpy as np

from client.categories import Categories, normalize_categories
from client.errors import RequestTooLarge
from client.layout import IMAGE, MASK, ScanMeta
from client.protocol import RegionRequest, ScanSource
from loaders.catalog import shared_source
from loaders.config import Config
from loaders.geometry import AxisRead, check_pad_mode, padded_indices, take_window
from loaders.prefetch import Prefetcher
from loaders.stitching import Aggregator, Window

LOADER_REGISTRY: dict[str, type[DataLoader]] = {}
L = TypeVar("L", bound="type[DataLoader]")


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


@dataclass(frozen=True)
class ScanEntry:
    """A scan of the loader's dataset: where it is, its metadata and the slices used."""

    index: int
    scan_id: str
    source: ScanSource = field(repr=False)
    meta: ScanMeta = field(repr=False)
    info: dict[str, Any] = field(repr=False)
    slices: tuple[int, ...]
    categories: Categories | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.meta.shape

    def inference_attributes(self) -> dict[str, Any]:
        """``scan_*`` keys for inference inputs: dataset-dict keys and scalar scan attributes."""
        out: dict[str, Any] = {}
        for key, value in self.meta.attrs.items():
            if key == "scan_id" or key.startswith("scancache"):
                continue
            if value is None or isinstance(value, (str, int, float, bool)):
                out[key if key.startswith("scan") else f"scan_{key}"] = value
        out["scan_shape"] = tuple(self.meta.shape)
        out.update({k: v for k, v in self.info.items() if k.startswith("scan") and k != "scan_id"})
        if self.meta.subject_id is not None:
            out["subject_id"] = self.meta.subject_id
        return out


def scans_from_dicts(dataset_dicts: Sequence[dict[str, Any]], cfg: Config) -> list[ScanEntry]:
    """Group dataset dicts by scan (first appearance order); per-slice dicts select slices."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in dataset_dicts:
        source = d["source"]
        key = (source if isinstance(source, str) else f"<{id(source)}>", d["scan_id"])
        grouped.setdefault(key, []).append(d)
    scans = []
    for index, dicts in enumerate(grouped.values()):
        first = dicts[0]
        source = shared_source(first["source"])
        meta = first.get("_meta") or source.metadata(first["scan_id"])
        depth = meta.shape[2]
        if all("slice_id" in d for d in dicts):
            slices = tuple(sorted({int(d["slice_id"]) - 1 for d in dicts}))  # MedSegPy: 1-indexed
            if slices[0] < 0 or slices[-1] >= depth:
                raise ValueError(f"scan {meta.scan_id!r}: slice_id out of 1..{depth}")
        else:
            slices = tuple(range(depth))
        if not meta.has_mask:
            raise ValueError(f"scan {meta.scan_id!r} has no mask; loaders need labelled scans")
        cats = normalize_categories(cfg.CATEGORIES, meta.num_classes) if cfg.CATEGORIES else None
        scans.append(ScanEntry(index, meta.scan_id, source, meta, first, slices, cats))
    return scans


def window_reads(window: Window, shape: Sequence[int], mode: str) -> tuple[AxisRead, ...]:
    return tuple(padded_indices(a, b, int(n), mode) for (a, b), n in zip(window, shape, strict=True))


def cut_window(volume: np.ndarray, window: Window, mode: str) -> np.ndarray:
    """A window of an in-memory (H, W, D[, C]) volume, padded like a read from the store."""
    axes = window_reads(window, volume.shape[:3], mode)
    return take_window(volume[tuple(slice(a.lo, a.hi) for a in axes)], axes)


def read_grouped(requests: Sequence[tuple[ScanSource, RegionRequest]]) -> list[np.ndarray]:
    """Read requests from possibly several sources: one ``read_regions`` call per source."""
    by_source: dict[int, tuple[ScanSource, list[int]]] = {}
    for i, (source, _) in enumerate(requests):
        by_source.setdefault(id(source), (source, []))[1].append(i)
    out: list[np.ndarray | None] = [None] * len(requests)
    for source, positions in by_source.values():
        arrays = source.read_regions([requests[i][1] for i in positions])
        for i, arr in zip(positions, arrays, strict=True):
            out[i] = arr
    return [a for a in out if a is not None]


def read_in_slabs(
    source: ScanSource, request: RegionRequest, region: tuple[slice, slice, slice]
) -> np.ndarray:
    """Read ``region``; if a server refuses it as too large (413), read its halves along z."""
    try:
        return source.read_regions([replace(request, roi=region)])[0]
    except RequestTooLarge:
        y, x, z = region
        if z.stop - z.start <= 1:
            raise
        mid = (z.start + z.stop) // 2
        halves = [(y, x, slice(z.start, mid)), (y, x, slice(mid, z.stop))]
        return np.concatenate([read_in_slabs(source, request, h) for h in halves], axis=2)


def predict_batch(model: Any, x: np.ndarray, predict_kwargs: dict[str, Any]) -> np.ndarray:
    """Predictions of a Keras model (``predict``) or of any callable on a numpy batch."""
    if hasattr(model, "predict_on_batch") and hasattr(model, "predict"):
        out = model.predict(x, verbose=0, **predict_kwargs) if predict_kwargs else model.predict_on_batch(x)
    else:
        out = model(x)
    return np.asarray(keras.ops.convert_to_numpy(out) if not isinstance(out, np.ndarray) else out)


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
        # Keras' own workers stay off: our prefetcher reads ahead, whatever the backend.
        super().__init__(workers=1, use_multiprocessing=False)
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
        """(image window, mask window) per element, all read in one round per source."""
        requests: list[tuple[ScanSource, RegionRequest]] = []
        plans = []
        for e in elements:
            scan = self.scans[e.scan]
            img_axes = window_reads(e.window, scan.shape, self.pad_mode)
            mask_axes = window_reads(e.output_window, scan.shape, self.pad_mode)
            img_roi = tuple(slice(a.lo, a.hi) for a in img_axes)
            mask_roi = tuple(slice(a.lo, a.hi) for a in mask_axes)
            background = bool(self._cfg.INCLUDE_BACKGROUND)
            requests.append((scan.source, RegionRequest(scan.scan_id, IMAGE, img_roi)))
            requests.append(
                (scan.source, RegionRequest(scan.scan_id, MASK, mask_roi, scan.categories, background))
            )
            plans.append((img_axes, mask_axes))
        arrays = read_grouped(requests)
        return [
            (take_window(arrays[2 * i], img_axes), take_window(arrays[2 * i + 1], mask_axes))
            for i, (img_axes, mask_axes) in enumerate(plans)
        ]

    def load_batch(self, elements: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """x and y of a batch, float32, before :meth:`preprocess`."""
        pairs = self.read_elements(elements)
        xs = [
            self.model_input(img.astype(np.float32), e) for (img, _), e in zip(pairs, elements, strict=True)
        ]
        ys = [self.model_target(m.astype(np.float32), e) for (_, m), e in zip(pairs, elements, strict=True)]
        shapes = {a.shape for a in xs}
        if len(shapes) > 1:
            names = sorted({self.scans[e.scan].scan_id for e in elements})
            raise ValueError(f"one batch mixes input shapes {sorted(shapes)} (scans {', '.join(names)})")
        return np.stack(xs), np.stack(ys)

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

    # -- inference ----------------------------------------------------------------------------
    def _read_scan(self, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray]:
        whole = (slice(0, scan.shape[0]), slice(0, scan.shape[1]), slice(0, scan.shape[2]))
        background = bool(self._cfg.INCLUDE_BACKGROUND)
        image = read_in_slabs(scan.source, RegionRequest(scan.scan_id, IMAGE), whole)
        mask_request = RegionRequest(scan.scan_id, MASK, None, scan.categories, background)
        mask = read_in_slabs(scan.source, mask_request, whole)
        return image.astype(np.float32), mask.astype(np.float32)

    def predict_scan(
        self, model: Any, scan: ScanEntry, image: np.ndarray, predict_kwargs: dict[str, Any]
    ) -> np.ndarray:
        """The stitched (H, W, D, C) prediction of one scan, windows cut from ``image``."""
        aggregator: Aggregator | None = None
        elements = list(self.inference_elements(scan))
        for start in range(0, len(elements), self.batch_size):
            chunk = elements[start : start + self.batch_size]
            x = np.stack([self.model_input(cut_window(image, e.window, self.pad_mode), e) for e in chunk])
            x, _ = self.preprocess(x, np.zeros((len(chunk), 0), np.float32))
            predictions = predict_batch(model, x, predict_kwargs)
            for e, p in zip(chunk, predictions, strict=True):
                out = self.from_prediction(p, e)
                if aggregator is None:
                    aggregator = Aggregator(scan.shape, out.shape[-1])
                aggregator.add(e.output_window, out, self.blend_weights(e))
        if aggregator is None:
            raise ValueError(f"scan {scan.scan_id!r} has no elements to predict")
        return aggregator.result()

    def inference(self, model: Any, **predict_kwargs: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Yield ``(input, output)`` per scan, as MedSegPy's ``DataLoader.inference``.

        input: ``{"x": (H, W, D) image, "scan_id": ..., "scan_<attr>": ...}``; output:
        ``{"y_true": (H, W, D, C), "y_pred": (H, W, D, C), "time_elapsed": seconds}`` (reading
        included). The next scan is read while this one is predicted; memory stays within
        two scans' inputs and one scan's output. Per-slice datasets give D = their slices.
        """
        for legacy in ("workers", "use_multiprocessing", "max_queue_size"):
            predict_kwargs.pop(legacy, None)  # predict_generator arguments Keras 3 dropped
        scans = sorted(self.scans, key=lambda s: s.scan_id)
        if not scans:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="scancache-inference") as pool:
            pending = pool.submit(self._read_scan, scans[0])
            for k, scan in enumerate(scans):
                start = time.perf_counter()
                image, mask = pending.result()
                if k + 1 < len(scans):
                    pending = pool.submit(self._read_scan, scans[k + 1])
                y_pred = self.predict_scan(model, scan, image, predict_kwargs)
                if len(scan.slices) != scan.shape[2]:
                    image, mask, y_pred = (a[:, :, list(scan.slices)] for a in (image, mask, y_pred))
                elapsed = time.perf_counter() - start
                inputs = {"x": image, "scan_id": scan.scan_id, **scan.inference_attributes()}
                yield inputs, {"y_true": mask, "y_pred": y_pred, "time_elapsed": elapsed}


def build_data_loader(cfg: Config, dataset_dicts: Sequence[dict[str, Any]], **kwargs: Any) -> DataLoader:
    """The loader registered under ``cfg.TAG``, built over ``dataset_dicts``."""
    try:
        cls: Callable[..., DataLoader] = LOADER_REGISTRY[cfg.TAG]
    except KeyError:
        known = ", ".join(sorted(LOADER_REGISTRY))
        raise KeyError(f"cfg.TAG {cfg.TAG!r} is not a registered loader; registered: {known}") from None
    return cls(cfg, dataset_dicts, **kwargs)

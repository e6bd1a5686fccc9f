"""Reading a batch's examples and filling its x and y: the part of ``DataLoader`` that
turns elements into arrays (``loaders.base`` holds the rest; custom loaders override
``read_elements`` or the hooks ``model_input`` / ``model_target``, never these steps).

Each example is converted straight into its slot of one preallocated x and y, with the copies
on the process's share of the cores (``loaders.batch_memory``) and y written from label maps
by one table gather a voxel (``store.label_map``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from loaders.batch_memory import BatchArrays, CopyThreads, copy_into
from loaders.blocks import BlockBuffer
from loaders.class_index import class_indices, index_table
from loaders.config import Config
from loaders.geometry import AxisRead, take_window
from loaders.registry import KEEPS_VALUES, SELECTS_VOXELS, Element
from loaders.scans import (
    ScanEntry,
    element_reads,
    paired_reads,
    read_grouped_unmerged,
    scan_requests,
    take_mask_window,
)
from loaders.stats import LoaderStats
from store.label_map import Decoded, LabelRegion, apply_table, merged
from store.protocol import RegionRequest, ScanSource


class _Loader(Protocol):
    """What these steps use of the loader they belong to (``loaders.base.DataLoader``)."""

    _cfg: Config
    scans: list[ScanEntry]
    pad_mode: str
    class_index: bool
    y_dtype: np.dtype
    _batch_arrays: BatchArrays
    _copy_threads: CopyThreads
    _stats: LoaderStats

    def _check_labelled(self) -> None: ...
    def model_input(self, image: np.ndarray, element: Element) -> np.ndarray: ...
    def model_target(self, mask: np.ndarray, element: Element) -> np.ndarray: ...
    def read_elements(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, np.ndarray]]: ...
    def _read_unmerged(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, Decoded]]: ...
    def _copy_example(
        self, x: np.ndarray, y: np.ndarray, xi: np.ndarray, labels: LabelRegion | None,
        yi: np.ndarray | None, background: bool,
    ) -> None: ...  # fmt: skip
    def _mixed_shapes(self, elements: Sequence[Element], xs: list[Any], ys: list[Any]) -> None: ...


def _roi(axes: Sequence[AxisRead]) -> tuple[slice, ...]:
    return tuple(slice(a.lo, a.hi) for a in axes)


class BatchFilling:
    """``read_elements``, ``load_batch`` and their steps, mixed into ``DataLoader``."""

    def read_elements(self: _Loader, elements: Sequence[Element]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image window, mask window) per element, all read in one round per source.

        The mask is uint8 with the categories merged; images keep the store's dtype, a scan's
        K > 1 image channels stacked on a last axis ``(h, w, d, K)``.
        :meth:`load_batch` converts both to float32 once, into the batch.
        """
        return [(image, merged(mask)) for image, mask in self._read_unmerged(elements)]

    def _read_unmerged(self: _Loader, elements: Sequence[Element]) -> list[tuple[np.ndarray, Decoded]]:
        """``read_elements`` with label-map masks left as labels (``take_mask_window``)."""
        requests: list[tuple[ScanSource, RegionRequest]] = []
        plans = []
        background = bool(self._cfg.INCLUDE_BACKGROUND)
        for e in elements:
            img_axes, mask_axes = element_reads(e, self.scans[e.scan].shape, self.pad_mode)
            requests += scan_requests(self.scans[e.scan], _roi(img_axes), _roi(mask_axes), background)
            plans.append((img_axes, mask_axes))
        pairs = paired_reads(read_grouped_unmerged(requests), [self.scans[e.scan] for e in elements])
        return [
            (take_window(image, img_axes), take_mask_window(mask, mask_axes))
            for (image, mask), (img_axes, mask_axes) in zip(pairs, plans, strict=True)
        ]

    def load_batch(
        self: _Loader, elements: Sequence[Any], _blocks: BlockBuffer | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """x and y of a batch, float32, before :meth:`preprocess`.

        Each example is converted straight into its slot of one preallocated x and y (no
        per-example float32 copy, no ``np.stack``): at 384^2 x 5 classes those copies cost
        more than reading the chunks. ``model_target`` sees float32 unless it is marked
        :func:`keeps_values` (a pure view/selection), which then gets the uint8 mask and the
        conversion happens in the copy into the batch, with identical values.
        """
        self._check_labelled()
        started = time.perf_counter()
        builtin_read = type(self).read_elements is BatchFilling.read_elements
        pairs: Sequence[tuple[np.ndarray, Decoded]]
        if _blocks is not None and builtin_read:
            pairs = _blocks.read(elements)  # windows cut from chunk-deep blocks read once
        elif builtin_read:
            pairs = self._read_unmerged(elements)
        else:
            pairs = self.read_elements(elements)
        read_done = time.perf_counter()
        target = type(self).model_target
        target_casts = getattr(target, KEEPS_VALUES, False)
        from_labels = getattr(target, SELECTS_VOXELS, False)
        background = bool(self._cfg.INCLUDE_BACKGROUND)
        x: np.ndarray | None = None
        y: np.ndarray | None = None
        # The hooks run here, in order; the copies into the batch (most of the work) are
        # independent and run on the process's share of the cores (``CopyThreads``).
        copies: list[Callable[[], None]] = []
        for i, ((img, mask), e) in enumerate(zip(pairs, elements, strict=True)):
            xi = self.model_input(img if img.dtype == np.float32 else img.astype(np.float32), e)
            labels: LabelRegion | None = None
            yi: np.ndarray | None = None
            if isinstance(mask, LabelRegion) and from_labels:
                # a spatial selection of the labels; the table expands them into y below
                labels = LabelRegion(self.model_target(mask.labels, e), mask.table)
                yi_shape = (*labels.labels.shape, mask.table.shape[1])
            else:
                plain = merged(mask)
                yi = self.model_target(plain if target_casts else plain.astype(np.float32), e)
                yi_shape = yi.shape
            if self.class_index:
                yi_shape = yi_shape[:-1]
            if x is None or y is None:
                x = self._batch_arrays.empty((len(pairs), *xi.shape), np.dtype(np.float32))
                y = self._batch_arrays.empty((len(pairs), *yi_shape), self.y_dtype)
            elif xi.shape != x.shape[1:] or yi_shape != y.shape[1:]:
                self._mixed_shapes(elements, [xi.shape, x.shape[1:]], [yi_shape, y.shape[1:]])
            copies.append(functools.partial(self._copy_example, x[i], y[i], xi, labels, yi, background))
        if x is None or y is None:
            raise ValueError("a batch needs at least one element")
        self._copy_threads.run(copies)
        self._stats.add_batch(read_done - started, time.perf_counter() - read_done)
        return x, y

    def _copy_example(
        self: _Loader,
        x: np.ndarray,
        y: np.ndarray,
        xi: np.ndarray,
        labels: LabelRegion | None,
        yi: np.ndarray | None,
        background: bool,
    ) -> None:
        """One example into its slots ``x``, ``y`` of the batch (exact in every y format)."""
        copy_into(x, xi)
        if labels is not None and self.class_index:  # one small table lookup a voxel
            indices = index_table(labels.table, background)[:, None]
            apply_table(labels.labels, indices, out=y[..., None])
        elif labels is not None:  # y straight from the labels: one table gather a voxel, exact
            apply_table(labels.labels, labels.table.astype(y.dtype), out=y)
        else:
            assert yi is not None  # without labels, load_batch merged the mask into yi
            if self.class_index:
                y[...] = class_indices(yi, background)
            else:
                np.copyto(y, yi, casting="unsafe")

    def _mixed_shapes(self: _Loader, elements: Sequence[Element], xs: list[Any], ys: list[Any]) -> None:
        names = sorted({self.scans[e.scan].scan_id for e in elements})
        shapes = sorted({tuple(s) for s in xs}) if xs[0] != xs[1] else sorted({tuple(s) for s in ys})
        raise ValueError(
            f"one batch mixes input shapes {shapes} (scans {', '.join(names)}): use batch_size=1 "
            "or a patch loader, or resample the scans to one grid"
        )

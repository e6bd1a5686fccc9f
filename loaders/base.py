"""The loader base class and registry: what a custom loader subclasses.

A loader is a list of *elements*, one per training example. An element is a scan and a window
of it, ``((y0, y1), (x0, x1), (z0, z1))``, that may reach outside the volume (the outside is
filled with ``cfg.IMG_PAD_MODE``), plus an optional ``target`` window for the mask and the
prediction (2.5D reads k slices of image but predicts the centre one). The base class does
the rest, identically for a local store and a server:

* batches: reads every window of a batch in one ``read_regions`` call per source, in
  background threads ahead of time (``loaders.prefetch``, the one read-ahead layer); the epoch
  order is a pure function of SEED and the epoch (``loaders.ordering``), split between
  data-parallel replicas (``num_replicas``, ``rank``) and resumable (``state_dict``);
* ``as_tf_dataset()`` and ``as_torch_dataset()`` (``loaders.tf_data``, ``loaders.torch_data``), ``stats()``;
* ``inference(model)``: per scan, runs the model over the scan's elements and stitches the
  predictions back into a volume (``loaders.inference``, ``loaders.stitching``), blending overlaps.

A subclass implements :meth:`DataLoader.build_elements` and, if the model's tensors are not
the window's own shape, :meth:`model_input`, :meth:`model_target` and :meth:`from_prediction`.
Decorate it with :func:`register_loader` and select it with ``cfg.TAG``.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from loaders import inference
from loaders.backend import import_keras
from loaders.batch_memory import BatchArrays, CopyThreads, copy_into
from loaders.blocks import BlockBuffer, block_ids, block_key
from loaders.class_index import class_indices, index_table
from loaders.config import Config, check_batching, check_config
from loaders.geometry import AxisRead, check_pad_mode, take_window
from loaders.ordering import Shard, batch_groups, resumed_lanes, shard_block_order, worker_batches
from loaders.prefetch import Prefetcher
from loaders.registry import (
    KEEPS_VALUES,
    LOADER_REGISTRY,
    SELECTS_VOXELS,
    Element,
    keeps_values,
    register_loader,
    selects_voxels,
)
from loaders.scans import (
    ScanEntry,
    element_reads,
    paired_reads,
    read_grouped_unmerged,
    scan_requests,
    scans_from_dicts,
    take_mask_window,
)
from loaders.state import LoaderState, dataset_fingerprint, plain_json
from loaders.stats import LoaderStats, WorkerCounters, with_workers
from store.label_map import Decoded, LabelRegion, apply_table, merged
from store.protocol import RegionRequest, ScanSource

import_keras()  # chooses the backend before Keras' first import (loaders.backend)

import keras  # noqa: E402

# re-exported: custom loaders import these from loaders.base
__all__ = [
    "LOADER_REGISTRY",
    "DataLoader",
    "Element",
    "build_data_loader",
    "keeps_values",
    "register_loader",
    "selects_voxels",
]


# (epoch, elements, the examples this rank reads in order, block buffer, group of each batch)
Plan = tuple[int, list[Any], list[int], BlockBuffer | None, list[int]]


def _roi(axes: Sequence[AxisRead]) -> tuple[slice, ...]:
    return tuple(slice(a.lo, a.hi) for a in axes)


class DataLoader(keras.utils.PyDataset):
    """Base class of scancache loaders (a Keras ``PyDataset``). See the module docstring."""

    # Whether examples are read in chunk-deep blocks (loaders.blocks; the slice loaders do):
    # then cfg.SHUFFLE_BLOCKS > 0 interleaves blocks in the order and reads each block once.
    reads_blocks = False
    # Config fields that decide which examples an epoch holds and in which order: a state saved
    # under other values (load_state_dict) is refused. A subclass names the ones it reads.
    batch_fields: tuple[str, ...] = ("IMG_SIZE", "IMG_STRIDE", "IMG_PAD_SIZE", "SHUFFLE_BLOCKS")

    def __init__(
        self,
        cfg: Config,
        dataset_dicts: Sequence[dict[str, Any]],
        is_test: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        # Keras' own worker threads stay off (workers=1): the loader reads ahead itself, in the
        # order it serves (loaders.prefetch), which is also the order fit() gets (__getitem__).
        super().__init__(
            workers=1, use_multiprocessing=False, max_queue_size=max(2, int(cfg.PREFETCH_BATCHES))
        )
        batch_size, num_replicas, rank = check_batching(batch_size, num_replicas, rank)
        check_config(cfg)
        self.shard = Shard(num_replicas, rank)
        if self.shard.num_replicas > 1 and cfg.SEED is None:
            raise ValueError(
                f"num_replicas={num_replicas} needs cfg.SEED set: every rank must compute the same epoch order"
            )
        self._cfg = cfg
        self.is_test = bool(is_test)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.batch_size = int(batch_size)
        # y as class indices (a uint8 label map per example, one-hot on the device) or channels
        self.class_index = str(cfg.Y_FORMAT) == "class_index"
        self.y_dtype = np.dtype(np.uint8) if self.class_index else np.dtype(cfg.Y_DTYPE)
        self.pad_mode = check_pad_mode(cfg.IMG_PAD_MODE)
        # what a torch worker needs to rebuild this loader in its own process (loaders.torch_data)
        self._recipe: tuple[list[dict[str, Any]], dict[str, Any]] = (
            [dict(d) for d in dataset_dicts],
            {
                "is_test": self.is_test,
                "shuffle": self.shuffle,
                "drop_last": self.drop_last,
                "batch_size": self.batch_size,
                "num_replicas": self.shard.num_replicas,
                "rank": self.shard.rank,
            },
        )
        # a test loader also takes scans without a mask: inference predicts them; batches (x, y)
        # hold the labelled scans only (MedSegPy's test loaders left the others out altogether)
        self.scans = scans_from_dicts(dataset_dicts, cfg, unlabelled=self.is_test)
        self._unlabelled = frozenset(s.index for s in self.scans if not s.meta.has_mask)
        self.seed = cfg.SEED if cfg.SEED is not None else random.SystemRandom().randrange(2**31)
        self.epoch = 0
        self._position = 0  # batches of this epoch already delivered by an iterator or fit()
        # the reader processes whose delivery order _position counts in (loaders.torch_data)
        self._position_workers = 1
        self._keras_epoch = False  # between Keras' on_epoch_begin and on_epoch_end
        self._served = 0
        self._last_index = -2
        self._serve_lock = threading.Lock()
        self._base_elements: list[Any] = list(self.build_elements())
        # (epoch, elements, order, blocks, batch groups) is replaced as one tuple, so a background
        # read sees one epoch's plan (and its block buffer).
        self._plan: Plan = self._make_plan(0)
        self._check_has_batches()
        self._prefetcher: Prefetcher[tuple[int, int], tuple[np.ndarray, ...]] = Prefetcher(
            self._load_key, workers=max(1, int(cfg.NUM_WORKERS)), depth=int(cfg.PREFETCH_BATCHES)
        )
        # x and y of the batches in flight (read ahead, being trained on), each twice over
        self._batch_arrays = BatchArrays(4 * (int(cfg.PREFETCH_BATCHES) + 2))
        self._copy_threads = CopyThreads()
        self._stats = LoaderStats(s.source for s in self.scans)
        self._wait_base = 0.0
        # counters of reader processes feeding this loader's batches (as_torch_dataset workers)
        self._worker_counters: list[WorkerCounters] = []

    # -- what subclasses define -----------------------------------------------------------------
    def build_elements(self) -> Sequence[Any]:
        """The examples of one epoch, usually one :class:`Element` per slice or patch."""
        raise NotImplementedError

    def model_input(self, image: np.ndarray, element: Element) -> np.ndarray:
        """The model's input for a window of the image (float32): ``(h, w, d)``, or ``(h, w,
        d, K)`` for scans with K > 1 image channels (``ScanEntry.channels``). Default: add a
        channel axis where there is none."""
        return image[..., None] if image.ndim == 3 else image

    @selects_voxels
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
        return [e for e in self._base_elements if e.scan == scan.index]

    def epoch_elements(self, epoch: int) -> list[Any]:
        """The examples of ``epoch`` (random samplers draw new ones from SEED and the epoch;
        each needs a ``.scan``). Default: those of :meth:`build_elements`, every epoch."""
        return self._base_elements

    # -- batches ----------------------------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self._cfg

    @property
    def uses_targets(self) -> bool:
        """Does :meth:`preprocess` use ``y`` (is it overridden)? Inference then cuts targets too."""
        return type(self).preprocess is not DataLoader.preprocess

    def num_classes(self) -> int:
        """Channels of y: the selected categories (every class of the store when CATEGORIES is
        empty), plus background if ``INCLUDE_BACKGROUND``; what ``cfg.get_num_classes`` needs."""
        # the first scan with classes (a scan without a mask may record the dataset's names)
        scan = next((s for s in self.scans if s.meta.named_classes > 0), self.scans[0])
        count = len(scan.categories) if scan.categories is not None else scan.meta.named_classes
        return count + (1 if self._cfg.INCLUDE_BACKGROUND else 0)

    def _check_labelled(self) -> None:
        """Batches are (x, y): a test loader whose scans all lack a mask has none to give
        (Keras' fit and evaluate need y). Refused in one line naming a scan, before any read;
        such scans are predicted with ``inference`` or ``write_predictions``."""
        if self._unlabelled and len(self._unlabelled) == len(self.scans):
            first = self.scans[min(self._unlabelled)].scan_id
            more = f" (and {len(self._unlabelled) - 1} more)" if len(self._unlabelled) > 1 else ""
            raise ValueError(
                f"scan {first!r}{more} has no mask, so there are no batches (x, y) to give; predict it "
                "with loader.inference(model) or write_predictions(loader, model, path)"
            )

    def _make_plan(self, epoch: int) -> Plan:
        elements = list(self.epoch_elements(epoch))
        if self._unlabelled:  # batches hold labelled scans; inference_elements still has them all
            elements = [e for e in elements if e.scan not in self._unlabelled]
        window = int(self._cfg.SHUFFLE_BLOCKS)
        blocks = self.reads_blocks and window > 0 and bool(elements)
        keys = [block_key(e, self.scans) for e in elements] if blocks else []
        scan_of = [e.scan for e in elements]
        order = shard_block_order(
            self.seed, epoch, scan_of, block_ids(keys) if blocks else None, self.shuffle, window, self.shard
        ).tolist()
        buffer = None
        if blocks:
            background = bool(self._cfg.INCLUDE_BACKGROUND)
            # the order keeps about two windows of blocks in use at a time (the current one and
            # the one read ahead); the LRU bound only matters for other access patterns
            buffer = BlockBuffer(self.scans, elements, order, keys, self.pad_mode, background, 2 * window + 2)
            ids = block_ids(keys)
            groups = batch_groups([ids[i] for i in order], self.batch_size, window)
        else:
            groups = list(range(math.ceil(len(order) / self.batch_size)))
        return epoch, elements, order, buffer, groups

    def _check_has_batches(self) -> None:
        """Refuse, now and in one line, a batch_size or num_replicas that leaves an epoch without
        a batch (instead of an IndexError at the first one)."""
        examples = len(self._plan[1])
        if examples == 0 or len(self) > 0:
            return
        replicas = self.shard.num_replicas
        if replicas > examples:
            raise ValueError(f"num_replicas={replicas} is more than the {examples} examples of this data set")
        raise ValueError(
            f"batch_size={self.batch_size} is more than the {self._num_elements()} examples "
            + (f"of rank {self.shard.rank} (of {replicas})" if replicas > 1 else "of this data set")
            + " and drop_last=True leaves no batch"
        )

    def _plan_for(self, epoch: int) -> Plan:
        plan = self._plan
        return plan if plan[0] == epoch else self._make_plan(epoch)

    def _num_elements(self) -> int:
        return len(self._plan[2])

    def num_scans(self) -> int:
        return len(self.scans)

    def __len__(self) -> int:
        return self._batches_in(self._plan)

    def _batches_in(self, plan: Plan) -> int:
        n = len(plan[2])
        if not self.is_test and self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        """Batch ``index`` of the current epoch; inside a Keras epoch, the next batch in order.

        Keras' ``fit`` shuffles the batch order by default, with Python's global random state.
        The loader's epoch order is already shuffled (deterministically from SEED and the
        epoch, :mod:`loaders.ordering`), so between Keras' ``on_epoch_begin`` and
        ``on_epoch_end`` request k gets the epoch's batch k whatever index Keras asks: the same
        batches, once each, in an order that the read-ahead follows and a resumed run repeats.
        """
        self._check_labelled()
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"batch {index} out of range for {length} batches")
        with self._serve_lock:
            if self._keras_epoch and self._served < length:
                index = self._served
                self._served += 1
            sequential = index in (0, self._last_index + 1)
            self._last_index = index
            epoch = self.epoch
        ahead = range(index + 1, length) if sequential else range(0)
        batch = self._prefetcher.get((epoch, index), [(epoch, i) for i in ahead[: self._prefetcher.depth]])
        if self._keras_epoch:
            self._position = index + 1
        return batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The current epoch's batches from where it stands (``state_dict``'s position)."""
        epoch = self.epoch
        for _, batch in self.batches_of(epoch, self.remaining_batches()):
            self._position += 1
            yield batch
        self._position, self._position_workers = 0, 1

    def worker_lanes(
        self, epoch: int, workers: int, position: int = 0, position_workers: int = 1
    ) -> list[list[int]]:
        """The batches each of ``workers`` reader processes reads of ``epoch`` (``loaders.ordering``):
        whole block groups dealt round-robin, so no two processes decode the same blocks; from
        ``position`` on (counted in the delivery order of ``position_workers`` processes), the
        rest of that order dealt so that taking turns delivers it unchanged."""
        groups = self._plan_for(epoch)[4][: len(self)]
        if position > 0:
            return resumed_lanes(worker_batches(groups, position_workers), position, workers)
        return worker_batches(groups, workers)

    def remaining_batches(self) -> list[int]:
        """The batch indices of the current epoch still to come, in order (``state_dict``'s position)."""
        return self.worker_lanes(self.epoch, 1, self._position, self._position_workers)[0]

    def batches_of(self, epoch: int, indices: Sequence[int]) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
        """``(index, batch)`` for ``indices`` of ``epoch``, reading the following ones ahead."""
        self._check_labelled()
        indices = list(indices)
        depth = self._prefetcher.depth
        for k, index in enumerate(indices):
            ahead = [(epoch, i) for i in indices[k + 1 : k + 1 + depth]]
            yield index, self._prefetcher.get((epoch, index), ahead)

    def batch_elements(self, index: int, epoch: int | None = None) -> list[Any]:
        """The elements of batch ``index`` of ``epoch`` (default: the current one)."""
        elements, order = self._plan_for(self.epoch if epoch is None else epoch)[1:3]
        start = index * self.batch_size
        return [elements[i] for i in order[start : min(start + self.batch_size, len(order))]]

    def _load_key(self, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
        epoch, index = key
        x, y = self.load_batch(self.batch_elements(index, epoch), _blocks=self._plan_for(epoch)[3])
        x_in, y_out = self.preprocess(x, y)
        return (x_in, y_out, x) if self.is_test else (x_in, y_out)

    # -- epochs, state and stats -----------------------------------------------------------------
    def on_epoch_begin(self) -> None:
        """Keras calls this before an epoch: serve it in order from its first batch."""
        with self._serve_lock:
            self._keras_epoch = True
            self._served = 0
            self._position, self._position_workers = 0, 1

    def on_epoch_end(self) -> None:
        """The next epoch. When Keras calls it, only after a complete pass: Keras also ends an
        "epoch" right after reading its first batches for the input spec, and that must not
        skip an epoch of the loader's order."""
        with self._serve_lock:
            keras_epoch, complete = self._keras_epoch, self._served >= len(self)
            self._keras_epoch = False
        if _called_from_keras() and not (keras_epoch and complete):
            self.set_epoch(self.epoch)  # from its first batch again
        else:
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (its order is a function of SEED and epoch)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must not be negative, got {epoch}")
        self._use_plan(self._make_plan(int(epoch)))

    def _use_plan(self, plan: Plan, position: int = 0, position_workers: int = 1) -> None:
        self._plan = plan
        with self._serve_lock:
            self.epoch = plan[0]
            self._position, self._position_workers = position, position_workers
            self._served = 0
            self._last_index = -2

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands, as plain JSON (``loaders.state``): restoring it gives exactly
        the batches still to come (seed, epoch, batches of it already delivered, shard)."""
        return self._state().to_dict()

    @functools.cached_property
    def dataset_fingerprint(self) -> str:
        """What identifies this loader's data set in a state (``loaders.state.dataset_fingerprint``)."""
        return dataset_fingerprint(self.scans)

    def batch_settings(self) -> dict[str, Any]:
        """The settings that decide the batches, as a state records them (plain JSON)."""
        settings = {"batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}
        settings.update({name: getattr(self._cfg, name) for name in self.batch_fields})
        return dict(plain_json(settings))

    def _state(self) -> LoaderState:
        shard = self.shard
        return LoaderState(
            type(self).__name__,
            int(self.seed),
            int(self.epoch),
            int(self._position),
            shard.num_replicas,
            shard.rank,
            len(self),
            int(self._position_workers),
            self.dataset_fingerprint,
            len(self.scans),
            self.batch_settings(),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of the same loader and data set).

        Everything is checked before anything changes: a refused state (another data set,
        other batch settings, another length) leaves the loader where it was."""
        restored = LoaderState.parse(state)
        restored.check_matches(self._state())
        # the state's epoch as this loader would make it under the state's seed, made on a
        # shallow copy (sharing scans and caches) so that this loader is untouched until it fits
        trial = copy.copy(self)
        trial.seed = restored.seed
        plan = trial._make_plan(restored.epoch)
        restored.check_length(self._batches_in(plan))
        self.seed = restored.seed
        self._use_plan(plan, restored.position, restored.workers)
        self._prefetcher.reset()

    def stats(self) -> dict[str, Any]:
        """Figures since creation or :meth:`reset_stats` (``loaders.stats``): ``batches``,
        ``bytes_read`` (decoded), ``bytes_delivered``, ``read_amplification``, ``read_s``,
        ``copy_s``, ``wait_s`` (a caller waiting for a batch not ready), ``seconds``; with
        reader processes (``as_torch_dataset`` workers) their figures are added in, and
        ``workers`` lists each one's (``batches_per_s``, ``cpu_s``, ``wait_s``, ...)."""
        report = self._stats.report(self._prefetcher.wait_s - self._wait_base)
        return with_workers(report, [w for c in self._worker_counters for w in c.per_worker()])

    def reset_stats(self) -> None:
        self._stats.reset()
        self._wait_base = self._prefetcher.wait_s
        for counters in self._worker_counters:
            counters.reset()

    def as_tf_dataset(self) -> Any:
        """A prefetched ``tf.data.Dataset`` of this loader's batches (``loaders.tf_data``)."""
        from loaders.tf_data import tf_dataset

        return tf_dataset(self)

    def as_torch_dataset(self, channels_first: bool = False) -> Any:
        """A torch ``IterableDataset`` of ``(x, y)`` tensors (``loaders.torch_data``)."""
        from loaders.torch_data import TorchBatches

        return TorchBatches(self, channels_first=channels_first)

    def read_elements(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(image window, mask window) per element, all read in one round per source.

        The mask is uint8 with the categories merged; images keep the store's dtype, a scan's
        K > 1 image channels stacked on a last axis ``(h, w, d, K)``.
        :meth:`load_batch` converts both to float32 once, into the batch.
        """
        return [(image, merged(mask)) for image, mask in self._read_unmerged(elements)]

    def _read_unmerged(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, Decoded]]:
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
        self, elements: Sequence[Any], _blocks: BlockBuffer | None = None
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
        builtin_read = type(self).read_elements is DataLoader.read_elements
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
        self,
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

    def _mixed_shapes(self, elements: Sequence[Element], xs: list[Any], ys: list[Any]) -> None:
        names = sorted({self.scans[e.scan].scan_id for e in elements})
        shapes = sorted({tuple(s) for s in xs}) if xs[0] != xs[1] else sorted({tuple(s) for s in ys})
        raise ValueError(f"one batch mixes input shapes {shapes} (scans {', '.join(names)})")

    def close(self) -> None:
        self._prefetcher.close()
        self._copy_threads.close()

    # -- inference (loaders.inference) ----------------------------------------------------------
    def _read_scan(self, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole image and merged mask of a scan, float32 (the mask is ``y_true``; None
        for a scan without a mask)."""
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

        input: ``{"x": (H, W, D) image ((H, W, D, K) for K > 1 image channels), "scan_id": ...,
        "scan_<attr>": ...}``; output:
        ``{"y_true": (H, W, D, C), "y_pred": (H, W, D, C), "time_elapsed": seconds}`` (reading
        included; ``y_true`` is None for a scan without a mask, which a test loader holds:
        nnU-Net ``imagesTs`` cases without ``labelsTs``). The next scan is read while this one is predicted; memory stays within
        two scans' inputs and one scan's output. Per-slice datasets give D = their slices.
        """
        return inference.run_inference(self, model, predict_kwargs)


def _called_from_keras(depth: int = 6) -> bool:
    """Is a ``keras`` module among the callers of the calling method (a subclass may sit between)?"""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith("keras."):
            return True
        frame = frame.f_back
    return False


def build_data_loader(cfg: Config, dataset_dicts: Sequence[dict[str, Any]], **kwargs: Any) -> DataLoader:
    """The loader registered under ``cfg.TAG``, built over ``dataset_dicts``."""
    from loaders import patches, slices  # noqa: F401  (they register the built-in loaders)

    try:
        cls: Callable[..., DataLoader] = LOADER_REGISTRY[cfg.TAG]
    except KeyError:
        known = ", ".join(sorted(LOADER_REGISTRY))
        raise KeyError(f"cfg.TAG {cfg.TAG!r} is not a registered loader; registered: {known}") from None
    return cls(cfg, dataset_dicts, **kwargs)

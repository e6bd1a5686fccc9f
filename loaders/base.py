"""The loader base class and registry: what a custom loader subclasses.

A loader is a list of *elements*, one per training example. An element is a scan and a window
of it, ``((y0, y1), (x0, x1), (z0, z1))``, that may reach outside the volume (the outside is
filled with ``cfg.IMG_PAD_MODE``), plus an optional ``target`` window for the mask and the
prediction (2.5D reads k slices of image but predicts the centre one). The base class does
the rest, identically for a local store and a server:

* batches: reads every window of a batch in one ``read_regions`` call per source, in
  background threads ahead of time (``loaders.prefetch``, the one read-ahead layer); the epoch
  order is a pure function of SEED and the epoch (``loaders.plan``, ``loaders.ordering``), split between
  data-parallel replicas (``num_replicas``, ``rank``) and resumable (``state_dict``);
* ``as_tf_dataset()`` and ``as_torch_dataset()`` (``loaders.tf_data``, ``loaders.torch_data``), ``stats()``;
* ``inference(model)``: per scan, runs the model over the scan's elements and stitches the
  predictions back into a volume (``loaders.inference``, ``loaders.stitching``), blending overlaps.

A subclass implements :meth:`DataLoader.build_elements` and, if the model's tensors are not
the window's own shape, :meth:`model_input`, :meth:`model_target` and :meth:`from_prediction`.
Decorate it with :func:`register_loader` and select it with ``cfg.TAG``.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from loaders import inference
from loaders.backend import import_keras
from loaders.batch_fill import BatchFilling
from loaders.batch_memory import BatchArrays, CopyThreads
from loaders.config import Config, check_batching, check_config
from loaders.copies import Copies
from loaders.epochs import EpochState, _called_from_keras
from loaders.geometry import check_pad_mode
from loaders.input_shapes import keras_probe_batch
from loaders.keras_reading import KerasReadingOptions
from loaders.ordering import Shard
from loaders.plan import EpochPlanning, Plan
from loaders.prefetch import Prefetcher
from loaders.process_group import warn_of_a_process_group
from loaders.registry import (
    LOADER_REGISTRY,
    MEDSEGPY_INSTEAD,
    MEDSEGPY_TAGS,
    Element,
    build_data_loader,
    keeps_values,
    refuse_medsegpy_hooks,
    register_loader,
    selects_voxels,
)
from loaders.scans import (
    ScanEntry,
    scans_from_dicts,
)
from loaders.stats import LoaderStats, WorkerCounters, with_workers
from store.units import count_of

import_keras()  # chooses the backend before Keras' first import (loaders.backend)

import keras  # noqa: E402

# re-exported: custom loaders import these from loaders.base
__all__ = [
    "LOADER_REGISTRY",
    "MEDSEGPY_INSTEAD",
    "MEDSEGPY_TAGS",
    "DataLoader",
    "Element",
    "build_data_loader",
    "keeps_values",
    "register_loader",
    "selects_voxels",
]


class DataLoader(Copies, BatchFilling, EpochState, EpochPlanning, KerasReadingOptions, keras.utils.PyDataset):
    """Base class of scancache loaders (a Keras ``PyDataset``). See the module docstring."""

    # Whether examples are read in chunk-deep blocks (loaders.blocks; the slice loaders do):
    # then cfg.SHUFFLE_BLOCKS > 0 interleaves blocks in the order and reads each block once.
    reads_blocks = False
    # Config fields that decide which examples an epoch holds and in which order: a state saved
    # under other values (load_state_dict) is refused. A subclass names the ones it reads.
    batch_fields: tuple[str, ...] = ("IMG_SIZE", "IMG_STRIDE", "IMG_PAD_SIZE", "SHUFFLE_BLOCKS")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        refuse_medsegpy_hooks(cls)  # a port of MedSegPy's hooks would be silently not called

    def __new__(cls, *args: Any, **kwargs: Any) -> DataLoader:
        loader = super().__new__(cls)
        # a subclass's own keyword arguments (build_loader(..., flip=True) reaches its __init__):
        # a torch worker passes them again when it rebuilds the loader (loaders.torch_data)
        loader._init_kwargs = dict(kwargs)
        return loader

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
        # every rank must compute the same epoch order: a random seed each would overlap them,
        # unless the order and the examples do not depend on the seed (unshuffled, fixed examples)
        seeded = bool(shuffle) or type(self).epoch_elements is not DataLoader.epoch_elements
        if self.shard.num_replicas > 1 and cfg.SEED is None and seeded:
            raise ValueError(
                f"num_replicas={num_replicas} needs cfg.SEED set: every rank must compute the same epoch order"
            )
        warn_of_a_process_group(self.shard, bool(is_test), bool(shuffle))
        # its own copy: a notebook cell that edits the Config to build the next loader must not
        # change this one's y channels or epoch plan midway (some fields are read live)
        self._cfg = cfg.copy()
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
        self._open_passes = 0  # iterators of this loader started and not yet exhausted or closed
        # the reader processes whose delivery order _position counts in (loaders.torch_data)
        self._position_workers = 1
        self._keras_epoch = False  # between Keras' on_epoch_begin and on_epoch_end
        self._served = 0
        self._resume_pass = False  # the next Keras epoch goes on from _position
        self._begin_position = 0  # where the current Keras epoch began: epoch, batch
        self._begin_epoch = 0
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
        # the datasets as_torch_dataset() made of this loader (weakly: they hold the loader)
        self._torch_views: list[weakref.ref[Any]] = []

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

    def examples_note(self) -> str:
        """What decides the count of examples, said when an epoch has no batch (a loader may say)."""
        return ""

    def num_scans(self) -> int:
        return len(self.scans)

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
        if not self._keras_epoch and _called_from_keras(function="get_tf_dataset"):
            probe = keras_probe_batch(self, index)  # examples of varying shapes: a spec that fits all
            if probe is not None:
                return probe
        with self._serve_lock:
            outrun = self._keras_epoch and self._served >= length
        if outrun:
            # Keras' steps go past the pass (fit(steps_per_epoch=k) resumed mid-pass: its own
            # iterator counts from the resume): the loader's next epoch, from its first batch
            self.set_epoch(self.epoch + 1)
        with self._serve_lock:
            if outrun:
                self._keras_epoch = True
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
        if len(batch) > 2 and _called_from_keras():
            # Keras takes a third element for sample weights: a test batch's x_raw would weight
            # evaluate()'s loss and metrics by the image's intensities
            return batch[:2]
        return batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The current epoch's batches from where it stands (``state_dict``'s position)."""
        epoch = self.epoch
        self._count_pass(+1)
        try:
            for _, batch in self.batches_of(epoch, self.remaining_batches()):
                self._position += 1
                yield batch
            self._position, self._position_workers = 0, 1
        finally:  # exhausted, or closed (a loop left by break closes it at once in CPython)
            self._count_pass(-1)

    def _count_pass(self, change: int) -> None:
        """An iterator's pass begins (+1) or ends (-1): ``set_epoch`` and ``load_state_dict``
        refuse to run during one. Under the lock: passes may run in several threads."""
        with self._serve_lock:
            self._open_passes += change

    def batches_of(self, epoch: int, indices: Sequence[int]) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
        """``(index, batch)`` for ``indices`` of ``epoch``, reading the following ones ahead."""
        self._check_labelled()
        indices = list(indices)
        depth = self._prefetcher.depth
        for k, index in enumerate(indices):
            ahead = [(epoch, i) for i in indices[k + 1 : k + 1 + depth]]
            yield index, self._prefetcher.get((epoch, index), ahead)

    def _load_key(self, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
        epoch, index = key
        x, y = self.load_batch(self.batch_elements(index, epoch), _blocks=self._plan_for(epoch)[3])
        x_in, y_out = self.preprocess(x, y)
        return (x_in, y_out, x) if self.is_test else (x_in, y_out)

    # -- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Figures since creation or :meth:`reset_stats` (``loaders.stats``): ``batches``,
        ``bytes_read`` (decoded), ``bytes_delivered``, ``read_amplification``, ``read_s``,
        ``copy_s``, ``wait_s`` (a caller waiting for a batch not ready), ``seconds``; with
        reader processes (``as_torch_dataset`` workers) their figures are added in, and
        ``workers`` lists each one's (``batches_per_s``, ``cpu_s``, ``wait_s``, ...);
        ``wait_s`` stays this process's own (a loop waiting on a torch ``DataLoader`` is not
        seen here), ``worker_wait_s`` the workers' waits for their reads."""
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

        view = TorchBatches(self, channels_first=channels_first)
        self._torch_views.append(weakref.ref(view))
        return view

    def _live_torch_views(self) -> list[Any]:
        views = [ref() for ref in self._torch_views]
        self._torch_views[:] = [
            weakref.ref(v) for v in views if v is not None
        ]  # one dataset an epoch adds up
        return [v for v in views if v is not None]

    def _use_plan(self, plan: Plan, position: int = 0, position_workers: int = 1) -> None:
        super()._use_plan(plan, position, position_workers)
        # a torch dataset of this loader reads epoch and position from its shared table: the
        # loader's own set_epoch, on_epoch_end and load_state_dict reach it too
        for view in self._live_torch_views():
            view.publish(self)

    def state_dict(self) -> dict[str, Any]:
        for view in self._live_torch_views():
            if view.took_batches():
                raise ValueError(
                    "state_dict: this loader's batches went through as_torch_dataset(), which "
                    "counts them: save ds.state_dict(batches_done=<batches your loop took>) instead"
                )
        return super().state_dict()

    def close(self) -> None:
        """Stop the read-ahead and copy threads now (a loader dropped without it is freed, and
        its threads stopped, once its last reference goes)."""
        self._prefetcher.close()
        self._copy_threads.close()

    def __repr__(self) -> str:  # what a notebook shows for a loader
        try:
            n = len(self)
            batches = f"{n} batch" if n == 1 else f"{n} batches"
            return (
                f"<{type(self).__name__}: {count_of(len(self.scans), 'scan')}, {batches} of "
                f"{self.batch_size}, epoch {self.epoch}, batch {self._position}>"
            )
        except (AttributeError, TypeError, ValueError):  # not built yet (an error in __init__)
            return f"<{type(self).__name__}>"

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference (loaders.inference) ----------------------------------------------------------
    def _read_scan(self, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole image (float32) and merged mask of a scan (``y_true``, in the loader's y
        dtype; None for a scan without a mask)."""
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
        nnU-Net ``imagesTs`` cases without ``labelsTs``). The next scan is read while this one is predicted; with the scan the
        loop body still holds, memory holds three scans' inputs and two scans' outputs (one and
        one fewer for a caller that drops each scan before the next), plus the model's own. Per-slice datasets give D = their slices.
        """
        return inference.run_inference(self, model, predict_kwargs)

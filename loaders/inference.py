"""``loader.inference(model)``: per scan, predict every element and stitch the predictions.

What makes it cheap (see docs/tuning.md, "Inference stitching"):

* the scan is read once, each array converted once into its final dtype (the image keeps a
  float32 store's buffer; the merged uint8 mask becomes ``y_true`` in the loader's y dtype in one pass);
* predictions are streamed: a batch is cut from memory, predicted, stitched into the float32
  output and dropped; for a Keras model stitching runs on a worker thread while the model
  predicts the next batches, at most ``PENDING_BYTES`` behind;
* stitching (``loaders.stitching``) copies predictions into place when the windows do not
  overlap (slices, a plain grid), and otherwise keeps a float32 running weighted mean with one
  weight volume and reused scratch buffers;
* targets are cut for a batch only when the loader overrides ``preprocess`` (the default
  ignores them), and a Keras model is called with ``predict_on_batch`` unless an argument needs
  ``predict``.

This module is inference's one home. It receives what it needs as an
:class:`InferenceLoader` (the few methods and fields of a loader it uses, a ``Protocol``) and
imports nothing of ``loaders.base``: the dependency runs one way, base -> inference.
``DataLoader.inference(model)`` (per scan) and ``DataLoader.predict_scan`` (one scan) are the
stable public entry points; ``loaders.predictions`` writes on top of them.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from loaders.backend import import_keras
from loaders.config import Config
from loaders.prefetch import Prefetcher
from loaders.scans import ScanEntry, cut_window, read_in_slabs
from loaders.stitching import Aggregator, windows_disjoint
from store.errors import RequestTooLarge
from store.format import IMAGE, MASK, image_arrays
from store.interrupts import result_of
from store.protocol import RegionRequest

import_keras()  # chooses the backend before Keras' first import (loaders.backend)

import keras  # noqa: E402


class InferenceLoader(Protocol):
    """What inference uses of a loader (``DataLoader`` is one)."""

    scans: list[ScanEntry]
    batch_size: int
    pad_mode: str

    @property
    def cfg(self) -> Config: ...
    @property
    def uses_targets(self) -> bool: ...
    def inference_elements(self, scan: ScanEntry) -> Any: ...
    def model_input(self, image: np.ndarray, element: Any) -> np.ndarray: ...
    def model_target(self, mask: np.ndarray, element: Any) -> np.ndarray: ...
    def from_prediction(self, prediction: np.ndarray, element: Any) -> np.ndarray: ...
    def blend_weights(self, element: Any) -> np.ndarray | None: ...
    def preprocess(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def predict_scan(
        self, model: Any, scan: ScanEntry, image: np.ndarray, predict_kwargs: dict[str, Any], mask: Any = None
    ) -> np.ndarray: ...
    def _read_scan(self, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray | None]: ...


# How far (bytes of predictions waiting to be stitched) the model may run ahead of stitching:
# enough to cover paging in a 450 MiB output (0.1-1 s on a busy machine) with a few batches.
PENDING_BYTES = 64 * 2**20

# predict_generator arguments Keras 3 dropped; MedSegPy scripts still pass them
LEGACY_PREDICT_ARGS = ("workers", "use_multiprocessing", "max_queue_size")


def predict_batch(model: Any, x: np.ndarray, predict_kwargs: dict[str, Any]) -> np.ndarray:
    """Predictions of a Keras model, a torch module or any callable on a numpy batch.

    ``model.predict`` builds an iterator and callbacks on every call (milliseconds per batch);
    ``predict_on_batch`` runs the same inference step directly. ``predict`` is used only when
    ``predict_kwargs`` asks for something ``predict_on_batch`` would not do: ``verbose`` is
    moot for one batch, and a ``batch_size`` no smaller than the batch splits nothing.
    ``channels_first`` (torch modules: True unless given; other callables: False) gives the
    model x with its channel axis second, as ``as_torch_dataset(channels_first=True)`` does,
    and takes its output's channels back from there.
    """
    channels_first = predict_kwargs.get("channels_first")
    output = predict_kwargs.get("output")
    predict_kwargs = {k: v for k, v in predict_kwargs.items() if k not in ("channels_first", "output")}
    # a Keras model first: on the torch backend it is a torch.nn.Module too
    if _is_keras_model(model):
        if channels_first:
            raise ValueError(
                "channels_first=True: a Keras model here takes channels last, as it was trained "
                "on the loader's batches; channels_first is for torch modules and plain callables"
            )
        out = _as_numpy(select_output(_predict_keras(model, x, predict_kwargs), output, x))
    elif (torch_module := _torch_module(model)) is not None:
        out = _predict_torch(torch_module, model, x, channels_first is not False, output)
    elif channels_first:
        first = select_output(model(np.ascontiguousarray(np.moveaxis(x, -1, 1))), output, x)
        out = np.moveaxis(_as_numpy(first), 1, -1)
    else:
        out = _as_numpy(select_output(model(x), output, x))
    if out.ndim == 0 or len(out) != len(x):
        raise ValueError(
            f"the model gave {len(out) if out.ndim else 'no'} predictions for a batch of {len(x)} examples:"
            " inference needs one per example (a model whose output has the batch axis first)"
        )
    return out


def _one_per_example(out: list[Any] | tuple[Any, ...], batch: int, ndim: int) -> bool:
    """Whether a list is one prediction per example (each an axis fewer than the batch x, all
    alike), not several outputs of the batch (each with the batch axis first)."""
    shapes = {tuple(getattr(o, "shape", ())) for o in out}
    return len(out) == batch and len(shapes) == 1 and len(next(iter(shapes))) == ndim - 1


def select_output(out: Any, output: Any = None, x: np.ndarray | None = None) -> Any:
    """The one output inference stitches, of a model that may give several.

    A list or tuple (deep supervision, as nnU-Net trains: full resolution first) gives its
    first element unless ``output`` picks another by index (a list of one prediction per
    example, as a plain callable may give, is kept whole: the batch ``x`` tells them apart); a dict (Keras models with named
    outputs) needs ``output`` to name one. ``output`` on a model with one output is refused,
    so a misplaced keyword is not ignored.
    """
    if isinstance(out, dict):
        if output is None:
            raise ValueError(
                f"the model gives named outputs {sorted(map(str, out))}: pick the one to stitch with "
                f"output=NAME (e.g. inference(model, output={next(iter(out))!r}))"
            )
        if output not in out:
            raise ValueError(f"output={output!r}: the model's outputs are named {sorted(map(str, out))}")
        return out[output]
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError(
                "the model gave an empty list of outputs: inference needs one prediction per example"
            )
        if output is None and x is not None and _one_per_example(out, len(x), x.ndim):
            return out  # a plain callable's list of one prediction per example: stacked as before
        index = 0 if output is None else output
        if isinstance(index, bool) or not isinstance(index, int) or not -len(out) <= index < len(out):
            raise ValueError(
                f"output={output!r}: the model gives {len(out)} outputs (a list); pick one by its index, "
                f"0 to {len(out) - 1}"
            )
        return out[index]
    if output is not None:
        raise ValueError(f"output={output!r}: the model gives a single output; leave output out")
    return out


def _as_numpy(out: Any) -> np.ndarray:
    return out if isinstance(out, np.ndarray) else np.asarray(keras.ops.convert_to_numpy(out))


def _torch_module(model: Any) -> Any:
    """The ``torch`` module if ``model`` is a ``torch.nn.Module`` (torch never imported here
    for anyone else)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(model, torch.nn.Module) else None


def _predict_torch(torch: Any, model: Any, x: np.ndarray, channels_first: bool, output: Any) -> np.ndarray:
    """A torch module's predictions: in eval mode (dropout off, batch norm's running
    statistics) and without gradients, on the device its parameters are on; back as float32.
    A module giving several outputs (deep supervision) gives the one ``select_output`` picks."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    batch = torch.from_numpy(np.ascontiguousarray(x))
    if channels_first:
        batch = batch.movedim(-1, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = select_output(model(batch.to(device)), output, x)
            if isinstance(out, (list, tuple)):  # one prediction per example
                out = torch.stack(list(out))
    finally:
        model.train(was_training)
    if channels_first:
        out = out.movedim(1, -1)
    return out.detach().to("cpu", torch.float32).numpy()  # type: ignore[no-any-return]


def _predict_keras(model: Any, x: np.ndarray, predict_kwargs: dict[str, Any]) -> Any:
    needs_predict = {k: v for k, v in predict_kwargs.items() if k != "verbose"}
    size = needs_predict.get("batch_size", 0)
    if "batch_size" in needs_predict and (size is None or int(size) >= len(x)):
        del needs_predict["batch_size"]
    if _replicas(model) > 1:
        # under a tf.distribute strategy (MirroredStrategy) Keras' predict_on_batch gives a
        # copy of the rows per replica, and predict fails on a batch smaller than the replicas:
        # the model called directly gives each row once (the variables read where they live)
        return model(x, training=False)
    if needs_predict:
        return model.predict(x, **{"verbose": 0, **predict_kwargs})
    return model.predict_on_batch(x)


def _replicas(model: Any) -> int:
    """How many replicas a Keras model's tf.distribute strategy runs (1 without one)."""
    strategy = getattr(model, "distribute_strategy", None)
    try:
        return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    except (TypeError, ValueError):
        return 1


def read_scan(loader: InferenceLoader, scan: ScanEntry) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole image (float32; (H, W, D, K) for K > 1 image channels) and merged mask
    (``y_true``, one channel a category, in the loader's y dtype: float32, or uint8 with
    ``Y_DTYPE="uint8"`` or ``Y_FORMAT="class_index"``, a quarter of the memory, which with 15
    organs of a 512x512x300 CT is 4.7 GB against 1.2 GB; None for a scan without a mask) of a
    scan, each converted once."""
    whole = (slice(0, scan.shape[0]), slice(0, scan.shape[1]), slice(0, scan.shape[2]))
    if scan.channels == 1:
        image = read_in_slabs(scan.source, RegionRequest(scan.scan_id, IMAGE, version=scan.version), whole)
        image = image.astype(np.float32, copy=False)  # a float32 store's buffer is used as is
    else:
        image = _read_channels(scan, whole)
    if not scan.meta.has_mask:  # a test case without labels: predicted, nothing to compare with
        return image, None
    background = bool(loader.cfg.INCLUDE_BACKGROUND)
    request = RegionRequest(scan.scan_id, MASK, None, scan.categories, background, version=scan.version)
    mask = read_in_slabs(scan.source, request, whole)
    return image, mask.astype(getattr(loader, "y_dtype", np.float32), copy=False)


def _read_channels(scan: ScanEntry, whole: tuple[slice, slice, slice]) -> np.ndarray:
    """All K image channels of a scan as one (H, W, D, K) float32 volume: one read of every
    channel's array where the source allows it, else channel by channel in slabs."""
    requests = [
        RegionRequest(scan.scan_id, name, whole, version=scan.version) for name in image_arrays(scan.channels)
    ]
    out = np.empty((*scan.shape, scan.channels), np.float32)
    try:
        channels = scan.source.read_regions(requests)
    except RequestTooLarge:  # a server's --max-bytes below the scan: slabs along z, per channel
        channels = [read_in_slabs(scan.source, r, whole) for r in requests]
    for k, channel in enumerate(channels):
        out[..., k] = channel
    return out


def _is_keras_model(model: Any) -> bool:
    return hasattr(model, "predict_on_batch") and hasattr(model, "predict")


class _ScanStitcher:
    """Stitches one scan's predictions, batch after batch (on a worker thread, see predict_scan)."""

    def __init__(self, loader: InferenceLoader, scan: ScanEntry, disjoint: bool) -> None:
        self.loader, self.scan, self.disjoint = loader, scan, disjoint
        self.aggregator: Aggregator | None = None
        self.started = False  # a prediction was added: the output's channels are settled

    def prepare(self, channels: int) -> None:
        """Allocate (and page in) the output ahead of the first prediction, guessing its channels."""
        self.aggregator = Aggregator(self.scan.shape, channels, disjoint=self.disjoint)

    def add_batch(self, chunk: list[Any], predictions: np.ndarray) -> None:
        for e, p in zip(chunk, predictions, strict=True):
            out = self._window_prediction(p, e)
            if self.aggregator is None or (not self.started and self.aggregator.channels != out.shape[-1]):
                # the channels are known from the first prediction (a wrong guess is replaced)
                self.aggregator = Aggregator(self.scan.shape, out.shape[-1], disjoint=self.disjoint)
            self.aggregator.add(e.output_window, out, self.loader.blend_weights(e))
            self.started = True

    def _window_prediction(self, prediction: np.ndarray, element: Any) -> np.ndarray:
        """One example's output as its window's (h, w, d, C), or one line naming the scan and
        the shapes: a model that pools, crops or outputs one vector cannot be stitched as is."""
        window = tuple(b - a for a, b in element.output_window)
        try:
            out = np.asarray(self.loader.from_prediction(prediction, element))
        except (IndexError, ValueError):
            out = None
        if out is None or out.ndim != len(window) + 1 or out.shape[: len(window)] != window:
            own = not str(type(self.loader).from_prediction.__module__).startswith("loaders.")
            if own and out is not None:  # the loader's own mapping gave the wrong shape
                raise ValueError(
                    f"scan {self.scan.scan_id!r}: {type(self.loader).__name__}.from_prediction returned "
                    f"{tuple(out.shape)} for a model output of {tuple(prediction.shape)}; it must return the "
                    f"{'x'.join(map(str, window))} window with channels last"
                )
            raise ValueError(
                f"scan {self.scan.scan_id!r}: the model's output for one example is {tuple(prediction.shape)}, "
                f"but inference needs one value per voxel of its {'x'.join(map(str, window))} window "
                "(the input's size, channels last); a model that pools or crops needs its loader's "
                "from_prediction to map its output back (docs/custom-dataloader.md)"
            )
        return out


def _batch_input(
    loader: InferenceLoader, chunk: list[Any], image: np.ndarray, mask: np.ndarray | None
) -> np.ndarray:
    """The model's input for a batch: windows cut from memory, then the loader's preprocess."""
    x = np.stack([loader.model_input(cut_window(image, e.window, loader.pad_mode), e) for e in chunk])
    if mask is not None:
        y = np.stack(
            [loader.model_target(cut_window(mask, e.output_window, loader.pad_mode), e) for e in chunk]
        )
    else:
        y = np.zeros((len(chunk), 0), np.float32)
    x, _ = loader.preprocess(x, y)  # the same inputs the model saw in training
    return x


def predict_scan(
    loader: InferenceLoader,
    model: Any,
    scan: ScanEntry,
    image: np.ndarray,
    predict_kwargs: dict[str, Any],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The stitched (H, W, D, C) float32 prediction of one scan; windows are cut from memory.

    ``mask`` (the scan's merged mask, in the loader's y dtype) gives an overriding :meth:`preprocess` the
    batch's real targets; without an override no targets are cut.

    For a Keras model, batches are stitched on a worker thread while the model predicts the
    next ones (numpy releases the GIL), so stitching hides behind the model; the output is
    allocated and paged in there too, before the first prediction. The model may run ahead
    by :data:`PENDING_BYTES` of predictions (at least one batch). Keras returns a new array
    per call; a plain callable might reuse its output buffer, so its batches are stitched
    before the next call.
    """
    elements = list(loader.inference_elements(scan))
    if not elements:
        raise ValueError(f"scan {scan.scan_id!r} has no elements to predict")
    stitcher = _ScanStitcher(loader, scan, windows_disjoint((e.output_window for e in elements), scan.shape))
    targets = mask if loader.uses_targets else None
    batch = max(1, int(loader.batch_size))
    background = _is_keras_model(model)
    with ThreadPoolExecutor(1, thread_name_prefix="scancache-stitch") as pool:
        pending: deque[tuple[Future[None], int]] = deque()
        if background and mask is not None:  # y_true's channels: what a model predicts, usually
            pending.append((pool.submit(stitcher.prepare, int(mask.shape[-1])), 0))
        for start in range(0, len(elements), batch):
            chunk = elements[start : start + batch]
            predictions = predict_batch(model, _batch_input(loader, chunk, image, targets), predict_kwargs)
            if background:
                pending.append((pool.submit(stitcher.add_batch, chunk, predictions), predictions.nbytes))
                # the model runs ahead of stitching by at most PENDING_BYTES of predictions
                while len(pending) > 1 and sum(n for _, n in pending) > PENDING_BYTES:
                    result_of(pending.popleft()[0])  # also raises the stitching's errors here
            else:
                stitcher.add_batch(chunk, predictions)
            del predictions
        while pending:
            result_of(pending.popleft()[0])
    if stitcher.aggregator is None:
        raise ValueError(f"scan {scan.scan_id!r} has no elements to predict")
    return stitcher.aggregator.result()


def _select_slices(scan: ScanEntry, array: np.ndarray) -> np.ndarray:
    """Per-slice datasets: keep the listed slices (D = their number)."""
    if len(scan.slices) == scan.shape[2]:
        return array
    return array[:, :, list(scan.slices)]


def run_inference(
    loader: InferenceLoader, model: Any, predict_kwargs: dict[str, Any]
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``DataLoader.inference``: ``(input, output)`` per scan, sorted by scan id.

    The next scan is read in a background thread while this one is predicted. With the scan a
    ``for`` loop's body still holds while the next is made, memory holds three scans' inputs
    and two scans' outputs, plus the model's working memory (measured on 256x256x96 scans of
    96 MB input and 72 MB output each: 496-532 MB; a caller that drops each scan first,
    361-396 MB).
    """
    kwargs = {k: v for k, v in predict_kwargs.items() if k not in LEGACY_PREDICT_ARGS}
    scans = sorted(loader.scans, key=lambda s: s.scan_id)
    if not scans:
        return
    # the one read-ahead layer (loaders.prefetch), one scan ahead in one thread: the next scan
    # is read only once this one is in hand, which keeps the memory bound above
    reads: Prefetcher[int, tuple[np.ndarray, np.ndarray | None]] = Prefetcher(
        lambda k: loader._read_scan(scans[k]), workers=1, depth=1
    )
    try:
        for k, scan in enumerate(scans):
            start = time.perf_counter()
            image, mask = reads.get(k, [k + 1] if k + 1 < len(scans) else [])
            y_pred = loader.predict_scan(model, scan, image, kwargs, mask)
            image, y_pred = _select_slices(scan, image), _select_slices(scan, y_pred)
            mask = None if mask is None else _select_slices(scan, mask)  # None: a scan without a mask
            elapsed = time.perf_counter() - start
            inputs = {"x": image, "scan_id": scan.scan_id, **scan.inference_attributes()}
            yield inputs, {"y_true": mask, "y_pred": y_pred, "time_elapsed": elapsed}
            del image, mask, y_pred, inputs  # the caller holds what it keeps
    finally:  # exhausted, or a loop left early: no read goes on for it
        reads.close()

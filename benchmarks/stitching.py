"""Inference stitching: the loader's per-scan inference time over the model's own predict time,
and the peak memory of stitching against one scan's output.

The model is a small real Keras 3D network (two convolutions). The scan is read once up front
(``loader._read_scan``, as ``inference`` does) so that only what ``inference`` adds to the
model is timed: cutting windows from memory, batching, prediction and blending
(``loader.predict_scan``, called with the image and the ``y_true`` mask exactly as
``inference`` calls it). The baseline runs the same model on the same batches, cut beforehand.
Both are repeated *interleaved* (predict, stitch, predict, stitch, ...) and the best of each is
kept, so that other work on the machine slows both alike. Peak memory is traced with
``tracemalloc`` (numpy reports its buffers to it; the backend's own tensors are not counted,
they are the model's business, not stitching's) and includes the output itself.

The default grid (stride = patch) does not overlap, which the loader detects (predictions are
copied into place); an overlapping grid (stride 3/4 of the patch) is measured as well, for
information, since that is the case where blending does real work.
"""

from __future__ import annotations

import os
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

from benchmarks.data import CATEGORIES, BenchData
from benchmarks.report import Row

SECTION = "Inference stitching (3D patches 64x64x32, gaussian blending)"


def tiny_model(patch: tuple[int, int, int], channels: int) -> object:
    import keras

    inputs = keras.Input((*patch, 1))
    h = keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv3D(channels, 1, activation="softmax")(h)
    return keras.Model(inputs, outputs)


def run(data: BenchData) -> list[Row]:
    from loaders import Config, DatasetCatalog, build_loader

    patch = (64, 64, 32)
    overlap = tuple(3 * p // 4 for p in patch)
    loaders = {}
    DatasetCatalog.register("bench-stitch", str(data.store))
    try:
        for stride in (patch, overlap):
            cfg = Config(TAG="PatchDataLoader", CATEGORIES=list(CATEGORIES), INCLUDE_BACKGROUND=True,
                         IMG_SIZE=(*patch, 1), IMG_STRIDE=stride, BLEND_MODE="gaussian", SEED=0)  # fmt: skip
            loaders[stride] = build_loader(
                cfg, "bench-stitch", batch_size=8, is_test=True, shuffle=False, drop_last=False
            )
    finally:
        DatasetCatalog.remove("bench-stitch")
    main = loaders[patch]
    scan = main.scans[0]
    model = tiny_model(patch, main.cfg.get_num_classes())
    image, mask = main._read_scan(scan)  # what inference() hands predict_scan
    try:
        grid = _measure(main, model, scan, image, mask, repeats=5)
        over = _measure(loaders[overlap], model, scan, image, mask, repeats=2)
    finally:
        for loader in loaders.values():
            loader.close()
    stride_text = "x".join(map(str, overlap))
    return [
        Row(SECTION, "model predict alone", grid.predict_s, "s", note=f"{grid.windows} windows, scan {scan.shape}"),
        Row(SECTION, "inference with stitching", grid.total_s, "s", grid.predict_s * 1.10, "1.1x predict",
            "<= 10% over predict", 1.0, higher_is_better=False, note=grid.note()),
        Row(SECTION, "peak memory of stitching", grid.peak_mib, "MiB", 1.5 * grid.output_mib,
            "1.5x one scan's output", "<= 1.5x one scan's output", 1.0, higher_is_better=False,
            note=f"{grid.peak_mib / grid.output_mib:.2f}x the {grid.output_mib:.0f} MiB float32 output"),
        Row(SECTION, f"overlapping grid (stride {stride_text}): inference with stitching", over.total_s, "s",
            over.predict_s, "predict alone", higher_is_better=False,
            note=f"{over.windows} windows; {over.note()} (information)"),
        Row(SECTION, f"overlapping grid (stride {stride_text}): peak memory", over.peak_mib, "MiB",
            over.output_mib, "one scan's output", higher_is_better=False,
            note=f"{over.peak_mib / over.output_mib:.2f}x the output (information)"),
    ]  # fmt: skip


@dataclass(frozen=True)
class Measured:
    predict_s: float  # best wall time of the model alone over the pre-cut batches
    total_s: float  # best wall time of predict_scan
    extra_cpu_s: float  # median over the paired runs of (predict_scan - predict) process CPU time
    windows: int
    peak_mib: float
    output_mib: float

    def note(self) -> str:
        return (
            f"{(self.total_s / self.predict_s - 1) * 100:.0f}% over predict; "
            f"stitching's extra CPU time {self.extra_cpu_s:.2f} s"
        )


def _measure(
    loader: Any, model: Any, scan: Any, image: np.ndarray, mask: np.ndarray, repeats: int
) -> Measured:
    """Time the model alone and predict_scan, interleaved, then trace predict_scan's peak memory."""
    from loaders.inference import predict_batch
    from loaders.scans import cut_window

    elements = list(loader.inference_elements(scan))
    step = loader.batch_size
    batches = [
        np.stack([loader.model_input(cut_window(image, e.window, loader.pad_mode), e) for e in elements[i : i + step]])
        for i in range(0, len(elements), step)
    ]  # fmt: skip
    predict_batch(model, batches[0], {})  # build / warm the model once

    def predict_only() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for x in batches:
            predict_batch(model, x, {})
        return time.perf_counter() - t0, time.process_time() - c0

    def stitched() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loader.predict_scan(model, scan, image, {}, mask)
        return time.perf_counter() - t0, time.process_time() - c0

    # Interleaved (predict, stitch, predict, ...): load from other processes hits both alike.
    pairs = [(predict_only(), stitched()) for _ in range(repeats)]
    batches.clear()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    output = loader.predict_scan(model, scan, image, {}, mask)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return Measured(
        predict_s=min(p[0] for p, _ in pairs),
        total_s=min(s[0] for _, s in pairs),
        extra_cpu_s=float(np.median([s[1] - p[1] for p, s in pairs])),
        windows=len(elements),
        peak_mib=peak / 2**20,
        output_mib=output.nbytes / 2**20,
    )

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
        predict_s, total_s, windows, peak, out_mb = _measure(main, model, scan, image, mask, repeats=3)
        o_predict, o_total, o_windows, o_peak, _ = _measure(loaders[overlap], model, scan, image, mask, 2)
    finally:
        for loader in loaders.values():
            loader.close()
    stride_text = "x".join(map(str, overlap))
    return [
        Row(SECTION, "model predict alone", predict_s, "s", note=f"{windows} windows, scan {scan.shape}"),
        Row(SECTION, "inference with stitching", total_s, "s", predict_s * 1.10, "1.1x predict",
            "<= 10% over predict", 1.0, higher_is_better=False,
            note=f"{(total_s / predict_s - 1) * 100:.0f}% over predict"),
        Row(SECTION, "peak memory of stitching", peak / 2**20, "MiB", 1.5 * out_mb, "1.5x one scan's output",
            "<= 1.5x one scan's output", 1.0, higher_is_better=False,
            note=f"{peak / 2**20 / out_mb:.2f}x the {out_mb:.0f} MiB float32 output"),
        Row(SECTION, f"overlapping grid (stride {stride_text}): inference with stitching", o_total, "s",
            o_predict, "predict alone", higher_is_better=False,
            note=f"{o_windows} windows; {(o_total / o_predict - 1) * 100:.0f}% over predict (information)"),
        Row(SECTION, f"overlapping grid (stride {stride_text}): peak memory", o_peak / 2**20, "MiB",
            out_mb, "one scan's output", higher_is_better=False,
            note=f"{o_peak / 2**20 / out_mb:.2f}x the output (information)"),
    ]  # fmt: skip


def _measure(
    loader: Any, model: Any, scan: Any, image: np.ndarray, mask: np.ndarray, repeats: int
) -> tuple[float, float, int, int, float]:
    """(predict alone s, predict_scan s, windows, traced peak bytes, output MiB) for one loader."""
    from loaders.inference import predict_batch
    from loaders.scans import cut_window

    elements = list(loader.inference_elements(scan))
    step = loader.batch_size
    batches = [
        np.stack(
            [
                loader.model_input(cut_window(image, e.window, loader.pad_mode), e)
                for e in elements[i : i + step]
            ]
        )
        for i in range(0, len(elements), step)
    ]
    predict_batch(model, batches[0], {})  # build / warm the model once

    def predict_only() -> float:
        t0 = time.perf_counter()
        for x in batches:
            predict_batch(model, x, {})
        return time.perf_counter() - t0

    def stitched() -> float:
        t0 = time.perf_counter()
        loader.predict_scan(model, scan, image, {}, mask)
        return time.perf_counter() - t0

    predict_times, stitch_times = [], []
    for _ in range(repeats):  # interleaved: load from other processes hits both alike
        predict_times.append(predict_only())
        stitch_times.append(stitched())
    batches.clear()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    output = loader.predict_scan(model, scan, image, {}, mask)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return min(predict_times), min(stitch_times), len(elements), peak, output.nbytes / 2**20

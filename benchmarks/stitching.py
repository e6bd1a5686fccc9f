"""Inference stitching: the loader's per-scan inference time over the model's own predict time,
and the peak memory of stitching against one scan's output.

The model is a small real Keras 3D network (two convolutions); the scan is read once up front so
that only windowing, prediction and blending are timed. Peak memory is traced with
``tracemalloc`` (numpy reports its buffers to it; the backend's own tensors are not counted,
they are the model's business, not stitching's).
"""

from __future__ import annotations

import inspect
import os
import time
import tracemalloc

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
    from loaders.base import cut_window, predict_batch

    patch = (64, 64, 32)
    cfg = Config(TAG="PatchDataLoader", CATEGORIES=list(CATEGORIES), INCLUDE_BACKGROUND=True,
                 IMG_SIZE=(*patch, 1), SEED=0)  # fmt: skip
    DatasetCatalog.register("bench-stitch", str(data.store))
    try:
        loader = build_loader(cfg, "bench-stitch", batch_size=8, is_test=True, shuffle=False, drop_last=False)
    finally:
        DatasetCatalog.remove("bench-stitch")
    scan = loader.scans[0]
    model = tiny_model(patch, cfg.get_num_classes())
    image = scan.source.read_image(scan.scan_id).astype(np.float32)
    # predict_scan's signature has changed while the loaders were written: pass what it takes
    extra = {}
    mask_param = inspect.signature(loader.predict_scan).parameters.get("mask")
    if mask_param is not None and mask_param.default is inspect.Parameter.empty:
        extra["mask"] = scan.source.read_mask(scan.scan_id, None, scan.categories, True).astype(np.float32)
    elements = list(loader.inference_elements(scan))
    batches = [
        np.stack(
            [loader.model_input(cut_window(image, e.window, loader.pad_mode), e) for e in elements[i : i + 8]]
        )
        for i in range(0, len(elements), 8)
    ]
    predict_batch(model, batches[0], {})  # build / warm the model once

    def predict_only() -> float:
        t0 = time.perf_counter()
        for x in batches:
            predict_batch(model, x, {})
        return time.perf_counter() - t0

    def stitched() -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = loader.predict_scan(model, scan, image, predict_kwargs={}, **extra)
        return time.perf_counter() - t0, out

    predict_s = min(predict_only() for _ in range(2))
    total_s, output = min((stitched() for _ in range(2)), key=lambda r: r[0])
    batches.clear()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result = loader.predict_scan(model, scan, image, predict_kwargs={}, **extra)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    loader.close()
    out_mb = output.nbytes / 2**20
    del result
    return [
        Row(SECTION, "model predict alone", predict_s, "s", note=f"{len(elements)} windows, scan {scan.shape}"),
        Row(SECTION, "inference with stitching", total_s, "s", predict_s * 1.10, "1.1x predict",
            "<= 10% over predict", 1.0, higher_is_better=False,
            note=f"{(total_s / predict_s - 1) * 100:.0f}% over predict"),
        Row(SECTION, "peak memory of stitching", peak / 2**20, "MiB", 1.5 * out_mb, "1.5x one scan's output",
            "<= 1.5x one scan's output", 1.0, higher_is_better=False,
            note=f"{peak / 2**20 / out_mb:.2f}x the {out_mb:.0f} MiB float32 output"),
    ]  # fmt: skip

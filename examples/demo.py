"""``make demo``: the whole path on built-in sample data, end to end.

sample data -> Dask preprocessing job -> ``scancache serve`` on loopback -> a small Keras U-Net
trained from the server with MedSegPy's API -> ``write_predictions`` (per-scan inference into a
predictions store, with per-class Dice) -> a PNG preview of a test slice with the prediction
overlaid -> the command that serves the store with its predictions and the viewer.

It imports Keras, the loaders and the service, so it lives outside all three and needs the
``[all]`` extra (``make demo`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# The phantoms' four tissue shells, innermost first (service/sample_data.py), named for the
# store (``--class-names``) so CATEGORIES, predictions and Dice speak of tissues, not numbers.
CLASS_NAMES = ("inner shell", "second shell", "third shell", "outer shell")


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scancache_command() -> str:
    """The ``scancache`` executable beside this Python (the virtual environment's), by its full
    path: the printed line works without activating the environment."""
    exe = Path(sys.executable).parent / "scancache"
    return shlex.quote(str(exe)) if exe.exists() else f"{shlex.quote(sys.executable)} -m service.cli"


@contextlib.contextmanager
def running_server(store: Path, port: int) -> Iterator[str]:
    """``scancache serve`` in a subprocess, exactly as a user starts it; stopped on exit."""
    import httpx

    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        str(store),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise SystemExit(f"[demo] the server did not start: {err.strip().splitlines()[-1:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("[demo] the server did not answer /health within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def conv_block(x, width: int):  # type: ignore[no-untyped-def]
    """Two 3x3 conv -> batchnorm -> ReLU. Batchnorm lets a high learning rate train the net in
    a few hundred steps; momentum 0.9 (not 0.99) so the inference statistics catch up with the
    training ones within such a short run."""
    from keras import layers

    for _ in range(2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
    return x


def tiny_unet(input_shape: tuple[int, int, int], num_outputs: int, width: int = 8):  # type: ignore[no-untyped-def]
    """A two-level U-Net: enough to learn the phantoms' shells in a few steps."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape)
    c1 = conv_block(inputs, width)
    c2 = conv_block(layers.MaxPooling2D(2)(c1), width * 2)
    m1 = layers.Concatenate()([layers.UpSampling2D(2)(c2), c1])
    c3 = conv_block(m1, width)
    outputs = layers.Conv2D(num_outputs, 1, activation="softmax")(c3)
    return keras.Model(inputs, outputs, name="tiny_unet")


def dice_ce_loss(y_true, y_pred):  # type: ignore[no-untyped-def]
    """Cross-entropy plus soft Dice of the foreground channels: each class is ~1% of the voxels
    (thin shells, like cartilage), and cross-entropy alone settles on all-background."""
    from keras import ops

    fg_true, fg_pred = y_true[..., 1:], y_pred[..., 1:]
    inter = ops.sum(fg_true * fg_pred, axis=(0, 1, 2))
    total = ops.sum(fg_true + fg_pred, axis=(0, 1, 2))
    soft_dice = ops.mean((2.0 * inter + 1.0) / (total + 1.0))
    return ops.mean(ops.categorical_crossentropy(y_true, y_pred)) + 1.0 - soft_dice


def save_preview(store: Path, predictions: Path, scan_id: str, path: Path) -> Path:
    """Slice z = D/2 of ``scan_id`` with its stored prediction overlaid, as a PNG (what
    ``GET /scans/{scan_id}/preview.png?overlay=prediction`` serves)."""
    from service import preview
    from store.predictions import LABEL_MAP, PredictionStore
    from store.source import LocalSource

    source, preds = LocalSource(store), PredictionStore(predictions)
    meta, attrs = source.metadata(scan_id), preds.attrs(scan_id)
    if attrs is None:
        raise ValueError(f"scan {scan_id!r} has no prediction in {predictions}")
    region = preview.plane_region(meta.shape, "z", meta.shape[2] // 2)
    plane = preview.take_plane(source.read_image(scan_id, region), "z")
    labels = preview.take_plane(preds.read(scan_id, LABEL_MAP, region), "z")
    categories = int(attrs["channels"]) - int(bool(attrs["include_background"]))
    window = preview.default_window(meta.attrs.get("intensity"), plane)
    png = preview.render_png(plane, window, preview.labels_to_classes(labels, categories), scale=2)
    path.write_bytes(png)
    source.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--out", default="demo-output", help="folder for data, store and outputs")
    parser.add_argument("--quick", action="store_true", help="CI size: smaller data, fewer steps")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)

    from loaders import Config, DatasetCatalog, build_loader, write_predictions
    from loaders.backend import import_keras
    from service.preprocess import run_preprocess
    from service.sample_data import write_sample_data

    keras = import_keras()  # the backend chosen first (a torch-only machine works too)

    out = Path(args.out).resolve()
    # predictions.zarr: older demos wrote .npy files to predictions/, which is not a store
    source, store, preds = out / "source", out / "store", out / "predictions.zarr"
    shape = (64, 64, 12) if args.quick else (128, 128, 24)
    epochs = args.epochs or (10 if args.quick else 8)
    batch_size = 4  # more, smaller steps: the net sees each slice every epoch either way
    started = time.perf_counter()

    say(f"1/5 writing sample data (knee-like phantoms {shape}) to {source}")
    # 6 subjects: 4 to train on (2 visits each), 1 to validate, 1 to test, none shared
    params = {"subjects": 6, "visits": 2, "shape": list(shape), "num_classes": 4, "seed": 0}
    stamp = source / ".demo-sample-data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        say("    already there (a re-run reuses it, so the job below skips every scan)")
    else:
        write_sample_data(source, subjects=6, visits=2, shape=shape, num_classes=4, fmt="2d", seed=0)
        stamp.write_text(json.dumps(params))

    say(f"2/5 preprocessing with Dask into {store}")
    summary = run_preprocess(source, store, workers=2, progress=sys.stderr.isatty(), class_names=CLASS_NAMES)
    say(f"    {summary}")
    if getattr(summary, "failed", 0):
        say("preprocessing reported failures; see above")
        return 1

    port = free_port()
    say(f"3/5 serving the store on http://127.0.0.1:{port}")
    with running_server(store, port) as url:
        for name, split in (("demo_train", "train"), ("demo_val", "valid"), ("demo_test", "test")):
            DatasetCatalog.register(name, url, split=split)
        cfg = Config()
        cfg.TAG = "DefaultDataLoader"
        cfg.TRAIN_DATASET, cfg.VAL_DATASET, cfg.TEST_DATASET = "demo_train", "demo_val", "demo_test"
        cfg.CATEGORIES = CLASS_NAMES  # by name (the store records them); (0, 1, 2, 3) is the same
        cfg.INCLUDE_BACKGROUND = True
        cfg.IMG_SIZE = (shape[0], shape[1], 1)
        cfg.SEED = 0  # the same shuffles, weights and so Dice on every run
        train = build_loader(
            cfg, cfg.TRAIN_DATASET, batch_size=batch_size, is_test=False, shuffle=True, drop_last=True
        )
        val = build_loader(
            cfg, cfg.VAL_DATASET, batch_size=batch_size, is_test=False, shuffle=False, drop_last=False
        )
        test = build_loader(
            cfg, cfg.TEST_DATASET, batch_size=batch_size, is_test=True, shuffle=False, drop_last=False
        )

        keras.utils.set_random_seed(cfg.SEED)
        model = tiny_unet(cfg.IMG_SIZE, len(cfg.CATEGORIES) + 1)
        # a high rate early finds the shells fast; decaying it lets the short run settle
        schedule = keras.optimizers.schedules.CosineDecay(1e-2, len(train) * epochs, alpha=0.05)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=dice_ce_loss)
        say(f"4/5 training a small U-Net from the server: {len(train)} batches x {epochs} epochs")
        # The loader shuffles slices every epoch from cfg.SEED; Keras' own batch-order shuffle
        # draws from Python's global `random`, which other code in the process also draws from
        # (e.g. the HTTP client's retry jitter), and would make runs differ under load.
        history = model.fit(train, validation_data=val, epochs=epochs, shuffle=False, verbose=2)
        losses = history.history["loss"]
        say(f"    loss {losses[0]:.4f} -> {losses[-1]:.4f}")

        say(f"5/5 per-scan inference (stitched from slices) into the predictions store {preds}")
        # this run trained a new model: redo every scan rather than keep an earlier run's
        written = write_predictions(test, model, preds, overwrite=True, verbose=0)
        say(f"    {written}")
        rows: list[dict[str, Any]] = [
            {"scan_id": scan_id, "dice": {name: round(float(d), 4) for name, d in (scores or {}).items()}}
            for scan_id, scores in written.dice_by_class().items()
        ]
    print("Dice per scan and class:")
    print("scan".ljust(20) + "".join(name.rjust(20) for name in CLASS_NAMES))
    table = [[row["dice"][name] for name in CLASS_NAMES] for row in rows]
    for row, scores in zip(rows, table, strict=True):
        print(row["scan_id"].ljust(20) + "".join(f"{d:20.3f}" for d in scores))
    if rows:
        print("mean".ljust(20) + "".join(f"{d:20.3f}" for d in np.mean(table, axis=0)))
    (out / "dice.json").write_text(json.dumps(rows, indent=2))
    if rows:
        shown = save_preview(store, preds, rows[0]["scan_id"], out / "preview.png")
        say(f"preview of {rows[0]['scan_id']} (middle slice, prediction overlaid): {shown}")
    say(f"predictions: {preds}   dice: {out / 'dice.json'}   store: {store}")
    say(f"done in {time.perf_counter() - started:.0f} s; the demo's server is stopped. To look at it all:")
    print(
        f"    {scancache_command()} serve {shlex.quote(str(store))} --predictions {shlex.quote(str(preds))} --port 8000"
    )
    print("    then open http://127.0.0.1:8000/viewer in a browser", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

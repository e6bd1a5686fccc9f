"""A tiny Keras U-Net trains from a real server through the MedSegPy-style API; its loss falls."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from live_server import live_server

from loaders import Config, DatasetCatalog, build_loader
from store.writer import write_scan


def disc_scan(seed, shape=(32, 32, 8)):
    """Bright discs of varying centre and radius on noise: an easy, learnable segmentation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
    mask = np.zeros((*shape, 1), dtype=np.uint8)
    for z in range(shape[2]):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disc, z] += 1.0
        mask[disc, z, 0] = 1
    return image, mask


def tiny_unet(classes=2):
    inputs = keras.Input((32, 32, 1))
    c1 = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    down = keras.layers.MaxPooling2D()(c1)
    c2 = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(down)
    up = keras.layers.UpSampling2D()(c2)
    merged = keras.layers.Concatenate()([up, c1])
    c3 = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(merged)
    outputs = keras.layers.Conv2D(classes, 1, activation="softmax")(c3)
    return keras.Model(inputs, outputs)


@pytest.mark.slow
def test_tiny_unet_trains_from_a_remote_store(tmp_path):
    root = tmp_path / "store"
    for i, split in enumerate(["train", "train", "train", "valid"]):
        image, mask = disc_scan(i)
        write_scan(root, f"000010{i}_V00-Aug00", image, mask, {"split": split, "subject_id": 100 + i})
    with live_server(root) as url:
        DatasetCatalog.remove("disc_train")
        DatasetCatalog.remove("disc_val")
        DatasetCatalog.register("disc_train", url, split="train")
        DatasetCatalog.register("disc_val", url, split="valid")
        cfg = Config(
            TRAIN_DATASET="disc_train",
            VAL_DATASET="disc_val",
            CATEGORIES=(0,),
            INCLUDE_BACKGROUND=True,
            IMG_SIZE=(32, 32, 1),
            SEED=0,
            NUM_WORKERS=2,
        )
        train = build_loader(
            cfg, cfg.TRAIN_DATASET, batch_size=4, is_test=False, shuffle=True, drop_last=True
        )
        val = build_loader(cfg, cfg.VAL_DATASET, batch_size=4, is_test=False, shuffle=False, drop_last=False)
        keras.utils.set_random_seed(0)
        model = tiny_unet(cfg.get_num_classes())
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
        # As users write it: Keras' default shuffle=True; the loader serves its own order from SEED.
        history = model.fit(train, validation_data=val, epochs=3, verbose=0)
        losses = history.history["loss"]
        assert len(losses) == 3 and all(np.isfinite(losses))
        assert losses[-1] < 0.8 * losses[0], losses
        assert np.isfinite(history.history["val_loss"]).all()

        test = build_loader(cfg, cfg.VAL_DATASET, batch_size=4, is_test=True, shuffle=False, drop_last=False)
        ((_inputs, outputs),) = list(test.inference(model))
        assert outputs["y_pred"].shape == outputs["y_true"].shape == (32, 32, 8, 2)
        predicted = outputs["y_pred"].argmax(-1) == 1
        truth = outputs["y_true"][..., 1] == 1
        dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
        assert dice > 0.5, dice
        train.close()
        val.close()
        DatasetCatalog.remove("disc_train")
        DatasetCatalog.remove("disc_val")

"""Scans of several image channels (``image``, ``image_c1``, ...) through every loader, locally
and over a real server: x carries the channels last, exactly as numpy cuts them from the
volumes the store was written from."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from live_server import live_server

from client.http import HttpSource
from loaders import Config, DatasetCatalog, build_loader
from loaders.scans import scan_requests
from store.errors import ArrayNotFound
from store.source import LocalSource
from store.writer import write_scan

K = 3
CATS = (0, (1, 2))
# scan_id, shape, dtype, channels
SCANS = [
    ("mc1", (20, 18, 11), np.float32, K),
    ("mc2", (20, 18, 9), np.int16, K),
    ("single", (20, 18, 6), np.float32, 1),
]


def channel_volumes(shape, dtype, channels, seed):
    """Channels with distinct values: channel k lies in [1000 k, 1000 k + 500); integer-valued
    floats, so sums of channels are exact in float32 whatever the order of additions."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 500, size=shape) + 1000 * k).astype(dtype) for k in range(channels)]


@pytest.fixture(scope="module")
def mc_store(tmp_path_factory):
    """(root, {scan_id: ((H, W, D, K) float64 image, (H, W, D, 3) mask)})."""
    root = tmp_path_factory.mktemp("multichannel") / "store"
    truth = {}
    for seed, (scan_id, shape, dtype, channels) in enumerate(SCANS):
        volumes = channel_volumes(shape, dtype, channels, seed)
        labels = np.random.default_rng(seed + 10).integers(-1, 3, size=shape)
        mask = np.stack([labels == c for c in range(3)], axis=-1).astype(np.uint8)
        split = "train" if channels == K else "other"
        write_scan(root, scan_id, volumes[0], mask, {"split": split}, extra_channels=volumes[1:])
        truth[scan_id] = (np.stack(volumes, axis=-1).astype(np.float64), mask)
    return root, truth


@pytest.fixture(scope="module")
def names(mc_store):
    root, _ = mc_store
    with live_server(root) as url:
        registered = {"local": "mc_local", "http": "mc_http"}
        for where, location in (("local", str(root)), ("http", url)):
            DatasetCatalog.remove(registered[where])
            DatasetCatalog.register(registered[where], location, split="train")
        DatasetCatalog.remove("mc_mixed")
        DatasetCatalog.register("mc_mixed", str(root), scan_id=["mc1", "single"])
        yield {**registered, "url": url}
        for name in (*registered.values(), "mc_mixed"):
            DatasetCatalog.remove(name)


def reference_mask(mask):
    out = np.stack([mask[..., 0], mask[..., 1] + mask[..., 2]], axis=-1)
    return out.astype(np.float32)


def padded_cut(volume, window, mode):
    """``np.pad`` the whole volume enough, then cut the window (trailing axes whole)."""
    pads = [(max(0, -a), max(0, b - n)) for (a, b), n in zip(window, volume.shape[:3], strict=True)]
    pads += [(0, 0)] * (volume.ndim - 3)
    padded = np.pad(volume, pads, mode=mode)
    return padded[tuple(slice(a + p[0], b + p[0]) for (a, b), p in zip(window, pads, strict=False))]


def cfg(**kw):
    return Config(SEED=3, CATEGORIES=CATS, **kw)


def every_batch(loader):
    for b in range(len(loader)):
        yield loader.batch_elements(b), loader[b]


# -- sources: each channel array readable, locally and over HTTP --------------------------------
def test_sources_read_each_channel(mc_store, names):
    root, truth = mc_store
    image = truth["mc1"][0]
    local, remote = LocalSource(root), HttpSource(names["url"])
    try:
        for source in (local, remote):
            assert source.metadata("mc1").channels == K and source.metadata("single").channels == 1
            for k in range(K):
                np.testing.assert_array_equal(
                    source.read_image("mc1", "2:9,:,3:5", channel=k), image[2:9, :, 3:5, k]
                )
            with pytest.raises(ArrayNotFound, match="no image channel 3"):
                source.read_image("mc1", channel=3)
            with pytest.raises(ArrayNotFound, match="'single' has no image channel 1"):
                source.read_image("single", channel=1)
        got = httpx.get(f"{names['url']}/scans/mc1/image", params={"roi": "0:4,0:5,1", "channel": 2})
        assert got.status_code == 200
        np.testing.assert_array_equal(np.load(io.BytesIO(got.content)), image[0:4, 0:5, 1:2, 2])
        refused = httpx.get(f"{names['url']}/scans/mc1/image", params={"channel": 5})
        assert (
            refused.status_code == 404
            and "no image channel 5" in refused.text
            and str(root) not in refused.text
        )
    finally:
        remote.close()


def test_one_read_names_every_channel_with_the_same_region(names):
    loader = build_loader(cfg(), names["local"], 2, False, False, False)
    roi = (slice(0, 5), slice(0, 5), slice(2, 4))
    requests = [r for _, r in scan_requests(loader.scans[0], roi, roi, False)]
    assert [r.array for r in requests] == ["image", "image_c1", "image_c2", "mask"]
    assert all(r.roi == roi for r in requests)


# -- loaders: exact against numpy --------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("blocks", [16, 0])
def test_2d_epoch_gives_every_channel(mc_store, names, where, blocks):
    _, truth = mc_store
    loader = build_loader(cfg(SHUFFLE_BLOCKS=blocks), names[where], 4, False, True, False)
    seen = 0
    for elements, (x, y) in every_batch(loader):
        assert x.shape[1:] == (*x.shape[1:3], K) and x.dtype == np.float32
        for i, e in enumerate(elements):
            image, mask = truth[loader.scans[e.scan].scan_id]
            z = e.window[2][0]
            np.testing.assert_array_equal(x[i], image[:, :, z, :].astype(np.float32))
            np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]))
            seen += 1
    assert seen == 11 + 9


@pytest.mark.parametrize("where", ["local", "http"])
def test_25d_stacks_slices_by_channels(mc_store, names, where):
    _, truth = mc_store
    loader = build_loader(
        cfg(TAG="S25dDataLoader", IMG_SIZE=(20, 18, 3), IMG_PAD_MODE="reflect"),
        names[where],
        5,
        False,
        True,
        False,
    )
    for elements, (x, y) in every_batch(loader):
        assert x.shape[-1] == 3 * K
        for i, e in enumerate(elements):
            image, mask = truth[loader.scans[e.scan].scan_id]
            z = e.output_window[2][0]
            depth = image.shape[2]
            for s in range(3):  # channel s * K + c: slice z - 1 + s (reflected), image channel c
                zz = z - 1 + s
                zz = -zz if zz < 0 else (2 * depth - 2 - zz if zz >= depth else zz)
                for c in range(K):
                    np.testing.assert_array_equal(
                        x[i, :, :, s * K + c], image[:, :, zz, c].astype(np.float32)
                    )
            np.testing.assert_array_equal(y[i], reference_mask(mask[:, :, z]))


@pytest.mark.parametrize("where", ["local", "http"])
def test_grid_patches_carry_the_channels(mc_store, names, where):
    _, truth = mc_store
    config = cfg(
        TAG="PatchDataLoader",
        IMG_SIZE=(8, 8, 4, K),
        IMG_STRIDE=(6, 7, 3),
        IMG_PAD_SIZE=1,
        IMG_PAD_MODE="constant",
    )
    loader = build_loader(config, names[where], 6, True, False, False)
    count = 0
    for elements, (x, y, _) in every_batch(loader):
        assert x.shape[1:] == (8, 8, 4, K)
        for i, e in enumerate(elements):
            image, mask = truth[loader.scans[e.scan].scan_id]
            np.testing.assert_array_equal(x[i], padded_cut(image, e.window, "constant").astype(np.float32))
            np.testing.assert_array_equal(y[i], padded_cut(reference_mask(mask), e.window, "constant"))
            count += 1
    assert count == len(loader.grid(loader.scans[0])) + len(loader.grid(loader.scans[1]))


@pytest.mark.parametrize("where", ["local", "http"])
def test_random_patches_carry_the_channels(mc_store, names, where):
    _, truth = mc_store
    config = cfg(
        TAG="RandomPatchDataLoader",
        IMG_SIZE=(8, 8, 4, K),
        PATCHES_PER_SCAN=5,
        FOREGROUND_RATIO=0.5,
        IMG_PAD_MODE="edge",
    )
    loader = build_loader(config, names[where], 4, False, True, False)
    for _epoch in range(2):
        for elements, (x, y) in every_batch(loader):
            for i, e in enumerate(elements):
                image, mask = truth[loader.scans[e.scan].scan_id]
                np.testing.assert_array_equal(x[i], padded_cut(image, e.window, "edge").astype(np.float32))
                np.testing.assert_array_equal(y[i], padded_cut(reference_mask(mask), e.window, "edge"))
        loader.on_epoch_end()


def test_local_and_http_batches_are_identical(names):
    loaders = [
        build_loader(cfg(TAG="S25dDataLoader", IMG_SIZE=(20, 18, 3)), names[w], 3, False, True, True)
        for w in ("local", "http")
    ]
    for b in range(len(loaders[0])):
        for a, r in zip(loaders[0][b], loaders[1][b], strict=True):
            np.testing.assert_array_equal(a, r)


# -- adapters and inference ---------------------------------------------------------------------
def test_torch_channels_first_gives_k_channels_first(names):
    torch = pytest.importorskip("torch")
    loader = build_loader(cfg(), names["local"], 4, False, False, False)
    expected = [loader[b] for b in range(len(loader))]
    loader.set_epoch(0)
    got = list(torch.utils.data.DataLoader(loader.as_torch_dataset(channels_first=True), batch_size=None))
    assert len(got) == len(expected)
    for (x, y), (x_ref, y_ref) in zip(got, expected, strict=True):
        assert tuple(x.shape) == (x_ref.shape[0], K, *x_ref.shape[1:3])
        np.testing.assert_array_equal(x.numpy(), np.moveaxis(x_ref, -1, 1))
        np.testing.assert_array_equal(y.numpy(), np.moveaxis(y_ref, -1, 1))


def test_tf_dataset_spec_has_k_channels(names):
    loader = build_loader(cfg(), names["local"], 4, False, False, True)
    dataset = loader.as_tf_dataset()
    assert tuple(dataset.element_spec[0].shape) == (4, 20, 18, K)
    x, _ = next(iter(dataset))
    np.testing.assert_array_equal(x.numpy(), loader[0][0])


def test_inference_of_a_keras_model_summing_channels(mc_store, names):
    from loaders.base import keras

    _, truth = mc_store
    inputs = keras.Input((8, 8, 4, K))
    outputs = keras.layers.Lambda(
        lambda t: keras.ops.sum(t, axis=-1, keepdims=True), output_shape=(8, 8, 4, 1)
    )(inputs)
    model = keras.Model(inputs, outputs)
    config = cfg(TAG="PatchDataLoader", IMG_SIZE=(8, 8, 4, K), IMG_STRIDE=(5, 6, 3), IMG_PAD_MODE="reflect")
    loader = build_loader(config, names["http"], 5, True, False, False)
    results = list(loader.inference(model))
    assert [i["scan_id"] for i, _ in results] == ["mc1", "mc2"]
    for inputs_, outputs_ in results:
        image, mask = truth[inputs_["scan_id"]]
        np.testing.assert_array_equal(inputs_["x"], image.astype(np.float32))
        assert outputs_["y_pred"].shape == (*image.shape[:3], 1)
        np.testing.assert_array_equal(outputs_["y_pred"][..., 0], image.sum(-1).astype(np.float32))
        np.testing.assert_array_equal(outputs_["y_true"], reference_mask(mask))


def test_inference_of_2d_slices_with_channels(mc_store, names):
    _, truth = mc_store
    loader = build_loader(cfg(), names["local"], 4, True, False, False)
    for inputs_, outputs_ in loader.inference(lambda x: x[..., :1] - x[..., 2:3]):
        image, _ = truth[inputs_["scan_id"]]
        np.testing.assert_array_equal(
            outputs_["y_pred"][..., 0], (image[..., 0] - image[..., 2]).astype(np.float32)
        )


# -- one K per loader, and IMG_SIZE names it ------------------------------------------------------
def test_scans_of_different_channels_are_refused_in_one_line(names):
    with pytest.raises(
        ValueError, match=r"scan 'single' has 1 image channel\(s\), but scan 'mc1' has 3"
    ) as err:
        build_loader(cfg(), "mc_mixed", 2, False, False, False)
    assert "\n" not in str(err.value)


def test_img_size_must_name_the_channels(names):
    with pytest.raises(ValueError, match=r"has 3 image channel\(s\); use IMG_SIZE \(8, 8, 4, 3\)"):
        build_loader(
            cfg(TAG="PatchDataLoader", IMG_SIZE=(8, 8, 4, 1)), names["local"], 2, False, False, False
        )
    with pytest.raises(ValueError, match=r"use IMG_SIZE \(8, 8, 4, 3\)"):
        build_loader(cfg(TAG="PatchDataLoader", IMG_SIZE=(8, 8, 4)), names["local"], 2, False, False, False)


def test_a_small_server_byte_limit_reads_channels_in_slabs(mc_store):
    """Blocks and whole-scan inference reads of every channel halve below --max-bytes."""
    root, truth = mc_store
    slice_bytes = 20 * 18 * 4
    with live_server(root, max_bytes=3 * slice_bytes) as url:
        DatasetCatalog.remove("mc_tight")
        DatasetCatalog.register("mc_tight", url, split="train")
        try:
            loader = build_loader(cfg(), "mc_tight", 4, True, True, False)
            for elements, (x, _, _) in every_batch(loader):
                for i, e in enumerate(elements):
                    image = truth[loader.scans[e.scan].scan_id][0]
                    np.testing.assert_array_equal(x[i], image[:, :, e.window[2][0], :].astype(np.float32))
            for inputs_, outputs_ in loader.inference(lambda x: x[..., 1:2]):
                image = truth[inputs_["scan_id"]][0]
                np.testing.assert_array_equal(inputs_["x"], image.astype(np.float32))
                np.testing.assert_array_equal(outputs_["y_pred"][..., 0], image[..., 1].astype(np.float32))
        finally:
            DatasetCatalog.remove("mc_tight")


def test_torch_worker_processes_give_the_channels(mc_store, names):
    torch = pytest.importorskip("torch")
    _, truth = mc_store
    loader = build_loader(
        cfg(TAG="PatchDataLoader", IMG_SIZE=(8, 8, 4, K)), names["local"], 4, False, True, False
    )
    ds = loader.as_torch_dataset(channels_first=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="forkserver")
    got = list(dl)
    assert len(got) == len(loader)
    for (x, _), b in zip(got, range(len(loader)), strict=True):
        assert tuple(x.shape[1:]) == (K, 8, 8, 4)
        for i, e in enumerate(loader.batch_elements(b)):
            image = truth[loader.scans[e.scan].scan_id][0]
            np.testing.assert_array_equal(
                x[i].numpy(), np.moveaxis(padded_cut(image, e.window, "edge"), -1, 0)
            )


def test_25d_window_given_as_slices_times_channels_says_what_k_is(names):
    """With K image channels, an even IMG_SIZE[-1] = 2 * K (a count of x's channels) is no
    window: the one line says that it counts slices, not x's channels."""
    with pytest.raises(ValueError) as err:
        build_loader(
            cfg(TAG="S25dDataLoader", IMG_SIZE=(20, 18, 2 * K)), names["local"], 5, False, True, False
        )
    text = str(err.value)
    assert "\n" not in text and text.startswith("IMG_SIZE[-1]: the number of 2.5D slices must be odd")
    assert f"it counts the window's slices, not x's channels (k slices of {K} image channels" in text

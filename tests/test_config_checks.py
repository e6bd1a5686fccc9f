"""Issue 21 item 7: a wrong setting fails where it enters, in one line naming the field and value."""

from __future__ import annotations

import numpy as np
import pytest

from loaders import Config, DatasetCatalog, build_loader


@pytest.fixture(scope="module")
def name(small_store):
    root, _ = small_store
    DatasetCatalog.remove("config_checks")
    DatasetCatalog.register("config_checks", str(root), split="train")  # 21 slices
    yield "config_checks"
    DatasetCatalog.remove("config_checks")


def one_line(err, *words):
    text = str(err.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


@pytest.mark.parametrize(
    "field,value",
    [
        ("SEED", -5),
        ("SEED", "abc"),
        ("SEED", 2.5),
        ("SEED", 2**64),
        ("PREFETCH_BATCHES", 0),
        ("PREFETCH_BATCHES", -1),
        ("NUM_WORKERS", 0),
        ("NUM_WORKERS", "2"),
        ("INCLUDE_BACKGROUND", "no"),
        ("INCLUDE_BACKGROUND", 2),
        ("PATCHES_PER_SCAN", 0),
        ("FOREGROUND_RATIO", 1.5),
        ("SHUFFLE_BLOCKS", -1),
        ("Y_DTYPE", "int64"),
        ("IMG_PAD_MODE", "mirror"),
        ("IMG_SIZE", "288"),
        ("IMG_SIZE", ()),
    ],
)
def test_a_bad_field_is_refused_when_set_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        Config(**{field: value})
    one_line(err, field, repr(value))
    cfg = Config()
    with pytest.raises(ValueError) as err:
        setattr(cfg, field, value)
    one_line(err, field, repr(value))
    assert getattr(cfg, field) == getattr(Config, field), "a refused value is not kept"


def test_good_values_become_plain_typed_values():
    cfg = Config(
        SEED=np.int64(3),
        IMG_SIZE=[8, 8, np.int32(4), 1],
        IMG_STRIDE=[4, 4, 2],
        IMG_PAD_SIZE=[1, None, 0],
        INCLUDE_BACKGROUND=np.bool_(True),
        NUM_WORKERS=2,
    )
    assert cfg.SEED == 3 and type(cfg.SEED) is int
    assert cfg.IMG_SIZE == (8, 8, 4, 1) and all(type(n) is int for n in cfg.IMG_SIZE)
    assert cfg.IMG_STRIDE == (4, 4, 2) and cfg.IMG_PAD_SIZE == (1, None, 0)
    assert cfg.INCLUDE_BACKGROUND is True and cfg.NUM_WORKERS == 2
    assert Config(SEED=None).SEED is None and Config(IMG_STRIDE=None).IMG_STRIDE == ()


# IMG_SIZE / IMG_STRIDE / IMG_PAD_SIZE of a patch loader, each with a 0 somewhere
PATCH = dict(TAG="PatchDataLoader", SEED=1)


@pytest.mark.parametrize(
    "fields,bad",
    [
        (dict(IMG_SIZE=(0, 8, 4, 1)), "IMG_SIZE"),
        (dict(IMG_SIZE=(8, 8, 0)), "IMG_SIZE"),
        (dict(IMG_SIZE=(8, 8, 4, 1), IMG_STRIDE=0), "IMG_STRIDE"),
        (dict(IMG_SIZE=(8, 8, 4, 1), IMG_STRIDE=(4, 0, 2)), "IMG_STRIDE"),
        (dict(IMG_SIZE=(8, 8, 4, 1), IMG_PAD_SIZE=(-1, 0, 0)), "IMG_PAD_SIZE"),
        (dict(IMG_SIZE=(8, 8, 4, 1), IMG_STRIDE=(4, 4, 2), IMG_PAD_SIZE=0), None),
        (dict(IMG_SIZE=(8, 8, 4, 1), IMG_STRIDE=4, IMG_PAD_SIZE=(0, 1, 0)), None),
    ],
)
def test_patch_grid_with_a_zero(name, fields, bad):
    if bad is None:  # a padding of 0 is no padding: a working loader
        loader = build_loader(Config(**PATCH, **fields), name, 2, False, True, True)
        x, y = loader[0]
        assert x.shape == (2, 8, 8, 4, 1) and y.shape[:4] == (2, 8, 8, 4)
        loader.close()
        return
    with pytest.raises(ValueError) as err:
        Config(**PATCH, **fields)
    one_line(err, bad)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(batch_size="4"), ("batch_size", "'4'")),
        (dict(batch_size=2.5), ("batch_size", "2.5")),
        (dict(batch_size=0), ("batch_size", "0")),
        (dict(batch_size=True), ("batch_size", "True")),
        (dict(batch_size=1000), ("batch_size=1000", "21 examples")),
        (dict(batch_size=8, num_replicas=1000, rank=0), ("num_replicas=1000", "21 examples")),
        (dict(batch_size=8, num_replicas=4, rank=0), ("batch_size=8", "rank 0")),
        (dict(batch_size=2, num_replicas="2", rank=0), ("num_replicas", "'2'")),
        (dict(batch_size=2, num_replicas=2, rank=2), ("rank", "2")),
        (
            dict(batch_size=2, num_replicas=True, rank=0),
            ("num_replicas", "True"),
        ),  # True == 1: not "no sharding"
    ],
)
def test_build_loader_arguments_are_checked_before_the_first_batch(name, kwargs, words):
    with pytest.raises(ValueError) as err:
        build_loader(
            Config(SEED=1, IMG_SIZE=(40, 36, 1)), name, is_test=False, shuffle=True, drop_last=True, **kwargs
        )
    one_line(err, *words)


def test_a_batch_larger_than_the_data_without_drop_last_is_one_batch(name):
    loader = build_loader(Config(SEED=1), name, 1000, is_test=False, shuffle=True, drop_last=False)
    assert len(loader) == 1 and loader[0][0].shape[0] == 21
    loader.close()


def test_too_few_patches_for_a_batch_says_how_many_the_patch_size_gives(name):
    # a patch larger than every scan: one patch a scan (padded), fewer than the batch
    with pytest.raises(ValueError) as err:
        build_loader(
            Config(TAG="PatchDataLoader", IMG_SIZE=(128, 128, 32, 1)),
            name,
            64,
            is_test=False,
            shuffle=False,
            drop_last=True,
        )
    one_line(err, "batch_size=64", "patches of IMG_SIZE (128, 128, 32) in ", " scans)", "drop_last=True")


def test_catalog_and_build_loader_refuse_what_they_cannot_use_where_it_enters():
    """Wrong types and values at register / build_loader are one line there, not a raw
    AttributeError or TypeError at the first read (or in another dataset's error message)."""
    from loaders import DatasetCatalog, build_loader

    cases = [
        (lambda: DatasetCatalog.register("five", 5), TypeError, "dataset 'five': 5 is not a store path"),
        (
            lambda: DatasetCatalog.register(None, "/data/store"),
            TypeError,
            "a dataset's name is a string, got None",
        ),
        (
            lambda: DatasetCatalog.register("", "/data/store"),
            ValueError,
            "a dataset's name is a non-empty string",
        ),
        (
            lambda: DatasetCatalog.register("slow", "http://127.0.0.1:9", timeout=-1),
            ValueError,
            "dataset 'slow': timeout: must be more than 0 seconds, got -1",
        ),
        (
            lambda: build_loader(Config(), 5, 2, False, True, False),
            TypeError,
            "dataset_names: 5 is not a dataset name",
        ),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)
    assert "five" not in DatasetCatalog.list() and "slow" not in DatasetCatalog.list()


def test_a_patch_batch_no_memory_holds_is_refused_naming_img_size(tmp_path, monkeypatch):
    """It built, then failed at the first read with a MemoryError naming neither IMG_SIZE nor
    the scan (or tried to allocate tens of GB)."""
    import loaders.patches
    from store.writer import write_scan

    monkeypatch.setattr(loaders.patches, "memory_bytes", lambda: 16 * 2**30)  # whatever the host has

    root = tmp_path / "store"
    image = np.zeros((16, 16, 4), np.float32)
    write_scan(root, "0000001_V00-Aug00", image, np.ones((16, 16, 4, 1), np.uint8), {"split": "train"})
    DatasetCatalog.register("huge_patches", str(root), split="train")
    try:
        cfg = Config(TAG="PatchDataLoader", IMG_SIZE=(4096, 4096, 512, 1), CATEGORIES=(0,))
        with pytest.raises(ValueError) as info:
            build_loader(cfg, "huge_patches", 2, False, True, False)
        message = str(info.value)
        assert message.startswith("IMG_SIZE (4096, 4096, 512, 1) with batch_size 2: a batch of x and y takes")
        assert "more than half the memory this process may use (16.0 GiB)" in message and "\n" not in message
        cfg.IMG_SIZE = (8, 8, 4, 1)
        fits = build_loader(cfg, "huge_patches", 2, False, True, False)
        assert fits[0][0].shape[1:4] == (8, 8, 4)
        fits.close()
    finally:
        DatasetCatalog.remove("huge_patches")

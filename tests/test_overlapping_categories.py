"""Overlapping categories (BraTS-style regions: whole tumour, tumour core, enhancing): a class
in several categories, each category its own channel of y, locally and over HTTP, equal to the
sums numpy takes of the stored mask's classes."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from live_server import live_server

from loaders import Config, DatasetCatalog, build_loader, close_shared_sources

REGIONS = ((1, 2, 3), (1, 3), (3,))


def _reference(mask: np.ndarray, z: int, background: bool) -> np.ndarray:
    channels = [mask[:, :, z, list(group)].sum(axis=-1) for group in REGIONS]
    if background:
        channels.insert(0, (np.sum(channels, axis=0) == 0).astype(np.uint8))
    return np.stack(channels, axis=-1).astype(np.float32)


@pytest.mark.parametrize("remote", [False, True], ids=["local", "http"])
def test_regions_are_channels_of_y_as_numpy_sums_them(small_store, remote):
    root, truth = small_store
    with live_server(root) as url:
        DatasetCatalog.register("regions", url if remote else str(root), split="train")
        try:
            cfg = Config(TAG="DefaultDataLoader", CATEGORIES=REGIONS, INCLUDE_BACKGROUND=True)
            loader = build_loader(cfg, "regions", 4, False, False, False)
            ys = np.concatenate([loader[b][1] for b in range(len(loader))])
            want = [_reference(truth[scan.scan_id][1], z, True) for scan in loader.scans for z in scan.slices]
            assert ys.shape == (len(want), *want[0].shape)
            np.testing.assert_array_equal(ys, np.stack(want))
            assert ys[..., 1:].max() == 1 and (ys[..., 1] >= ys[..., 3]).all()  # regions nest
        finally:
            DatasetCatalog.remove("regions")
            close_shared_sources()
        # the REST route takes them too
        scan_id = loader.scans[0].scan_id
        body = httpx.get(f"{url}/scans/{scan_id}/mask", params={"categories": "1+2+3,1+3,3"}, timeout=30)
        assert body.status_code == 200, body.text
        got = np.load(io.BytesIO(body.content))
        mask = truth[scan_id][1]
        np.testing.assert_array_equal(
            got, np.stack([mask[..., list(g)].sum(axis=-1) for g in REGIONS], axis=-1).astype(np.uint8)
        )


def test_class_index_y_refuses_overlapping_regions_in_one_line(small_store):
    root, _ = small_store
    DatasetCatalog.register("regions_index", str(root), split="train")
    try:
        cfg = Config(TAG="DefaultDataLoader", CATEGORIES=REGIONS, Y_FORMAT="class_index")
        with pytest.raises(
            ValueError,
            match=r"^Y_FORMAT='class_index' needs CATEGORIES that do not overlap: class \d+ of scan '",
        ):
            build_loader(cfg, "regions_index", 4, False, False, False)  # refused before any read
    finally:
        DatasetCatalog.remove("regions_index")
        close_shared_sources()


def test_predictions_of_regions_score_each_channel_and_label_the_innermost(small_store, tmp_path):
    """Nested regions predicted as sigmoids: Dice per channel from its probability at 0.5 or
    more (a voxel of the enhancing region is in all three), and the label map gives each voxel
    the last region it is in, as nnU-Net's regions_class_order does."""
    import zarr

    from loaders import write_predictions

    root, truth = small_store
    DatasetCatalog.register("regions_pred", str(root), split="train")
    try:
        cfg = Config(TAG="DefaultDataLoader", CATEGORIES=REGIONS, INCLUDE_BACKGROUND=False)
        test = build_loader(cfg, "regions_pred", 4, True, False, False)
        images = np.concatenate([truth[s.scan_id][0].ravel() for s in test.scans])
        cuts = np.quantile(images, [0.3, 0.6, 0.85])  # nested: a brighter voxel is in more regions

        def model(x):  # (N, H, W, 1) -> three sigmoid-like channels
            return np.concatenate([(x > c).astype(np.float32) for c in cuts], axis=-1)

        summary = write_predictions(test, model, tmp_path / "pred", progress=False)
        group = zarr.open_group(str(tmp_path / "pred"), mode="r")
        checked = 0
        for scan in test.scans:
            image, mask = truth[scan.scan_id]
            predicted = [image > c for c in cuts]
            labels = np.zeros(image.shape, np.uint8)
            for k, p in enumerate(predicted):
                labels[p] = k + 1
            np.testing.assert_array_equal(group[scan.scan_id]["label_map"][...], labels)
            if mask is None:
                continue
            regions = [mask[..., list(g)].sum(axis=-1) > 0 for g in REGIONS]
            want = [
                2 * np.count_nonzero(p & t) / (np.count_nonzero(p) + np.count_nonzero(t))
                if np.count_nonzero(p) + np.count_nonzero(t)
                else 1.0
                for p, t in zip(predicted, regions, strict=True)
            ]
            np.testing.assert_allclose(summary.dice[scan.scan_id], want, rtol=1e-12)
            checked += 1
        assert checked >= 2
    finally:
        DatasetCatalog.remove("regions_pred")
        close_shared_sources()

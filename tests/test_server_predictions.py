"""``scancache serve --predictions``: prediction routes, previews and the scan listing's Dice."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import zarr
from live_server import live_server
from PIL import Image
from test_predictions import softmax_model

from loaders import Config, DatasetCatalog, build_loader, write_predictions
from service.cli import build_parser
from store.ome import CLASS_COLORS

WITH_PREDICTION = ["0000001_V00-Aug00", "0000001_V01-Aug00"]


@pytest.fixture(scope="module")
def served(small_store, tmp_path_factory):
    root, truth = small_store
    pred = tmp_path_factory.mktemp("served") / "pred"
    DatasetCatalog.remove("served_train")
    DatasetCatalog.register("served_train", str(root), split="train")
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)
    loader = build_loader(cfg, "served_train", batch_size=4, is_test=True, shuffle=False, drop_last=False)
    write_predictions(loader, softmax_model, pred)
    DatasetCatalog.remove("served_train")
    with live_server(root, predictions=pred) as url:
        yield url, truth, zarr.open_group(str(pred), mode="r")


def png(response):
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def expected_grey(plane, lo, hi):
    g = np.clip(np.rint((plane.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def blend(rgb, where, k):
    out = rgb.astype(np.float32)
    out[where] = 0.5 * out[where] + 0.5 * np.asarray(CLASS_COLORS[k], np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_listing_has_prediction_and_dice_and_filters(served):
    url, _, pred = served
    scans = httpx.get(f"{url}/scans").json()["scans"]
    by_id = {s["scan_id"]: s for s in scans}
    assert len(by_id) == 4
    for scan_id, doc in by_id.items():
        assert doc["has_prediction"] is (scan_id in WITH_PREDICTION)
        expected = pred[scan_id].attrs["prediction"]["dice"] if scan_id in WITH_PREDICTION else None
        assert doc["prediction_dice"] == expected
    yes = httpx.get(f"{url}/scans", params={"has_prediction": "true"}).json()["scans"]
    no = httpx.get(f"{url}/scans", params={"has_prediction": "false", "split": "valid"}).json()["scans"]
    assert [s["scan_id"] for s in yes] == WITH_PREDICTION
    assert [s["scan_id"] for s in no] == ["0000002_V00-Aug00"]
    one = httpx.get(f"{url}/scans/{WITH_PREDICTION[0]}").json()
    assert (
        one["has_prediction"] is True
        and one["prediction_dice"] == by_id[WITH_PREDICTION[0]]["prediction_dice"]
    )


def test_prediction_and_label_map_regions(served):
    url, _, pred = served
    scan_id = WITH_PREDICTION[0]
    r = httpx.get(f"{url}/scans/{scan_id}/prediction", params={"roi": "3:20,-10:,4"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
    got = np.load(io.BytesIO(r.content))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, pred[scan_id]["probabilities"][3:20, -10:, 4:5, :])
    again = httpx.get(
        f"{url}/scans/{scan_id}/prediction",
        params={"roi": "3:20,-10:,4"},
        headers={"If-None-Match": r.headers["etag"]},
    )
    assert again.status_code == 304
    labels = np.load(io.BytesIO(httpx.get(f"{url}/scans/{scan_id}/prediction/label_map").content))
    np.testing.assert_array_equal(labels, pred[scan_id]["label_map"][...])


def test_prediction_errors_are_one_line_4xx(served):
    url, _, _ = served
    none = httpx.get(f"{url}/scans/0000002_V00-Aug00/prediction")
    assert none.status_code == 404 and none.json()["detail"] == "scan '0000002_V00-Aug00' has no prediction"
    assert httpx.get(f"{url}/scans/0009999_V00-Aug00/prediction/label_map").status_code == 404
    bad = httpx.get(f"{url}/scans/{WITH_PREDICTION[0]}/prediction", params={"roi": "0:99"})
    assert bad.status_code == 422 and bad.json()["param"] == "roi"
    # a window wider than the largest float would draw every voxel black: refused
    wide = httpx.get(f"{url}/scans/{WITH_PREDICTION[0]}/preview.png", params={"window": "-1e308,1e308"})
    assert wide.status_code == 422 and wide.json()["param"] == "window", wide.text


def test_limits_and_auth_apply(small_store, served, tmp_path):
    root, _ = small_store
    _, _, pred = served
    pred_path = pred.store.root
    with live_server(root, token="s3cret", max_bytes=1000, predictions=pred_path) as url:
        scan = WITH_PREDICTION[0]
        assert httpx.get(f"{url}/scans/{scan}/prediction").status_code == 401
        assert httpx.get(f"{url}/scans/{scan}/preview.png").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        big = httpx.get(f"{url}/scans/{scan}/prediction", headers=auth)
        assert big.status_code == 413 and "--max-bytes" in big.json()["detail"]
        small = httpx.get(
            f"{url}/scans/{scan}/prediction/label_map", params={"roi": "0:10,0:10,0"}, headers=auth
        )
        assert small.status_code == 200
        page = httpx.get(f"{url}/viewer")  # the page holds no data: no token needed
        assert page.status_code == 200 and "scancache viewer" in page.text
        slash = httpx.get(f"{url}/viewer/", follow_redirects=True)  # a trailing slash: no token either
        assert slash.status_code == 200 and "scancache viewer" in slash.text
        assert httpx.get(f"{url}/viewer/static/viewer.js").status_code == 200
        assert httpx.get(f"{url}/viewer/static/secret.py").status_code == 404


def test_preview_pixels_are_exact(served):
    url, truth, pred = served
    scan_id = WITH_PREDICTION[0]
    image, mask = truth[scan_id]
    lo, hi = 50.0, 150.0
    base = f"{url}/scans/{scan_id}/preview.png"
    plain = png(httpx.get(base, params={"z": 5, "window": f"{lo},{hi}"}))
    np.testing.assert_array_equal(plain, expected_grey(image[:, :, 5], lo, hi))

    with_mask = png(httpx.get(base, params={"z": 5, "window": f"{lo},{hi}", "overlay": "mask"}))
    expected = expected_grey(image[:, :, 5], lo, hi)
    for k in range(mask.shape[-1]):
        expected = blend(expected, mask[:, :, 5, k] > 0, k)
    np.testing.assert_array_equal(with_mask, expected)

    labels = pred[scan_id]["label_map"][7, :, :]  # axis=y: rows x, columns z
    side = png(httpx.get(base, params={"z": 7, "axis": "y", "window": f"{lo},{hi}", "overlay": "prediction"}))
    expected = expected_grey(image[7, :, :], lo, hi)
    for k in range(4):
        expected = blend(expected, labels == k + 1, k)
    np.testing.assert_array_equal(side, expected)

    big = png(httpx.get(base, params={"z": 5, "window": f"{lo},{hi}", "scale": 3}))
    np.testing.assert_array_equal(big, np.repeat(np.repeat(plain, 3, axis=0), 3, axis=1))

    default = png(httpx.get(base, params={"z": 5}))  # window from the stored statistics
    stats = httpx.get(f"{url}/scans/{scan_id}").json()["intensity"]
    lo_d = max(stats["min"], stats["mean"] - 3 * stats["std"])
    hi_d = min(stats["max"], stats["mean"] + 3 * stats["std"])
    np.testing.assert_array_equal(default, expected_grey(image[:, :, 5], lo_d, hi_d))


def test_preview_errors_name_the_parameter(served):
    url, _, _ = served
    base = f"{url}/scans/{WITH_PREDICTION[0]}/preview.png"
    for params, param in (
        ({"z": 12}, "z"),
        ({"z": -1}, "z"),
        ({"z": 40, "axis": "x"}, "z"),
        ({"axis": "w"}, "axis"),
        ({"scale": 9}, "scale"),
        ({"window": "5"}, "window"),
        ({"window": "9,1"}, "window"),
        ({"overlay": "both"}, "overlay"),
    ):
        r = httpx.get(base, params=params)
        assert r.status_code == 422 and r.json()["param"] == param, (params, r.text)
        assert "\n" not in r.json()["detail"]
    r = httpx.get(f"{url}/scans/0000002_V00-Aug00/preview.png", params={"overlay": "prediction"})
    assert r.status_code == 404
    r = httpx.get(f"{url}/scans/0000003_V00-Aug01/preview.png", params={"overlay": "mask"})
    assert r.status_code == 404 and "has no mask" in r.json()["detail"]


def test_openapi_describes_the_new_routes(served):
    url, _, _ = served
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    for route in (
        "/scans/{scan_id}/prediction",
        "/scans/{scan_id}/prediction/label_map",
        "/scans/{scan_id}/preview.png",
    ):
        responses = paths[route]["get"]["responses"]
        assert {"200", "401", "404", "413", "422"} <= responses.keys()
    assert "/viewer" in paths
    params = {p["name"] for p in paths["/scans"]["get"]["parameters"]}
    assert "has_prediction" in params


def test_serve_parser_takes_predictions():
    args = build_parser().parse_args(["serve", "store", "--predictions", "pred"])
    assert args.predictions == "pred"


def test_demo_preview_is_the_served_preview(served, small_store, tmp_path):
    from examples.demo import save_preview

    url, _, pred = served
    root, _ = small_store
    scan_id = WITH_PREDICTION[1]
    saved = save_preview(root, pred.store.root, scan_id, tmp_path / "preview.png")
    got = np.asarray(Image.open(saved).convert("RGB"))
    r = httpx.get(f"{url}/scans/{scan_id}/preview.png", params={"overlay": "prediction", "scale": 2})
    np.testing.assert_array_equal(got, png(r))


def test_per_slice_dataset_prediction_and_its_preview(small_store, tmp_path):
    """A MedSegPy per-slice dataset predicts some slices only: stored as such, previewed in place."""
    from loaders.catalog import scan_dict, shared_source

    root, truth = small_store
    scan_id = WITH_PREDICTION[0]
    meta = shared_source(str(root)).metadata(scan_id)
    picked = (2, 3, 7)  # slice_id is 1-indexed: z = 1, 2, 6
    DatasetCatalog.remove("per_slice")
    DatasetCatalog.register(
        "per_slice", lambda: [{**scan_dict(str(root), meta), "slice_id": z} for z in picked]
    )
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)
    try:
        loader = build_loader(cfg, "per_slice", batch_size=2, is_test=True, shuffle=False, drop_last=False)
        write_predictions(loader, softmax_model, tmp_path / "pred")
    finally:
        DatasetCatalog.remove("per_slice")
    group = zarr.open_group(str(tmp_path / "pred" / scan_id), mode="r")
    assert group.attrs["prediction"]["slices"] == [1, 2, 6]
    labels = group["label_map"][...]
    assert labels.shape == (40, 36, 3)
    image = truth[scan_id][0]
    with live_server(root, predictions=tmp_path / "pred") as url:
        base = f"{url}/scans/{scan_id}/preview.png"
        at6 = png(httpx.get(base, params={"z": 6, "overlay": "prediction", "window": "50,150"}))
        expected = expected_grey(image[:, :, 6], 50.0, 150.0)
        for k in range(4):
            expected = blend(expected, labels[:, :, 2] == k + 1, k)
        np.testing.assert_array_equal(at6, expected)
        missing = httpx.get(base, params={"z": 5, "overlay": "prediction"})
        assert missing.status_code == 404 and "slice 5" in missing.json()["detail"]
        side = png(httpx.get(base, params={"z": 4, "axis": "x", "overlay": "prediction", "window": "50,150"}))
        expected = expected_grey(image[:, 4, :], 50.0, 150.0)
        full = np.zeros((40, 12), np.uint8)
        full[:, [1, 2, 6]] = labels[:, 4, :]
        for k in range(4):
            expected = blend(expected, full == k + 1, k)
        np.testing.assert_array_equal(side, expected)


def test_predictions_are_served_as_zarr_for_standard_viewers(served, small_store, tmp_path):
    url, _, pred = served
    scan_id = WITH_PREDICTION[0]
    root = zarr.open_group(
        zarr.storage.FsspecStore.from_url(f"{url}/predictions/zarr/", read_only=True), mode="r"
    )
    np.testing.assert_array_equal(root[scan_id]["label_map"][...], pred[scan_id]["label_map"][...])
    np.testing.assert_array_equal(root[scan_id]["probabilities"][...], pred[scan_id]["probabilities"][...])
    assert "ome" in dict(root[scan_id].attrs)  # the NGFF label image neuroglancer opens
    assert httpx.get(f"{url}/predictions/zarr/.staging/x").status_code == 404
    assert httpx.get(f"{url}/predictions/zarr/../zarr.json").status_code in (400, 404)
    store_root, _ = small_store
    with live_server(store_root) as plain:
        r = httpx.get(f"{plain}/predictions/zarr/zarr.json")
        assert r.status_code == 404 and "predictions" in r.json()["detail"]


def copy_predictions(pred, dst, scan_id, **changes):
    """A copy of the served predictions store with ``changes`` to one scan's ``prediction``
    attributes (written with Python's default, non-strict JSON, as a foreign tool might)."""
    import json
    import shutil

    shutil.copytree(pred.store.root, dst, symlinks=True)
    doc_path = (dst / scan_id).resolve() / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["prediction"].update(changes)
    doc_path.write_text(json.dumps(doc))
    return dst


def test_prediction_of_other_data_is_refused_409_one_line(served, small_store, tmp_path):
    """A predictions store written for another store with the same scan ids (other shapes),
    or whose slices or arrays do not fit: 409, one line naming the scan, the connection kept."""
    from conftest import SMALL_SCANS, build_store

    _, _, pred = served
    scan_id = WITH_PREDICTION[0]
    other = tmp_path / "other"
    build_store(
        other, [(s, (30, 30, 12) if s == scan_id else shape, *rest) for s, shape, *rest in SMALL_SCANS]
    )
    with live_server(other, predictions=pred.store.root) as url, httpx.Client(base_url=url) as client:
        for path, params in (
            (f"/scans/{scan_id}/preview.png", {"overlay": "prediction"}),
            (f"/scans/{scan_id}/preview.png", {"overlay": "prediction", "axis": "x", "z": 3}),
            (f"/scans/{scan_id}/prediction", {}),
            (f"/scans/{scan_id}/prediction/label_map", {"roi": "0:5"}),
        ):
            r = client.get(path, params=params)
            assert r.status_code == 409, (path, r.text)
            detail = r.json()["detail"]
            assert r.json()["error"] == "PredictionMismatch" and "\n" not in detail
            assert scan_id in detail and "40x36x12" in detail and "30x30x12" in detail
            assert r.headers.get("connection") != "close"  # keep-alive survives (a 500 reset it)
        # the other scan has the same id and shape but is another store's version: other data too
        same_shape = client.get(f"/scans/{WITH_PREDICTION[1]}/preview.png", params={"overlay": "prediction"})
        assert same_shape.status_code == 409 and "another version of the scan" in same_shape.json()["detail"]
        # nor does the scan's metadata claim it (the viewer would show its Dice): not the scan's
        meta = client.get(f"/scans/{scan_id}").json()
        assert meta["has_prediction"] is False and meta["prediction_dice"] is None
        listed = {d["scan_id"]: d for d in client.get("/scans").json()["scans"]}
        assert listed[scan_id]["has_prediction"] is False and not listed[WITH_PREDICTION[1]]["has_prediction"]
        with_prediction = client.get("/scans", params={"has_prediction": "true"}).json()["scans"]
        assert scan_id not in {d["scan_id"] for d in with_prediction}

    bad_slices = copy_predictions(pred, tmp_path / "slices", scan_id, slices=[0, 5, 50], shape=[40, 36, 3])
    bad_array = copy_predictions(pred, tmp_path / "array", scan_id, slices=[0, 1, 2], shape=[40, 36, 3])
    for folder, words in ((bad_slices, "slices"), (bad_array, "label_map is 40x36x12")):
        with live_server(small_store[0], predictions=folder) as url:
            r = httpx.get(f"{url}/scans/{scan_id}/preview.png", params={"overlay": "prediction", "z": 0})
            assert r.status_code == 409 and words in r.json()["detail"], r.text


def test_non_finite_dice_is_null_and_never_fails_the_listing(served, small_store, tmp_path):
    import json

    _, _, pred = served
    scan_id = WITH_PREDICTION[0]
    nan = float("nan")
    folder = copy_predictions(pred, tmp_path / "nan", scan_id, dice=[nan, float("inf"), 0.5, -float("inf")])
    assert "NaN" in ((folder / scan_id).resolve() / "zarr.json").read_text()

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))

    with live_server(small_store[0], predictions=folder) as url:
        listing = httpx.get(f"{url}/scans")
        assert listing.status_code == 200, listing.text
        by_id = {s["scan_id"]: s for s in strict(listing.text)["scans"]}
        assert by_id[scan_id]["prediction_dice"] == [None, None, 0.5, None]
        one = httpx.get(f"{url}/scans/{scan_id}")
        assert one.status_code == 200 and strict(one.text)["prediction_dice"] == [None, None, 0.5, None]
        assert httpx.get(f"{url}/scans", params={"has_prediction": "true"}).status_code == 200
        viewer_js = httpx.get(f"{url}/viewer/static/viewer.js").text
        assert "diceText" in viewer_js  # the page shows a null Dice as n/a instead of throwing


def test_a_prediction_of_another_version_of_the_scan_is_not_shown_and_is_predicted_anew(tmp_path):
    """Two stores converted from the same data hold scans of one id and shape but different
    versions: predictions written from one are refused (409) when served with the other, and
    not counted as the scan's. A scan converted again since is predicted anew, not skipped."""
    from conftest import SMALL_SCANS, build_store

    first, second, pred = tmp_path / "first", tmp_path / "second", tmp_path / "pred"
    build_store(first, scans=SMALL_SCANS[:1], image_only=())
    build_store(second, scans=SMALL_SCANS[:1], image_only=())
    scan_id = SMALL_SCANS[0][0]
    DatasetCatalog.remove("versioned")
    DatasetCatalog.register("versioned", str(first))
    try:
        cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2, 3), INCLUDE_BACKGROUND=True)

        def loader():
            return build_loader(cfg, "versioned", batch_size=4, is_test=True, shuffle=False, drop_last=False)

        assert write_predictions(loader(), softmax_model, pred).written == (scan_id,)
        with live_server(first, predictions=pred) as url:
            assert httpx.get(f"{url}/scans/{scan_id}/prediction", params={"roi": "0:2"}).status_code == 200
        with live_server(second, predictions=pred) as url:
            r = httpx.get(f"{url}/scans/{scan_id}/prediction", params={"roi": "0:2"})
            assert r.status_code == 409 and r.json()["error"] == "PredictionMismatch"
            assert "made from another version of the scan" in r.json()["detail"]
            assert httpx.get(f"{url}/scans/{scan_id}").json()["has_prediction"] is False
        again = write_predictions(loader(), softmax_model, pred)
        assert again.skipped == (scan_id,)
        assert (
            str(again)
            == f"0 scans written, 1 already there (skipped: overwrite=True replaces them), in {pred}"
        )
        shown: list[str] = []  # a notebook shows the sentence, hint included, not the fields

        class Printer:
            def text(self, text: str) -> None:
                shown.append(text)

        again._repr_pretty_(Printer(), False)
        assert shown == [str(again)]
        build_store(first, scans=SMALL_SCANS[:1], image_only=())  # converted again: a new version
        DatasetCatalog.remove("versioned")
        DatasetCatalog.register("versioned", str(first))
        from loaders import close_shared_sources

        close_shared_sources()
        assert write_predictions(loader(), softmax_model, pred).written == (scan_id,)
    finally:
        DatasetCatalog.remove("versioned")

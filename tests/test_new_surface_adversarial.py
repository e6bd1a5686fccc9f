"""Issue 20's new surface used the wrong way, as a careless or hostile client would: class
names with odd characters over REST, image channels out of range, ``scancache export`` with
bad arguments or predictions it cannot fully export. Each answer is a documented status with a
one-line detail, or a one-line CLI error that writes nothing; never a 5xx, never half a result.
"""

from __future__ import annotations

import json
import shutil

import httpx
import nibabel as nib
import numpy as np
import pytest
import zarr
from h5_sources import run_cli
from live_server import live_server
from test_export_nifti import SOURCE_AFFINE, loader_for, pointwise_model, to_stored, write_nifti_like

from client.wire import decode_npy
from loaders import DatasetCatalog, write_predictions
from store.writer import write_scan

ODD_NAMES = ["a,b", "c+d", "[x]"]  # names the short form cannot say; the JSON form can


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd") / "store"
    rng = np.random.default_rng(3)
    image = rng.random((16, 16, 4)).astype(np.float32)
    mask = (rng.random((16, 16, 4, 3)) > 0.5).astype(np.uint8)
    write_scan(
        root, "multi", image, mask, {"split": "train", "class_names": ODD_NAMES}, extra_channels=[image * 2]
    )
    write_scan(root, "single", image, mask, {"split": "train"})
    return root, image, mask


def test_odd_class_names_select_exactly_in_json_and_fail_in_one_line_in_short_form(odd_store):
    root, _, mask = odd_store
    with live_server(root) as url:
        got = httpx.get(f"{url}/scans/multi/mask", params={"categories": '["[x]",["a,b","c+d"]]'})
        assert got.status_code == 200
        expected = np.stack([mask[..., 2], mask[..., 0] + mask[..., 1]], axis=-1)
        np.testing.assert_array_equal(decode_npy(got.content), expected)
        short = httpx.get(f"{url}/scans/multi/mask", params={"categories": "a,b"})
        assert short.status_code == 422
        assert short.json() == {
            "detail": "categories: no class named 'a'; the classes are 'a,b', 'c+d', '[x]'",
            "error": "InvalidCategories",
            "param": "categories",
        }


def test_image_channel_out_of_range_is_a_bad_parameter_or_a_missing_channel(odd_store):
    root, image, _ = odd_store
    with live_server(root) as url:
        second = httpx.get(f"{url}/scans/multi/image", params={"channel": 1})
        np.testing.assert_array_equal(decode_npy(second.content), image * 2)
        for huge, detail in (
            ("10000", "Input should be less than or equal to 9999"),
            ("99999999999999999999", "'99999999999999999999' has more than 18 digits"),
        ):
            r = httpx.get(f"{url}/scans/multi/image", params={"channel": huge})
            assert r.status_code == 422, r.text
            assert r.json()["param"] == "channel" and r.json()["detail"] == f"channel: {detail}"
        missing = httpx.get(f"{url}/scans/single/image", params={"channel": 1})
        assert missing.status_code == 404
        assert missing.json()["detail"] == "scan 'single' has no image channel 1 (it has 1)"
        params = httpx.get(f"{url}/openapi.json").json()["paths"]["/scans/{scan_id}/image"]["get"][
            "parameters"
        ]
        schema = next(p["schema"] for p in params if p["name"] == "channel")
        assert (schema["minimum"], schema["maximum"]) == (0, 9999)  # the limit is documented


@pytest.fixture(scope="module")
def nifti_predictions(tmp_path_factory):
    base = tmp_path_factory.mktemp("adv_pred")
    root = base / "store"
    write_nifti_like(root, "case_001", 0)
    DatasetCatalog.remove("adversarial_nifti")
    DatasetCatalog.register("adversarial_nifti", str(root), split="train")
    try:
        pred = base / "pred"
        write_predictions(
            loader_for("adversarial_nifti", ("liver", "kidney", "spleen")), pointwise_model, pred
        )
        # a model with other outputs than its categories: 4 channels for background + 2 categories
        other = base / "other"
        write_predictions(
            loader_for("adversarial_nifti", ("liver", ("kidney", "spleen"))), pointwise_model, other
        )
    finally:
        DatasetCatalog.remove("adversarial_nifti")
    return base, pred, other


def test_export_probabilities_of_a_prediction_without_them_writes_nothing(nifti_predictions, tmp_path):
    _, pred, _ = nifti_predictions
    stripped = tmp_path / "stripped"
    shutil.copytree(pred, stripped, symlinks=True)
    shutil.rmtree((stripped / "case_001").resolve() / "probabilities")
    out = tmp_path / "out"
    result = run_cli("export", stripped, out, "--probabilities", "-q")
    assert result.returncode == 1
    assert result.stderr == "scancache export: error: scan 'case_001': prediction has no 'probabilities'\n"
    assert not out.exists()  # refused before the label map was written
    assert run_cli("export", stripped, out, "-q").returncode == 0  # the label maps alone export
    assert sorted(p.name for p in out.iterdir()) == ["case_001.json", "case_001.nii.gz"]


def test_export_with_an_empty_scan_list_is_refused(nifti_predictions, tmp_path):
    _, pred, _ = nifti_predictions
    result = run_cli("export", pred, tmp_path / "out", "--scans", ",", "-q")
    assert result.returncode == 1
    assert result.stderr == (
        "scancache export: error: --scans: ',' names no scan; give scan ids like case_001,case_002\n"
    )
    assert not (tmp_path / "out").exists()


def test_export_of_a_model_with_other_outputs_names_categories_by_number(nifti_predictions, tmp_path):
    """write_predictions keeps such a prediction (without names); the export writes its label map
    as stored (values 1..n, no class claimed) instead of failing on it."""
    _, _, other = nifti_predictions
    out = tmp_path / "out"
    result = run_cli("export", other, out, "-q")
    assert result.returncode == 0, result.stderr
    stored = zarr.open_array(str((other / "case_001").resolve() / "label_map"), mode="r")[...]
    exported = nib.load(out / "case_001.nii.gz")
    np.testing.assert_array_equal(exported.affine, SOURCE_AFFINE)
    back, _ = to_stored(np.asanyarray(exported.dataobj), SOURCE_AFFINE)
    np.testing.assert_array_equal(back, stored)
    assert int(stored.max()) == 3  # the fourth channel's label is there and exported
    sidecar = json.loads((out / "case_001.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "category 0", "2": "category 1", "3": "category 2"}
    assert sidecar["label_values"] == "categories" and sidecar["channels"] is None


def test_a_malformed_affine_is_refused_by_the_writer_and_skipped_by_the_server(tmp_path):
    root = tmp_path / "store"
    image = np.zeros((8, 8, 2), np.float32)
    with pytest.raises(ValueError, match=r"^affine: expected a 4x4 list of finite numbers, got \[\[1\]\]$"):
        write_scan(root, "short", image, None, {"affine": [[1]]})
    with pytest.raises(ValueError, match=r"invalid literal for int\(\) with base 10: 'x'"):
        write_scan(root, "values", image, np.zeros((8, 8, 2, 1), np.uint8), {"label_values": ["x"]})
    write_scan(root, "good", image, None, {"split": "train"})
    write_scan(root, "edited", image, None, {"split": "train"})
    # a store edited by hand (or written by another tool): the affine no longer parses
    doc_path = (root / "edited").resolve() / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["affine"] = "x"
    doc_path.write_text(json.dumps(doc))
    with live_server(root) as url:
        listing = httpx.get(f"{url}/scans")
        assert listing.status_code == 200
        assert [s["scan_id"] for s in listing.json()["scans"]] == ["good"]
        one = httpx.get(f"{url}/scans/edited")  # damaged after writing: said so, with the repair
        assert one.status_code == 500
        assert one.json()["error"] == "ScanDamaged"
        assert one.json()["detail"].startswith(
            "scan 'edited' is damaged in the store (its zarr.json is not a scan's): scancache verify"
        )
        assert httpx.get(f"{url}/scans/edited/image").json()["error"] == "ScanDamaged"


def test_old_prediction_with_a_scan_store_that_lacks_the_scan_names_the_cause(nifti_predictions, tmp_path):
    _, pred, _ = nifti_predictions
    old = tmp_path / "old"
    shutil.copytree(pred, old, symlinks=True)
    doc_path = (old / "case_001").resolve() / "zarr.json"
    doc = json.loads(doc_path.read_text())
    for key in ("scan_shape", "affine", "source_affine"):  # as a prediction of an older scancache
        del doc["attributes"]["prediction"][key]
    doc_path.write_text(json.dumps(doc))
    other = tmp_path / "other"
    write_scan(other, "another", np.zeros((4, 4, 4), np.float32), None, {})
    result = run_cli("export", old, tmp_path / "out", "--store", other, "-q")
    assert result.returncode == 1
    assert result.stderr == (
        "scancache export: error: scan 'case_001': its prediction records no geometry and the scan store"
        " given (--store, scan_store=) has no scan of that id; pass the store the prediction was made from\n"
    )


def test_a_name_two_classes_share_is_refused_not_guessed(tmp_path):
    """A Decathlon dataset.json may name two label values alike; selecting by that name must not
    silently pick the first."""
    root = tmp_path / "store"
    mask = np.zeros((8, 8, 2, 3), np.uint8)
    mask[:2, ..., 0] = mask[2:4, ..., 1] = mask[4:6, ..., 2] = 1
    write_scan(
        root, "twins", np.zeros((8, 8, 2), np.float32), mask, {"class_names": ["liver", "tumour", "tumour"]}
    )
    with live_server(root) as url:
        bad = httpx.get(f"{url}/scans/twins/mask", params={"categories": '["tumour"]'})
        assert bad.status_code == 422
        assert bad.json()["detail"] == (
            "categories: class name 'tumour' is ambiguous: classes 1, 2 have it; select them by number"
        )
        ok = httpx.get(f"{url}/scans/twins/mask", params={"categories": '["liver",[1,2]]'})
        np.testing.assert_array_equal(
            decode_npy(ok.content), np.stack([mask[..., 0], mask[..., 1] + mask[..., 2]], axis=-1)
        )


def test_short_form_indices_are_ascii_digits_as_in_a_roi(odd_store):
    from store.categories import parse_categories

    assert parse_categories("0,1+2") == ((0,), (1, 2))
    assert parse_categories("1_0,\u0661,\uff11") == (
        ("1_0",),
        ("\u0661",),
        ("\uff11",),
    )  # names, not 10, 1, 1
    root, _, _ = odd_store
    with live_server(root) as url:
        r = httpx.get(f"{url}/scans/multi/mask", params={"categories": "1_0"})
        assert r.status_code == 422
        assert r.json()["detail"] == "categories: no class named '1_0'; the classes are 'a,b', 'c+d', '[x]'"
        assert httpx.get(f"{url}/scans/multi/mask", params={"categories": "-1"}).json()["detail"] == (
            "categories: class -1 is negative"
        )


def test_export_nifti_takes_one_scan_id_as_a_string(nifti_predictions, tmp_path):
    from loaders import export_nifti

    _, pred, _ = nifti_predictions
    done = export_nifti(pred, tmp_path / "out", scans="case_001", progress=False)
    assert [d.scan_id for d in done] == ["case_001"]
    with pytest.raises(ValueError, match=r"^scan 'case_9' has no prediction in .* \(it has case_001\)$"):
        export_nifti(pred, tmp_path / "out", scans="case_9", progress=False)


def test_a_huge_category_is_named_in_a_short_detail(odd_store):
    root, _, _ = odd_store
    with live_server(root) as url:
        long_name = httpx.post(
            f"{url}/batch",
            json={"regions": [{"scan_id": "multi", "array": "mask", "categories": ["x" * 5000]}]},
        )
        assert long_name.status_code == 422
        assert long_name.json()["detail"] == (
            "regions[0].categories: no class named '" + "x" * 76 + "...; the classes are 'a,b', 'c+d', '[x]'"
        )
        nested = httpx.post(
            f"{url}/batch",
            json={"regions": [{"scan_id": "multi", "array": "mask", "categories": [[list(range(20000))]]}]},
        )
        assert nested.status_code == 422
        detail = nested.json()["detail"]
        assert detail.endswith("... is not a class index or name") and len(detail) < 150


def test_prediction_fields_are_lists_or_null_whatever_the_store_holds(nifti_predictions, tmp_path):
    base, pred, _ = nifti_predictions
    edited = tmp_path / "edited"
    shutil.copytree(pred, edited, symlinks=True)
    doc_path = (edited / "case_001").resolve() / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["prediction"]["dice"] = "oops"
    doc["attributes"]["prediction"]["class_names"] = {"1": "liver"}
    doc_path.write_text(json.dumps(doc))
    with live_server(base / "store", predictions=edited) as url:
        got = httpx.get(f"{url}/scans/case_001").json()
        assert (got["has_prediction"], got["prediction_dice"], got["prediction_class_names"]) == (
            True,
            None,
            None,
        )
        listed = httpx.get(f"{url}/scans").json()["scans"]
        assert [(s["scan_id"], s["prediction_dice"]) for s in listed] == [("case_001", None)]


@pytest.mark.parametrize("text", ["0,,1", "0,1,", ",0", " , "])
def test_short_form_refuses_empty_items(text):
    """ "0,,1" used to select two classes without a word: a class left out is a typo to name."""
    from store.categories import parse_categories
    from store.errors import InvalidCategories

    with pytest.raises(InvalidCategories, match="empty item between commas"):
        parse_categories(text)

"""What a new user of an nnU-Net dataset runs into (issue 20 review): dataset.json as nnU-Net
itself reads it, files with the other NIfTI ending, long label lists, renamed classes in
verify, a dataset without its dataset.json, messages that do not repeat absolute paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from h5_sources import run_cli
from nifti_sources import (
    build_two_channel_dataset,
    colin,
    requires_mricron,
    save,
    v2_dataset_json,
    write_json,
)

from service.nifti_source import value_ranges

pytestmark = requires_mricron


def convert(dataset, store):
    return run_cli("preprocess", dataset, store, "--workers", "1", "-q")


def failure_lines(result) -> dict[str, str]:
    lines = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    return {line.split(": ", 1)[0]: line for line in lines}


def one_case(root, case, ending=".nii.gz", label_ending=None, labels=None):
    c = colin()
    save(c.t1, root / f"imagesTr/{case}_0000{ending}")
    save(c.labels if labels is None else labels, root / f"labelsTr/{case}{label_ending or ending}")


def test_dataset_json_with_a_bom_and_label_values_as_nnunet_reads_them(tmp_path):
    """nnU-Net v2 takes ``int(value)`` of each label: "1" and 1.0 are label 1; a BOM is fine."""
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "colin")
    (first, first_name), (second, second_name), *rest = c.kept
    labels = {"background": "0", first_name: str(first), second_name: float(second)}
    labels.update({name: value for value, name in rest})
    doc = {"channel_names": {"0": "T1"}, "labels": labels, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    result = convert(root, tmp_path / "store")
    assert result.returncode == 0, result.stdout + result.stderr
    attrs = zarr.open_group(str(tmp_path / "store"), mode="r")["colin"].attrs
    assert attrs["label_values"] == [v for v, _ in c.kept]
    assert attrs["class_names"] == [n for _, n in c.kept]


def test_a_file_with_the_other_nifti_ending_fails_its_case_in_one_line(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    one_case(root, "plain_image", ending=".nii", label_ending=".nii.gz")  # image .nii
    one_case(root, "plain_label", ending=".nii.gz", label_ending=".nii")  # label .nii
    one_case(root, "all_plain", ending=".nii")
    one_case(root, "one_channel_plain", ending=".nii")  # channel 0 .nii, channel 1 .nii.gz
    save(c.t1, root / "imagesTr/one_channel_plain_0001.nii.gz")
    (root / "labelsTr/one_channel_plain.nii").rename(root / "labelsTr/one_channel_plain.nii.gz")
    write_json(
        root / "dataset.json",
        {"labels": {"background": 0, **{n: v for v, n in c.kept}}, "file_ending": ".nii.gz"},
    )
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert "1 converted, 0 skipped, 4 failed" in result.stdout, result.stdout
    lines = failure_lines(result)
    ending = "its file ending is not dataset.json's file_ending '.nii.gz' (file not read)"
    assert lines["plain_image"] == f"plain_image: imagesTr/plain_image_0000.nii: {ending}"
    assert lines["plain_label"] == f"plain_label: labelsTr/plain_label.nii: {ending}"
    assert lines["all_plain"] == f"all_plain: imagesTr/all_plain_0000.nii: {ending}"
    # named as it is, not as a missing channel 0 of the right ending
    assert lines["one_channel_plain"] == f"one_channel_plain: imagesTr/one_channel_plain_0000.nii: {ending}"


def test_a_dataset_whose_images_all_have_the_other_ending_says_so(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "colin", ending=".nii")
    write_json(
        root / "dataset.json",
        {"labels": {"background": 0, **{n: v for v, n in c.kept}}, "file_ending": ".nii.gz"},
    )
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "no .nii.gz images in imagesTr/ or imagesTs/" in line
    assert "its NIfTI files end otherwise: dataset.json's file_ending is '.nii.gz'" in line


def test_a_folder_with_images_but_no_dataset_json_names_it(tmp_path):
    root = build_two_channel_dataset(tmp_path / "ds")
    (root / "dataset.json").rename(root / "Dataset.json")
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "has imagesTr/ or imagesTs/ but no dataset.json" in line, line


def test_pointing_at_imagestr_names_the_dataset_folder_to_give(tmp_path):
    root = build_two_channel_dataset(tmp_path / "ds")
    result = convert(root / "imagesTr", tmp_path / "store")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "holds NIfTI files of the nnU-Net dataset" in line and "(the one with dataset.json)" in line, line
    assert not (tmp_path / "store").exists()


def test_an_unlisted_label_value_lists_the_known_values_as_runs(tmp_path):
    """An atlas of 116 regions: the line gives ``0-116``, not 117 numbers."""
    import nibabel as nib

    c = colin()
    root = tmp_path / "ds"
    labels = np.asarray(c.labels.dataobj).copy()
    labels[5, 6, 7] = 200
    one_case(root, "atlas", labels=nib.Nifti1Image(labels, c.labels.affine))
    names = {"background": 0, **{f"region{v}": v for v in range(1, 117)}, "extra": 150}
    write_json(root / "dataset.json", {"labels": names, "file_ending": ".nii.gz"})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert failure_lines(result)["atlas"] == (
        "atlas: labelsTr/atlas.nii.gz: label value 200 is not in dataset.json's labels (0-116, 150)"
    )


@pytest.mark.parametrize(
    ("values", "text"),
    [([0], "0"), ([0, 1, 2, 3], "0-3"), ([0, 2, 3, 5, 9, 10], "0, 2-3, 5, 9-10"), ([], "")],
)
def test_value_ranges(values, text):
    assert value_ranges(values) == text


def test_a_damaged_file_is_named_once_relative_to_the_dataset(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    one_case(root, "junk")
    (root / "imagesTr/junk_0000.nii.gz").write_bytes(b"")
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    line = failure_lines(result)["junk"]
    assert line.startswith("junk: imagesTr/junk_0000.nii.gz: cannot read as NIfTI: ImageFileError:"), line
    assert str(tmp_path) not in result.stdout + result.stderr


def test_gzip_that_is_no_nifti_is_one_line_without_nibabel_s_own(tmp_path):
    """nibabel printed its header checks ("sizeof_hdr should be 348 ...") to stderr first."""
    import gzip

    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    one_case(root, "words")
    (root / "imagesTr/words_0000.nii.gz").write_bytes(gzip.compress(b"hello" * 100))
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert failure_lines(result)["words"].startswith(
        "words: imagesTr/words_0000.nii.gz: cannot read as NIfTI"
    )
    assert "sizeof_hdr" not in result.stderr and "not recognized" not in result.stderr, result.stderr


def test_verify_finds_classes_renamed_in_dataset_json(tmp_path):
    c = colin()
    root, store = tmp_path / "ds", tmp_path / "store"
    one_case(root, "colin")
    doc = {"channel_names": {"0": "T1"}, "labels": {"background": 0, **{n: v for v, n in c.kept}}}
    write_json(root / "dataset.json", doc)
    assert convert(root, store).returncode == 0
    assert run_cli("verify", root, store).returncode == 0
    (value, name), *_ = c.kept
    doc["labels"] = {"background": 0, "renamed": value, **{n: v for v, n in c.kept[1:]}}
    write_json(root / "dataset.json", doc)
    verified = run_cli("verify", root, store)
    assert verified.returncode == 1
    (line,) = [ln for ln in verified.stdout.splitlines() if ln.startswith("MISMATCH")]
    assert line == (
        f"MISMATCH colin: class_names: stored {name!r}, dataset.json 'renamed' (preprocess converts it again)"
    )
    doc["channel_names"] = {"0": "T1w"}
    doc["labels"] = {"background": 0, **{n: v for v, n in c.kept}}
    write_json(root / "dataset.json", doc)
    verified = run_cli("verify", root, store)
    assert "MISMATCH colin: channel_names: stored 'T1', dataset.json 'T1w'" in verified.stdout


def test_a_header_declaring_more_voxels_than_memory_fails_its_case(tmp_path):
    """An uncompressed .nii whose header says 32767^3 float64 (281 TB, beyond any address space): one line, and
    the good case converts."""
    import nibabel as nib

    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good", ending=".nii")
    one_case(root, "huge", ending=".nii")
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float64)
    header.set_data_shape((32767, 32767, 32767))
    header.set_sform(c.t1.affine, code=1)
    (root / "imagesTr/huge_0000.nii").write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4096)
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1 and "1 converted, 0 skipped, 1 failed" in result.stdout, result.stdout
    assert failure_lines(result)["huge"] == (
        "huge: imagesTr/huge_0000.nii: the header's 32767x32767x32767 voxels do not fit in memory"
    )


def test_a_gzip_file_damaged_past_its_voxels_fails_its_case_and_verify(tmp_path):
    """nibabel stops reading once it has the voxels, so a damaged CRC (or data nibabel inflates
    to other voxels) converted silently and verify called the store exact."""
    c = colin()
    root, store = tmp_path / "ds", tmp_path / "store"
    one_case(root, "good")
    one_case(root, "crc")
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    damaged = root / "imagesTr/crc_0000.nii.gz"
    data = bytearray(damaged.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 of the trailer: every voxel inflates as written
    damaged.write_bytes(bytes(data))
    result = convert(root, store)
    assert result.returncode == 1
    line = failure_lines(result)["crc"]
    assert (
        line
        == "crc: imagesTr/crc_0000.nii.gz: cannot read as NIfTI: damaged gzip data (CRC check failed 0x"
        + line.split("0x", 1)[1]
    )
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == ["good", "zarr.json"]
    verified = run_cli("verify", root, store)
    assert (
        verified.returncode == 1
        and "crc: imagesTr/crc_0000.nii.gz: cannot read as NIfTI: damaged gzip" in verified.stdout
    )


def test_an_ignore_label_and_listed_images_that_are_gone_are_warned_of(tmp_path):
    """nnU-Net's 'ignore' label is stored as an ordinary class, and a Decathlon list naming
    files no folder holds (a download that lost some) converts the rest: both said, once."""
    import nibabel as nib

    root = tmp_path / "Task10_Gone"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = np.full((8, 8, 4), 2, np.uint8)
    labels[2:6, 2:6, 1:3] = 1
    for case in ("a_001", "a_002"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), root / f"imagesTr/{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / f"labelsTr/{case}.nii.gz")
    listed = [f"a_{i:03d}" for i in range(1, 9)]
    doc = {
        "labels": {"0": "background", "1": "liver", "2": "ignore"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in listed],
        "test": ["./imagesTs/a_100.nii.gz"],
    }
    write_json(root / "dataset.json", doc)
    result = convert(root, tmp_path / "store")
    assert result.returncode == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("preprocess: warning: ")]
    assert warnings == [
        "preprocess: warning: dataset.json's label 'ignore' (value 2) is nnU-Net's label for unannotated "
        "voxels: scancache stores it as an ordinary class named 'ignore' (docs/user-guide.md: select it in "
        "CATEGORIES to mask those voxels out of a loss)",
        "preprocess: warning: dataset.json lists 7 image(s) that imagesTr/ and imagesTs/ do not hold: "
        "a_003.nii.gz, a_004.nii.gz, a_005.nii.gz, a_006.nii.gz, a_007.nii.gz and 2 more "
        "(the folders are what is converted)",
    ]
    stored = zarr.open_group(str(tmp_path / "store" / "a_001"), mode="r").attrs
    assert stored["class_names"] == ["liver", "ignore"] and stored["label_values"] == [1, 2]


def test_an_uncompressed_file_named_gz_is_named_as_such(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    one_case(root, "plain")
    save(c.t1, tmp_path / "plain.nii")
    (root / "imagesTr/plain_0000.nii.gz").write_bytes((tmp_path / "plain.nii").read_bytes())
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert failure_lines(result)["plain"] == (
        "plain: imagesTr/plain_0000.nii.gz: cannot read as NIfTI: not gzip data, though its name ends "
        "in .gz (a .nii file renamed?)"
    )


def test_a_case_in_imagesTr_and_imagesTs_fails_but_does_not_hold_back_prune(tmp_path):
    """Its failure names a folder ("imagesTs/"), but every folder was read: --prune is not
    withheld (a review found it was, by the failure's name alone)."""
    import shutil

    from nifti_sources import build_two_channel_dataset

    from service.sources import discover

    root = build_two_channel_dataset(tmp_path / "ds")
    (root / "imagesTs").mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(root / f"imagesTr/colin2_{channel}.nii.gz", root / f"imagesTs/colin2_{channel}.nii.gz")
    found = discover(root)
    assert any("case also in" in str(f) for f in found.failures), [str(f) for f in found.failures]
    assert found.unread_folders == []


def test_unlisted_images_of_a_decathlon_dataset_with_four_digit_ids_are_cases_of_their_own(tmp_path):
    """AMOS-style ids (amos_0005): a Decathlon dataset whose lists name whole files reads an
    unlisted file as a whole case, not as channel 5 of a case "amos", and says it was unlisted."""
    import nibabel as nib

    root = tmp_path / "amos"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[2:6, 2:6, 1:3] = 1
    images = {}
    for i, case in enumerate(("amos_0001", "amos_0004", "amos_0005")):
        images[case] = np.full((8, 8, 4), i, np.int16)
        nib.save(nib.Nifti1Image(images[case], np.eye(4)), root / f"imagesTr/{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / f"labelsTr/{case}.nii.gz")
    for i, case in enumerate(("amos_0002", "amos_0003")):
        images[case] = np.full((8, 8, 4), 10 + i, np.int16)
        nib.save(nib.Nifti1Image(images[case], np.eye(4)), root / f"imagesTs/{case}.nii.gz")
    listed = ("amos_0001", "amos_0004")
    doc = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in listed],
    }
    write_json(root / "dataset.json", doc)
    store = tmp_path / "store"
    result = convert(root, store)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scans: 5 converted, 0 skipped, 0 failed" in result.stdout
    assert (
        "preprocess: warning: dataset.json's training/test lists leave out 3 image(s) of imagesTr/ or "
        "imagesTs/: amos_0002.nii.gz, amos_0003.nii.gz, amos_0005.nii.gz (converted, each a case of its own)"
    ) in result.stderr
    for case, image in images.items():
        group = zarr.open_group(str(store / case), mode="r")
        assert group.attrs["split"] == ("test" if case in ("amos_0002", "amos_0003") else "train")
        np.testing.assert_array_equal(np.unique(group["image"][...]), np.unique(image))


def test_a_case_linked_to_files_that_are_gone_fails_naming_the_link(tmp_path):
    """nnU-Net's scripts link files into place; a link whose target went (a moved disk) fails
    its case naming it, in preprocess and verify, instead of the case vanishing."""
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    (root / "imagesTr/gone_0000.nii.gz").symlink_to("/nonexistent/gone_0000.nii.gz")
    (root / "labelsTr/gone.nii.gz").symlink_to("/nonexistent/gone.nii.gz")
    save(c.t1, root / "imagesTr/half_0000.nii.gz")
    (root / "labelsTr/half.nii.gz").symlink_to("/nonexistent/half.nii.gz")
    write_json(root / "dataset.json", {"labels": {"background": 0, **{n: v for v, n in c.kept}}})
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1, result.stdout
    lines = failure_lines(result)
    assert (
        lines["gone"] == "gone: imagesTr/gone_0000.nii.gz: broken symbolic link (its target does not exist)"
    )
    assert lines["half"] == "half: labelsTr/half.nii.gz: broken symbolic link (its target does not exist)"
    assert "scans: 1 converted, 0 skipped, 2 failed" in result.stdout
    verified = run_cli("verify", root, tmp_path / "store")
    assert (
        verified.returncode == 1
        and "gone: imagesTr/gone_0000.nii.gz: broken symbolic link" in verified.stdout
    )


def test_a_num_training_that_disagrees_with_the_folder_is_said(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "a")
    one_case(root, "b")
    write_json(root / "dataset.json", v2_dataset_json(c.kept, num_training=3))
    result = convert(root, tmp_path / "store")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "preprocess: warning: dataset.json's numTraining is 3, but imagesTr/ holds 2 cases "
        "(the folder is what is converted)"
    ) in result.stderr


def test_an_upper_case_ending_is_named_not_left_out(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    save(c.t1, tmp_path / "b4.nii.gz")
    (root / "imagesTr/b4_0000.NII.GZ").write_bytes((tmp_path / "b4.nii.gz").read_bytes())
    one_case(root, "lab")
    (root / "labelsTr/lab.nii.gz").rename(root / "labelsTr/lab.NII.GZ")
    write_json(root / "dataset.json", v2_dataset_json(c.kept))
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    lines = failure_lines(result)
    assert (
        lines["b4"]
        == "b4: imagesTr/b4_0000.NII.GZ: its file ending is not .nii.gz (letter case matters): rename it"
    )
    assert (
        lines["lab"]
        == "lab: labelsTr/lab.NII.GZ: its file ending is not .nii.gz (letter case matters): rename it"
    )
    assert "scans: 1 converted, 0 skipped, 2 failed" in result.stdout  # one line a case


def test_an_itk_vector_image_says_how_to_give_its_components(tmp_path):
    import nibabel as nib

    c = colin()
    root = tmp_path / "ds"
    one_case(root, "good")
    vector = np.zeros((6, 5, 4, 1, 2), np.float32)
    nib.save(nib.Nifti1Image(vector, np.eye(4)), root / "imagesTr/vec_0000.nii.gz")
    save(c.labels, root / "labelsTr/vec.nii.gz")
    write_json(root / "dataset.json", v2_dataset_json(c.kept))
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert failure_lines(result)["vec"] == (
        "vec: imagesTr/vec_0000.nii.gz: image of shape [6, 5, 4, 1, 2] is a vector image (ITK's components "
        "in a 5th axis), which is not read: save each component as its own channel file (vec_0000, _0001, ...)"
    )


def test_a_dataset_json_naming_its_files_is_refused_saying_what_to_do(tmp_path):
    c = colin()
    root = tmp_path / "ds"
    one_case(root, "x1")
    doc = {
        **v2_dataset_json(c.kept),
        "dataset": {"x1": {"images": ["data/x1.nii.gz"], "label": "data/x1s.nii.gz"}},
    }
    write_json(root / "dataset.json", doc)
    result = convert(root, tmp_path / "store")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f'scancache preprocess: error: {root / "dataset.json"}: its "dataset" mapping (each case\'s files '
        "named) is not read: put the files in imagesTr/ (case_0000.nii.gz, ...) and labelsTr/ (case.nii.gz), "
        "nnU-Net's default layout"
    )

"""Real NIfTI datasets for tests, built from Debian's mricron-data (Colin27 T1 and AAL atlas).

The package installs ``ch2.nii.gz`` (T1), ``ch2bet.nii.gz`` (the same brain-extracted) and
``aal.nii.gz`` (116 labelled regions, names in ``aal.nii.txt``: ``index name code`` per line),
all 181 x 217 x 181 at 1 mm, RAS, sform only. ``.ci/run`` installs it; tests skip without it.
scancache ships none of these files (docs/user-guide.md, "Test data": their licence terms).

To keep tests fast every image is a 48 x 56 x 40 crop (``img.slicer``, which keeps the affine
right) and only the ``KEPT`` largest regions of the crop keep their label; the others are 0.
"""

from __future__ import annotations

import functools
import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TEMPLATES = Path("/usr/share/mricron/templates")
T1, T1_BET, ATLAS, ATLAS_NAMES = (
    TEMPLATES / n for n in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")
)
CROP = (slice(60, 108), slice(80, 136), slice(70, 110))  # 48 x 56 x 40 voxels through the brain
KEPT = 10


def mricron_missing() -> str | None:
    """Why the mricron-data tests cannot run (None: they can)."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        return "nibabel is not installed (pip install scancache[service])"
    missing = [p.name for p in (T1, T1_BET, ATLAS, ATLAS_NAMES) if not p.is_file()]
    if missing:
        return f"Debian package mricron-data is not installed ({', '.join(missing)} missing; apt-get install mricron-data)"
    return None


requires_mricron = pytest.mark.skipif(mricron_missing() is not None, reason=str(mricron_missing()))


def aal_names() -> dict[int, str]:
    """AAL label value -> region name, from ``aal.nii.txt``."""
    names = {}
    for line in ATLAS_NAMES.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


@dataclass(frozen=True)
class Colin:
    t1: object  # nibabel Nifti1Image, cropped
    t1_bet: object
    labels: object  # uint8 label map, only the KEPT regions
    kept: tuple[tuple[int, str], ...]  # (AAL value, name), increasing value
    all_labels: object  # the crop's labels with every region kept


@functools.lru_cache(maxsize=1)
def colin() -> Colin:
    import nibabel as nib

    t1, bet, atlas = (nib.load(p).slicer[CROP] for p in (T1, T1_BET, ATLAS))
    full = np.asarray(atlas.dataobj)
    values, counts = np.unique(full[full > 0], return_counts=True)
    keep = sorted(int(v) for v in values[np.argsort(-counts, kind="stable")[:KEPT]])
    kept_map = np.where(np.isin(full, keep), full, 0).astype(np.uint8)
    names = aal_names()
    return Colin(
        t1=nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine, t1.header),
        t1_bet=nib.Nifti1Image(np.asarray(bet.dataobj), bet.affine, bet.header),
        labels=nib.Nifti1Image(kept_map, atlas.affine, atlas.header),
        kept=tuple((v, names[v]) for v in keep),
        all_labels=nib.Nifti1Image(full.copy(), atlas.affine, atlas.header),
    )


# -- known transforms ----------------------------------------------------------------------------
def flip_permute(img):
    """A copy with axes permuted and one flipped, and the affine that keeps the same world image:
    ``new[a, b, c] = old[n0 - 1 - b, c, a]``."""
    import nibabel as nib

    old = np.asarray(img.dataobj)
    n0 = old.shape[0]
    new = np.ascontiguousarray(old.transpose(2, 0, 1)[:, ::-1, :])
    # new index (a, b, c, 1) -> old index (n0 - 1 - b, c, a, 1)
    new_to_old = np.array([[0, -1, 0, n0 - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return nib.Nifti1Image(new, img.affine @ new_to_old)


def qform_only(img, shift=(3.5, -2.0, 7.0)):
    """A copy whose header has only a qform (sform_code 0, a decoy sform matrix beside it);
    its best affine is the source's shifted by ``shift`` mm. Returns (image, that affine)."""
    import nibabel as nib

    qaffine = img.affine.copy()
    qaffine[:3, 3] += shift
    out = nib.Nifti1Image(np.asarray(img.dataobj), None)
    out.header.set_qform(qaffine, code=1)
    out.header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=0)  # ignored: code 0
    return out, qaffine


SLOPE, INTER = 0.5, -10.0


def save_scaled(img, path: Path, slope: float = SLOPE, inter: float = INTER, raw_dtype=np.int16) -> None:
    """Save ``img``'s values as raw integers (int16) with scl_slope/scl_inter set in the header,
    so nibabel reads ``raw * slope + inter`` (the header fields are written by hand: nibabel
    would choose its own scaling when saving)."""
    import nibabel as nib

    raw = np.asarray(img.dataobj).astype(raw_dtype)
    plain = nib.Nifti1Image(raw, img.affine)
    plain.set_data_dtype(raw_dtype)
    data = bytearray(plain.to_bytes())
    assert struct.unpack_from("<i", data, 0)[0] == 348, "nibabel wrote a little-endian NIfTI-1 header"
    struct.pack_into("<ff", data, 112, slope, inter)  # scl_slope, scl_inter
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))


def save(img, path: Path) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


# -- datasets --------------------------------------------------------------------------------------
def v2_dataset_json(kept, channels=("T1",), ending=".nii.gz", num_training=None) -> dict:
    labels = {"background": 0, **{name: value for value, name in kept}}
    doc = {
        "channel_names": {str(k): n for k, n in enumerate(channels)},
        "labels": labels,
        "file_ending": ending,
        "name": "Colin27 AAL crop (mricron-data)",
    }
    return doc if num_training is None else {**doc, "numTraining": num_training}


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


# case -> what it is; every case of build_v2_dataset
V2_CASES = ("colin_aniso", "colin_flip", "colin_qform", "colin_ras", "colin_scaled")
ANISO_ZOOMS = (0.7, 1.3, 2.5)  # colin_aniso's voxel size along its source axes (R, A, S)


def anisotropic(img, zooms=ANISO_ZOOMS):
    """The same voxels on a grid of other voxel sizes (a different world image, on purpose)."""
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([*zooms, 1.0]))


def build_v2_dataset(root: Path) -> Path:
    """nnU-Net v2 dataset, one channel: the crop as is, flipped/permuted, rescaled, qform-only,
    anisotropic (train) and the crop as a test case with a label (imagesTs/labelsTs)."""
    c = colin()
    save(anisotropic(c.t1), root / "imagesTr/colin_aniso_0000.nii.gz")
    save(anisotropic(c.labels), root / "labelsTr/colin_aniso.nii.gz")
    save(c.t1, root / "imagesTr/colin_ras_0000.nii.gz")
    save(c.labels, root / "labelsTr/colin_ras.nii.gz")
    save(flip_permute(c.t1), root / "imagesTr/colin_flip_0000.nii.gz")
    save(flip_permute(c.labels), root / "labelsTr/colin_flip.nii.gz")
    save_scaled(c.t1, root / "imagesTr/colin_scaled_0000.nii.gz")
    save(c.labels, root / "labelsTr/colin_scaled.nii.gz")
    q_image, _ = qform_only(c.t1)
    q_labels, _ = qform_only(c.labels)
    save(q_image, root / "imagesTr/colin_qform_0000.nii.gz")
    save(q_labels, root / "labelsTr/colin_qform.nii.gz")
    save(c.t1, root / "imagesTs/colin_test_0000.nii.gz")
    save(c.labels, root / "labelsTs/colin_test.nii.gz")
    write_json(root / "dataset.json", v2_dataset_json(c.kept, num_training=len(V2_CASES)))
    return root


def build_two_channel_dataset(root: Path) -> Path:
    """nnU-Net v2, two channels (T1 and brain-extracted T1), one case."""
    c = colin()
    save(c.t1, root / "imagesTr/colin2_0000.nii.gz")
    save(c.t1_bet, root / "imagesTr/colin2_0001.nii.gz")
    save(c.labels, root / "labelsTr/colin2.nii.gz")
    write_json(root / "dataset.json", v2_dataset_json(c.kept, channels=("T1", "T1 brain"), num_training=1))
    return root


def build_decathlon_dataset(root: Path) -> Path:
    """Decathlon form: labels value -> name, ``modality``, ``training``/``test`` lists, files
    without a channel suffix, uncompressed ``.nii``; two training cases and one test case."""
    c = colin()
    save(c.t1, root / "imagesTr/colin_003.nii")
    save(c.labels, root / "labelsTr/colin_003.nii")
    save(flip_permute(c.t1), root / "imagesTs/colin_004.nii")
    # a case id ending like a channel file: the training list says it is a whole image
    save(c.t1, root / "imagesTr/colin_0005.nii")
    save(c.labels, root / "labelsTr/colin_0005.nii")
    doc = {
        "name": "Colin27",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", **{str(v): n for v, n in c.kept}},
        "numTraining": 2,
        "numTest": 1,
        "training": [
            {"image": "./imagesTr/colin_003.nii", "label": "./labelsTr/colin_003.nii"},
            {"image": "./imagesTr/colin_0005.nii", "label": "./labelsTr/colin_0005.nii"},
        ],
        "test": ["./imagesTs/colin_004.nii"],
    }
    write_json(root / "dataset.json", doc)
    return root


# case -> the words its one failure line must hold
BAD_CASES = {
    "shape_off": "label grid [48, 56, 39] differs from the image's [48, 56, 40]",
    # shifted 1 mm: every voxel centre moves 1 mm
    "affine_off": "label affine differs from the image's (imagesTr/affine_off_0000.nii.gz): voxel centres up to 1 mm apart",
    "unknown_label": "is not in dataset.json's labels",
    "fraction": "label file is not integer-valued",
    "no_channel1": "missing channel 1 (T1 brain)",
    "label_only": "label file without an image in imagesTr/",
    "no_label": "no label file for this case of imagesTr/",
}


def build_bad_dataset(root: Path) -> Path:
    """Two-channel v2 dataset with one good case (``good``) and one case per kind of bad input."""
    import nibabel as nib

    c = colin()
    labels = np.asarray(c.labels.dataobj)

    def case(name, label_img=None, channels=2):
        save(c.t1, root / f"imagesTr/{name}_0000.nii.gz")
        if channels > 1:
            save(c.t1_bet, root / f"imagesTr/{name}_0001.nii.gz")
        if label_img is not None:
            save(label_img, root / f"labelsTr/{name}.nii.gz")

    case("good", c.labels)
    case("shape_off", nib.Nifti1Image(labels[:, :, :39].copy(), c.labels.affine))
    shifted = c.labels.affine.copy()
    shifted[0, 3] += 1.0
    case("affine_off", nib.Nifti1Image(labels, shifted))
    case("unknown_label", c.all_labels)
    fractional = labels.astype(np.float32)
    fractional[10, 10, 10] = 2.5
    case("fraction", nib.Nifti1Image(fractional, c.labels.affine))
    case("no_channel1", c.labels, channels=1)
    save(c.labels, root / "labelsTr/label_only.nii.gz")
    case("no_label", None)
    write_json(root / "dataset.json", v2_dataset_json(c.kept, channels=("T1", "T1 brain")))
    return root

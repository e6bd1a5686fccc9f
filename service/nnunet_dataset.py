"""nnU-Net raw datasets (and Medical Segmentation Decathlon ones): reading dataset.json, finding cases.

Layout (nnU-Net v2)::

    DATASET/dataset.json
    DATASET/imagesTr/<case>_0000.nii.gz, <case>_0001.nii.gz, ...   one file per image channel
    DATASET/labelsTr/<case>.nii.gz                                    integer label map
    DATASET/imagesTs/..., DATASET/labelsTs/...                        optional; labels optional

A case is a scan: its id is the case identifier, its split ``train`` (``imagesTr``) or ``test``
(``imagesTs``). ``dataset.json`` comes in two forms, both understood:

* nnU-Net v2: ``"labels": {"background": 0, "liver": 1}`` (name -> value), ``"channel_names":
  {"0": "CT"}``, ``"file_ending": ".nii.gz"``;
* Decathlon (and nnU-Net v1): ``"labels": {"0": "background", "1": "liver"}`` (value -> name),
  ``"modality": {"0": "CT"}``; its ``training``/``test`` lists are not needed, the folders are
  read (Decathlon's own files have no ``_0000`` suffix: a file ``<case>.nii.gz`` is the whole
  image, several channels then along its 4th axis).

Class c is the c-th non-background label in increasing value (background: value 0). Only names
and folders are read here (on the client); ``service/nifti_source.py`` reads the voxels on a
worker. A problem with one case is a ``SourceError`` for that case only; a dataset.json that
cannot be used is a ``DatasetError`` (nothing can be converted).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.sources import Discovery, ScanOptions, ScanSpec, refuse_unlistable
from store.errors import EmptySource, InvalidPath, ScanCacheError, SourceError
from store.format import validate_scan_id

DATASET_JSON = "dataset.json"
NIFTI_KIND = "nifti"
NIFTI_ENDINGS = (".nii.gz", ".nii")
FOLDERS = (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test"))
_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})", re.ASCII)  # fullmatch: "$" passes a final "\n"


class DatasetError(ScanCacheError, ValueError):
    """A dataset.json that does not parse or cannot be used: names the file and why."""


@dataclass(frozen=True)
class DatasetInfo:
    """What dataset.json says about every case."""

    labels: tuple[tuple[int, str], ...]  # (value, name) of each non-background label, increasing
    channel_names: tuple[str, ...]  # empty when dataset.json declares none
    file_endings: tuple[str, ...]
    # Decathlon: image file names its training/test lists give; such a file is a whole image
    # even when its name ends like a channel file (``case_0001.nii.gz``)
    listed_images: frozenset[str] = frozenset()
    num_training: int | None = None  # dataset.json's numTraining, when it gives one

    def options(self) -> ScanOptions:
        return ScanOptions(
            class_names=tuple(name for _, name in self.labels),
            label_values=tuple(value for value, _ in self.labels),
            channel_names=self.channel_names,
        )


def is_dataset(root: Path) -> bool:
    return (root / DATASET_JSON).is_file()


def read_dataset_json(root: Path) -> DatasetInfo:
    path = root / DATASET_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is fine
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: does not parse as JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read it ({type(err).__name__})") from None
    except RecursionError:  # "maximum recursion depth exceeded", naming no file
        raise DatasetError(f"{path}: nested too deeply to be a dataset.json") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: must hold a JSON object")
    if "labels" not in doc:
        raise DatasetError(f'{path}: has no "labels"')
    if isinstance(
        doc.get("dataset"), dict
    ):  # nnU-Net v2's explicit file list: it, not the folders, is the data
        raise DatasetError(
            f'{path}: its "dataset" mapping (each case\'s files named) is not read: put the files in '
            "imagesTr/ (case_0000.nii.gz, ...) and labelsTr/ (case.nii.gz), nnU-Net's default layout"
        )
    labels = _labels(path, doc["labels"])
    names = doc.get("channel_names", doc.get("modality"))
    channel_names = () if names is None else _channel_names(path, names)
    ending = doc.get("file_ending")
    endings: tuple[str, ...]
    if ending is None:
        endings = NIFTI_ENDINGS
    elif ending in NIFTI_ENDINGS:
        endings = (str(ending),)
    else:
        raise DatasetError(
            f"{path}: file_ending {ending!r} is not NIfTI; scancache reads {' and '.join(NIFTI_ENDINGS)}"
        )
    count = doc.get("numTraining")
    num_training = count if isinstance(count, int) and not isinstance(count, bool) else None
    return DatasetInfo(labels, channel_names, endings, _listed_images(doc), num_training)


def _listed_images(doc: dict[str, Any]) -> frozenset[str]:
    """The file names of the images in a Decathlon dataset.json's ``training`` and ``test``
    lists (``{"image": "./imagesTr/x.nii.gz", ...}`` or ``"./imagesTs/x.nii.gz"``)."""
    names = set()
    for entry in [*(doc.get("training") or []), *(doc.get("test") or [])]:
        image = entry.get("image") if isinstance(entry, dict) else entry
        if isinstance(image, str):
            names.add(image.replace("\\", "/").rsplit("/", 1)[-1])
    return frozenset(names)


def _plain_labels_advice(raw: dict[str, Any]) -> str:
    """What to write instead of nnU-Net's region-based labels: each label value once (named
    ``label <v>``), the regions then selected as overlapping CATEGORIES of those names."""
    values: set[int] = set()
    for value in raw.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                values.add(v)
    plain = ", ".join(f'"label {v}": {v}' for v in sorted(values))
    regions = [
        tuple(
            f"label {v}"
            for v in (value if isinstance(value, list) else [value])
            if isinstance(v, int) and v > 0
        )
        for value in raw.values()
    ]
    example = ", ".join(repr(r if len(r) > 1 else r[0]) for r in regions if r)
    return f"give each value its own label ({plain}) and select the regions as overlapping CATEGORIES: ({example})"


def _labels(path: Path, raw: Any) -> tuple[tuple[int, str], ...]:
    """(value, name) of each non-background label, from either form of ``labels``."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{path}: "labels" must be a non-empty object')
    found: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            raise DatasetError(f"{path}: label {key!r} is a region ({value}); {_plain_labels_advice(raw)}")
        if isinstance(value, str) and re.fullmatch(r"\d+", str(key)):  # Decathlon: value -> name
            number, name = int(key), value
        elif (as_number := _label_number(value)) is not None:  # nnU-Net v2: name -> value
            number, name = as_number, str(key)
        else:
            raise DatasetError(
                f"{path}: label {key!r}: {value!r} is neither name -> integer value (nnU-Net v2) "
                "nor value -> name (Decathlon)"
            )
        if number < 0:
            raise DatasetError(f"{path}: label {name!r} has a negative value {number}")
        if number in found:
            raise DatasetError(f"{path}: labels {found[number]!r} and {name!r} have the same value {number}")
        found[number] = name
    pairs = tuple(sorted((v, n) for v, n in found.items() if v != 0))  # value 0 is background
    if not pairs:
        raise DatasetError(f'{path}: "labels" names no label besides background (value 0)')
    return pairs


def _label_number(value: Any) -> int | None:
    """A v2 label value as nnU-Net reads it (``int(value)``): an integer, a whole float such as
    ``1.0``, or a string of digits such as ``"1"``; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def _channel_names(path: Path, raw: Any) -> tuple[str, ...]:
    """``channel_names`` / ``modality``: {"0": name, "1": name, ...}, channels 0..K-1."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{path}: "channel_names" (or "modality") must be a non-empty object')
    try:
        numbered = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise DatasetError(f"{path}: channel_names keys must be channel numbers 0, 1, ...") from None
    if sorted(numbered) != list(range(len(numbered))):
        raise DatasetError(f"{path}: channel_names must number the channels 0..{len(numbered) - 1}")
    return tuple(numbered[k] for k in range(len(numbered)))


def _strip_ending(name: str, endings: tuple[str, ...]) -> str | None:
    for ending in endings:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def _listing(root: Path, folder: str, endings: tuple[str, ...]) -> list[tuple[str, str]]:
    """(stem, relative path) of the NIfTI files in a dataset folder, sorted; others ignored."""
    where = root / folder
    if not where.is_dir():
        return []
    out = []
    try:
        entries = sorted(where.iterdir())
    except OSError as err:  # refused, not skipped: its cases would look gone
        refuse_unlistable(err, root, root)
    for entry in entries:
        stem = _strip_ending(entry.name, endings)
        if stem is not None and not entry.name.startswith(".") and entry.is_file():
            out.append((stem, f"{folder}/{entry.name}"))
    return out


BROKEN_LINK = "broken symbolic link (its target does not exist)"


def _broken_links(root: Path, folder: str, endings: tuple[str, ...]) -> list[tuple[str, str]]:
    """(stem, relative path) of the links in a dataset folder whose target is gone: their
    cases fail naming them, rather than vanishing (a link is not a file)."""
    where = root / folder
    if not where.is_dir():
        return []
    out = []
    for entry in sorted(where.iterdir()):
        stem = _strip_ending(entry.name, endings)
        if stem is not None and entry.is_symlink() and not entry.exists():
            out.append((stem, f"{folder}/{entry.name}"))
    return out


def _odd_case_endings(root: Path, folder: str) -> list[tuple[str, str]]:
    """(stem, relative path) of the files whose ending is NIfTI's in other letter case
    (``.NII.GZ``): never read, so their cases are named rather than left out."""
    where = root / folder
    if not where.is_dir():
        return []
    out = []
    for entry in sorted(where.iterdir()):
        lower = entry.name.lower()
        ending = next((e for e in NIFTI_ENDINGS if lower.endswith(e)), None)
        if (
            ending is not None
            and _strip_ending(entry.name, NIFTI_ENDINGS) is None
            and not entry.name.startswith(".")
        ):
            out.append((entry.name[: -len(ending)], f"{folder}/{entry.name}"))
    return out


def _case_of(stem: str) -> str:
    match = _CHANNEL_FILE.fullmatch(stem)
    return stem if match is None else match["case"]


def _other_endings(
    root: Path, folders: tuple[str, ...], info: DatasetInfo, whole_files: bool = False
) -> dict[str, str]:
    """case -> its first NIfTI file whose ending is not dataset.json's ``file_ending`` (e.g.
    ``.nii`` beside ``.nii.gz`` files): such a file is not read, and its case says why."""
    other = tuple(e for e in NIFTI_ENDINGS if e not in info.file_endings)
    out: dict[str, str] = {}
    for folder in folders:
        # and those whose NIfTI ending is in other letter case (.NII.GZ): never read either
        found = (_listing(root, folder, other) if other else []) + _odd_case_endings(root, folder)
        for stem, rel in found:
            channel_file = folder.startswith("images") and not whole_files
            out.setdefault(_case_of(stem) if channel_file else stem, rel)
    return out


def _with_another_ending(root: Path, stem: str, info: DatasetInfo) -> str | None:
    """``stem`` + a NIfTI ending other than dataset.json's, where such a file exists."""
    for ending in NIFTI_ENDINGS:
        if ending not in info.file_endings and (root / f"{stem}{ending}").is_file():
            return f"{stem}{ending}"
    return None


def _ending_problem(info: DatasetInfo, rel: str = "") -> str:
    if _strip_ending(rel.lower(), NIFTI_ENDINGS) is not None and _strip_ending(rel, NIFTI_ENDINGS) is None:
        return f"its file ending is not {' or '.join(info.file_endings)} (letter case matters): rename it"
    return f"its file ending is not dataset.json's file_ending {info.file_endings[0]!r} (file not read)"


def discover_dataset(root: Path) -> Discovery:
    """The dataset's cases as ``ScanSpec``s (kind ``nifti``) and the cases that cannot be
    converted as failures. Raises ``DatasetError`` for an unusable dataset.json and
    ``EmptySource`` when no folder holds an image."""
    info = read_dataset_json(root)
    found = Discovery(root=root)
    seen: dict[str, str] = {}  # case -> the images folder it was found in
    image_stems: set[str] = set()
    training_cases = 0
    listings = {images: _listing(root, images, info.file_endings) for images, _, _ in FOLDERS}
    on_disk = {rel.rsplit("/", 1)[-1] for files in listings.values() for _, rel in files}
    # Decathlon's own layout: the files its lists name are there as they are named, each a
    # whole image (modalities in a 4th axis), so an unlisted one is a whole image too, however
    # its name ends ("amos_0005.nii.gz" is case amos_0005, not channel 5 of case amos).
    # nnU-Net v1 lists "la_003.nii.gz" but holds "la_003_0000.nii.gz": channel files.
    whole_files = bool(info.listed_images & on_disk)
    if whole_files:
        found.notes.extend(_unlisted_note(info, on_disk))
    for images, labels, split in FOLDERS:
        image_files = listings[images]
        image_stems.update(stem for stem, _ in image_files)
        label_files = _listing(root, labels, info.file_endings)
        channels: dict[str, dict[int | None, list[str]]] = defaultdict(lambda: defaultdict(list))
        for stem, rel in image_files:
            match = _CHANNEL_FILE.fullmatch(stem)
            if match is None or whole_files:  # Decathlon: one file
                channels[stem][None].append(rel)
            else:
                channels[match["case"]][int(match["channel"])].append(rel)
        label_of: dict[str, list[str]] = defaultdict(list)
        for stem, rel in label_files:
            label_of[stem].append(rel)
        broken: dict[str, str] = {}  # case -> its first file whose link is broken
        for stem, rel in _broken_links(root, images, info.file_endings):
            broken.setdefault(stem if whole_files else _case_of(stem), rel)
        for stem, rel in _broken_links(root, labels, info.file_endings):
            broken.setdefault(stem, rel)
        for case in sorted(set(broken) - set(channels)):
            found.failures.append(SourceError(case, broken[case], BROKEN_LINK))
        other = _other_endings(root, (images, labels), info, whole_files)
        for case in sorted(set(other) - set(channels)):
            found.failures.append(SourceError(case, other[case], _ending_problem(info, other[case])))
        for case in sorted(set(label_of) - set(channels) - set(other) - set(broken)):
            found.failures.append(
                SourceError(case, label_of[case][0], f"label file without an image in {images}/")
            )
        if split == "train":
            training_cases = len(channels)
        for case in sorted(channels):
            try:
                if case in seen:
                    raise SourceError(case, f"{images}/", f"case also in {seen[case]}/")
                seen[case] = images
                if case in broken:  # none of its files read: the link names what to mend
                    raise SourceError(case, broken[case], BROKEN_LINK)
                # its label file with the other ending, or any of its files in other letter case
                odd_case = case in other and _strip_ending(other[case], NIFTI_ENDINGS) is None
                if (case not in label_of and case in other) or odd_case:
                    raise SourceError(case, other[case], _ending_problem(info, other[case]))
                found.scans.append(
                    _case_spec(
                        root, info, case, split, images, labels, channels[case], label_of.get(case, [])
                    )
                )
            except SourceError as err:
                found.failures.append(err)
    found.notes.extend(_notes(info, image_stems))
    if info.num_training is not None and info.num_training != training_cases:
        # nnU-Net's verify_dataset_integrity refuses this; a download that lost files shows so
        found.notes.append(
            f"dataset.json's numTraining is {info.num_training}, but imagesTr/ holds {training_cases} "
            f"case{'' if training_cases == 1 else 's'} (the folder is what is converted)"
        )
    if not image_stems:
        hint = ""
        if any(_other_endings(root, (images,), info) for images, _, _ in FOLDERS):
            hint = f" (its NIfTI files end otherwise: dataset.json's file_ending is {info.file_endings[0]!r})"
        raise EmptySource(
            f"{root}: has a dataset.json but no {' or '.join(info.file_endings)} images in imagesTr/ or imagesTs/{hint}"
        )
    return found


SHOWN_MISSING = 5  # listed-but-absent image names a warning shows


def _unlisted_note(info: DatasetInfo, on_disk: set[str]) -> list[str]:
    """A warning naming the images a Decathlon dataset.json's lists leave out (added after
    it was written): converted all the same, as cases of their own."""
    unlisted = sorted(on_disk - info.listed_images)
    if not unlisted:
        return []
    more = f" and {len(unlisted) - SHOWN_MISSING} more" if len(unlisted) > SHOWN_MISSING else ""
    return [
        f"dataset.json's training/test lists leave out {len(unlisted)} image(s) of imagesTr/ or imagesTs/: "
        f"{', '.join(unlisted[:SHOWN_MISSING])}{more} (converted, each a case of its own)"
    ]


def _notes(info: DatasetInfo, stems: set[str]) -> list[str]:
    """Warnings on dataset.json as a whole: nnU-Net's ``ignore`` label, and images its
    training/test lists name that no folder holds (a download that lost files)."""
    notes = []
    for value, name in info.labels:
        if name == "ignore":
            notes.append(
                f"dataset.json's label 'ignore' (value {value}) is nnU-Net's label for unannotated "
                "voxels: scancache stores it as an ordinary class named 'ignore' (docs/user-guide.md: "
                "select it in CATEGORIES to mask those voxels out of a loss)"
            )
    cases = stems | {match["case"] for stem in stems if (match := _CHANNEL_FILE.fullmatch(stem))}
    missing = sorted(
        name for name in info.listed_images if (_strip_ending(name, NIFTI_ENDINGS) or name) not in cases
    )
    if missing:
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        notes.append(
            f"dataset.json lists {len(missing)} image(s) that imagesTr/ and imagesTs/ do not hold: "
            f"{', '.join(missing[:SHOWN_MISSING])}{more} (the folders are what is converted)"
        )
    return notes


def _case_spec(
    root: Path,
    info: DatasetInfo,
    case: str,
    split: str,
    images: str,
    labels: str,
    files: dict[int | None, list[str]],
    label_files: list[str],
) -> ScanSpec:
    first = next(iter(files.values()))[0]
    try:
        validate_scan_id(case)
    except InvalidPath:
        raise SourceError(
            case, first, "case identifier not usable as a scan id (letters, digits, '.', '_', '-')"
        ) from None
    for paths in [*files.values(), label_files]:
        if len(paths) > 1:
            raise SourceError(case, paths[1], f"duplicate file (also {paths[0]})")
    ending = next(e for e in info.file_endings if first.endswith(e))
    if None in files:
        if len(files) > 1:
            numbered = next(paths[0] for key, paths in files.items() if key is not None)
            raise SourceError(case, numbered, f"case given both as {first} and as channel files")
        image_files: tuple[str, ...] = (files[None][0],)  # channels (if several) along the 4th axis
    else:
        count = len(info.channel_names) or max(k for k in files if k is not None) + 1
        for k in sorted(k for k in files if k is not None and k >= count):
            declared = f"{count} channel{'s' if count > 1 else ''}"
            raise SourceError(case, files[k][0], f"channel {k}, but dataset.json declares {declared}")
        for k in range(count):
            if k not in files:
                misnamed = _with_another_ending(root, f"{images}/{case}_{k:04d}", info)
                if misnamed is not None:  # there, but not read: named, as a case's only file is
                    raise SourceError(case, misnamed, _ending_problem(info))
                name = f" ({info.channel_names[k]})" if info.channel_names else ""
                raise SourceError(case, f"{images}/{case}_{k:04d}{ending}", f"missing channel {k}{name}")
        image_files = tuple(files[k][0] for k in range(count))
    if not label_files and split == "train":
        raise SourceError(case, f"{labels}/{case}{ending}", f"no label file for this case of {images}/")
    return ScanSpec(
        case,
        str(root),
        NIFTI_KIND,
        split,
        None,
        None,
        None,
        image_files,
        tuple(label_files[:1]),
        info.options(),
    )

"""MedSegPy inputs: finding scans in a source folder, checking them, and reading them whole.

Two input formats (the same ones MedSegPy reads):

* 2D slice-wise: ``<subject:07d>_V<visit:02d>-Aug<aug:02d>_<slice:03d>.im`` (HDF5 dataset
  ``data``, H x W x 1) and the ``.seg`` beside it (dataset ``data``, H x W x 1 x C, binary).
  The scan key is the name without ``_<slice>``; slices are 1-indexed and contiguous.
* 3D: ``<stem>.h5`` holding ``volume`` (H x W x D) and optionally ``seg`` (H x W x D x C) and
  a ``spacing`` attribute; the scan key is the stem.

The first-level folder under the source becomes the scan's ``split`` (``train``/``valid``/...).
A folder holding a ``dataset.json`` is an nnU-Net raw dataset instead (NIfTI files:
``service/nnunet_dataset.py`` finds its cases, ``service/nifti_source.py`` reads them).
Discovery only looks at names and folders (cheap, on the client, no HDF5); reading and checking
a scan's files is ``service.slice_files`` (on a Dask worker). Every problem is a
``SourceError`` whose message is one line: ``scan: file: why``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from store.errors import EmptySource, InvalidPath, SourceError, SourceUnreadable, shown_name
from store.format import FORMAT_VERSION, ChunkLayout, validate_scan_id

IMAGE_SUFFIX, MASK_SUFFIX, VOLUME_SUFFIX = ".im", ".seg", ".h5"
# fullmatch (a "$" passes a final "\n") of ASCII digits (\d alone takes other scripts' digits)
_SLICE_NAME = re.compile(
    r"(?P<key>(?P<subject>\d+)_V(?P<visit>\d+)-Aug(?P<aug>\d+))_(?P<slice>\d+)", re.ASCII
)
_SCAN_KEY = re.compile(r"(?P<subject>\d+)_V(?P<visit>\d+)-Aug(?P<aug>\d+)", re.ASCII)
_NAME_HELP = "name does not parse as <subject>_V<visit>-Aug<aug>_<slice>"


@dataclass(frozen=True)
class ScanOptions:
    """What converting a scan needs besides its files, part of its fingerprint: given by the
    user for MedSegPy sources (``--class-names``, ``--spacing``) or by an nnU-Net dataset's
    ``dataset.json`` (class names, label values, channel names)."""

    class_names: tuple[str, ...] = ()
    spacing: tuple[float, float, float] | None = None  # mm, used where the source has none
    label_values: tuple[int, ...] = ()  # NIfTI: the source label value of each class
    channel_names: tuple[str, ...] = ()  # NIfTI: the image channels' names

    def to_json(self) -> dict[str, Any]:
        """The options given (empty for none: a scan without options keeps its fingerprint)."""
        out: dict[str, Any] = {}
        if self.class_names:
            out["class_names"] = list(self.class_names)
        if self.spacing is not None:
            out["spacing"] = list(self.spacing)
        if self.label_values:
            out["label_values"] = list(self.label_values)
        if self.channel_names:
            out["channel_names"] = list(self.channel_names)
        return out


@dataclass(frozen=True)
class ScanSpec:
    """One scan found in a source: which files make it up (paths relative to ``root``)."""

    scan_id: str
    root: str
    kind: str  # "2d", "3d" or "nifti" (service/nnunet_dataset.py)
    split: str | None
    subject_id: int | None
    time_point: int | None
    augmentation: int | None
    image_files: tuple[str, ...]  # 2D: one per slice, slice 1 first; 3D: the one .h5 file
    mask_files: tuple[str, ...] = ()  # 2D (and NIfTI: the label file); empty for an image-only scan
    options: ScanOptions = ScanOptions()
    # convert even if the store holds this scan from these very files (`preprocess --rebuild`):
    # a stored copy damaged after it was written (verify's MISMATCH) has an unchanged fingerprint
    rebuild: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        return self.image_files + self.mask_files

    def attrs(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "subject_id": self.subject_id,
            "time_point": self.time_point,
            "augmentation": self.augmentation,
            "source_format": self.kind,
        }


@dataclass
class Discovery:
    """Scans whose file set is well formed, and failures found from names and folders alone."""

    root: Path
    scans: list[ScanSpec] = field(default_factory=list)
    failures: list[SourceError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings on the source as a whole, one line each
    one_split: bool = False  # SOURCE is one split folder of its parent (a note says so)
    # folders whose scans were not read (unlistable, a link out of SOURCE, a name that is no
    # text): none of the store's scans is known to be gone, so --prune removes nothing
    unread_folders: list[str] = field(default_factory=list)


def refuse_unlistable(err: OSError, source: str | os.PathLike[str], root: Path) -> NoReturn:
    """Raise one line naming the folder of the source (``err.filename``, else ``root``) that
    cannot be listed (SOURCE itself, or an nnU-Net dataset's images folder): nothing to read."""
    folder = Path(os.fsdecode(err.filename)) if err.filename else root
    rel = folder.relative_to(root).as_posix() if folder.is_relative_to(root) and folder != root else ""
    shown = f"{os.fspath(source).rstrip('/')}/{rel}".rstrip("/") + "/"
    raise SourceUnreadable(
        f"{shown_name(shown)}: cannot list this folder ({err.strerror or type(err).__name__}); "
        "nothing was converted or pruned"
    ) from None


def _listable(source: str | os.PathLike[str], root: Path) -> None:
    try:
        os.listdir(root)
    except OSError as err:
        refuse_unlistable(err, source, root)


def _name_problem(name: str) -> str | None:
    """A folder name that is no text (bytes that are not UTF-8): a split is stored as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "folder name is not UTF-8 text (its scans are not read); rename it"
    return None


def _split_of(rel: Path) -> str | None:
    return rel.parts[0] if len(rel.parts) > 1 else None


def _ints(match: re.Match[str] | None) -> tuple[int | None, int | None, int | None]:
    if match is None:
        return None, None, None
    return int(match["subject"]), int(match["visit"]), int(match["aug"])


def discover(source: str | os.PathLike[str]) -> Discovery:
    """Group a source folder's files into scans. Files of other kinds are ignored.

    Raises ``EmptySource`` if the folder is missing, is a file, or holds no ``.im``/``.seg``/
    ``.h5`` file. Symbolic links (to folders or files) are followed when they point inside the
    source; one pointing outside it, a broken one or a loop is a failure line naming the link
    (the scan it belongs to is not converted).
    """
    root = Path(source).resolve()
    if root.is_file():
        raise EmptySource(f"{source}: is a file; SOURCE must be the folder holding the scans")
    if not root.is_dir():
        raise EmptySource(f"{source}: source folder does not exist")
    _listable(source, root)  # before dataset.json is looked for in it
    from service import nnunet_dataset  # imported here: it builds on this module's types

    if nnunet_dataset.is_dataset(root):  # an nnU-Net / Decathlon raw dataset, not MedSegPy files
        return nnunet_dataset.discover_dataset(root)
    found = Discovery(root=root)
    refused: set[str] = set()  # scan keys with a refused file: not converted at all
    visited = {str(root)}
    # key -> kind -> slice number -> [relative paths]; 3D files use slice number 0
    slices: dict[str, dict[str, dict[int, list[str]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    splits: dict[str, dict[str | None, str]] = defaultdict(dict)  # key -> split -> first file seen
    any_input = False

    def unread(folder: Path, name: str, why: str) -> None:
        rel = folder.relative_to(root).as_posix() + "/"
        found.failures.append(SourceError(name, rel, why))
        found.unread_folders.append(rel)

    def unlistable(err: OSError) -> None:  # a subfolder: its scans fail, the others convert
        folder = Path(os.fsdecode(err.filename)) if err.filename else root
        if folder == root:
            refuse_unlistable(err, source, root)
        unread(
            folder,
            folder.name,
            f"cannot list this folder ({err.strerror or type(err).__name__}); its scans are not read",
        )

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlistable):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".") and d != "lost+found"):
            link = Path(dirpath) / d
            why = (_link_problem(root, link, visited) if link.is_symlink() else None) or _name_problem(d)
            if why is None:
                kept.append(d)
                visited.add(os.path.realpath(link))
            elif why == LOOP_ALREADY_READ:  # its scans are read through the other path
                found.failures.append(SourceError(d, link.relative_to(root).as_posix() + "/", why))
            else:
                unread(link, d, why)
        dirnames[:] = kept
        for name in sorted(filenames):
            suffix = os.path.splitext(name)[1]
            if suffix not in (IMAGE_SUFFIX, MASK_SUFFIX, VOLUME_SUFFIX) or name.startswith("."):
                continue
            any_input = True
            rel = (Path(dirpath) / name).relative_to(root)
            stem = name[: -len(suffix)]
            link = Path(dirpath) / name
            why = _link_problem(root, link, None) if link.is_symlink() else None
            if suffix == VOLUME_SUFFIX:
                key, kind, number = stem, "3d", 0
            else:
                match = _SLICE_NAME.fullmatch(stem)
                if match is None:
                    found.failures.append(SourceError(stem, rel.as_posix(), _NAME_HELP))
                    continue
                key, kind, number = match["key"], suffix, int(match["slice"])
            if why is not None:
                found.failures.append(SourceError(key, rel.as_posix(), why))
                refused.add(key)
                continue
            slices[key][kind][number].append(rel.as_posix())
            splits[key].setdefault(_split_of(rel), rel.as_posix())
    if not any_input:
        if any((root / folder).is_dir() for folder in ("imagesTr", "imagesTs")):  # nnU-Net, unnamed
            raise EmptySource(
                f"{source}: has imagesTr/ or imagesTs/ but no {nnunet_dataset.DATASET_JSON}: an nnU-Net "
                "dataset needs one (its labels, channel names, file ending)"
            )
        parent = root.parent
        if any(root.glob("*.nii*")) and nnunet_dataset.is_dataset(parent):  # imagesTr/ given
            raise EmptySource(
                f"{source}: holds NIfTI files of the nnU-Net dataset {parent}; give that folder "
                f"(the one with {nnunet_dataset.DATASET_JSON}) as SOURCE"
            )
        raise EmptySource(f"{source}: no .im/.seg slices or .h5 volumes found")
    note = _one_split_note(source, root, splits)
    if note is not None:
        found.notes.append(note)
        found.one_split = True
    for key in sorted(set(slices) - refused):
        try:
            found.scans.append(_scan_spec(root, key, slices[key], splits[key]))
        except SourceError as err:
            found.failures.append(err)
    leak = subjects_in_several_splits(source, found.scans)
    if leak is not None:
        found.notes.append(leak)
    return found


def subjects_in_several_splits(source: str | os.PathLike[str], specs: list[ScanSpec]) -> str | None:
    """One line naming the subjects with scans in more than one split (a visit in train and
    another in valid: the model is then scored on a knee it trained on), or None."""
    by_subject: dict[int, set[str]] = defaultdict(set)
    for spec in specs:
        if spec.subject_id is not None and spec.split is not None:
            by_subject[spec.subject_id].add(spec.split)
    leaks = {subject: sorted(found) for subject, found in sorted(by_subject.items()) if len(found) > 1}
    if not leaks:
        return None
    shown = [f"subject {subject} ({', '.join(found)})" for subject, found in list(leaks.items())[:5]]
    more = f" and {len(leaks) - 5} more" if len(leaks) > 5 else ""
    return (
        f"{source}: {len(leaks)} subject{'s have' if len(leaks) > 1 else ' has'} scans in more than one split: "
        f"{', '.join(shown)}{more}; a model is then scored on a subject it trained on (one split "
        "folder per subject avoids it)"
    )


SPLIT_NAMES = frozenset({"train", "training", "valid", "val", "validation", "test", "testing"})


def _holds_input(folder: Path) -> bool:
    return any(p.suffix in (IMAGE_SUFFIX, MASK_SUFFIX, VOLUME_SUFFIX) for p in folder.iterdir())


def _one_split_note(
    source: str | os.PathLike[str], root: Path, splits: dict[str, dict[str | None, str]]
) -> str | None:
    """SOURCE given one level too deep (``src/train`` of ``src/{train,valid,test}``) stores its
    scans without a split (a store of the scans they already had, re-published so): a warning
    naming the parent. Not refused: a store of one split alone is a choice some make."""
    if root.name.lower() not in SPLIT_NAMES or any(None not in found for found in splits.values()):
        return None
    try:
        siblings = sorted(
            d.name for d in root.parent.iterdir()
            if d != root and d.name.lower() in SPLIT_NAMES and d.is_dir() and _holds_input(d)
        )  # fmt: skip
    except OSError:
        return None
    if not siblings:
        return None
    return (
        f"{source} is the {root.name!r} split of {root.parent} (beside {', '.join(siblings)}): its scans "
        f"have no split here; give {root.parent} as SOURCE to keep each scan's split"
    )


LOOP_ALREADY_READ = "symbolic link loop (points to a folder already read); not followed"


def _link_problem(root: Path, link: Path, visited: set[str] | None) -> str | None:
    """Why a symbolic link in the source is not followed (None: it is)."""
    real = os.path.realpath(link)
    if not os.path.exists(real):
        try:
            os.stat(link)
        except OSError as err:
            if err.errno == errno.ELOOP:  # links that point at each other: no target at all
                return "symbolic link loop (the links point at each other); not followed"
        return "broken symbolic link (its target does not exist)"
    if os.path.commonpath([str(root), real]) != str(root):
        return (
            "symbolic link to outside SOURCE; not followed (copy it in, or make SOURCE a folder holding both)"
        )
    if visited is not None and (real in visited or str(root).startswith(real + os.sep)):
        return LOOP_ALREADY_READ
    return None


def _scan_spec(
    root: Path, key: str, kinds: dict[str, dict[int, list[str]]], splits: dict[str | None, str]
) -> ScanSpec:
    if len(splits) > 1:
        (first_split, _), (second_split, second_file) = list(splits.items())[:2]
        raise SourceError(key, second_file, f"scan appears in two splits ({first_split} and {second_split})")
    split = next(iter(splits))
    try:
        validate_scan_id(key)
    except InvalidPath:
        raise SourceError(
            key, next(iter(splits.values())), "not usable as a scan id (letters, digits, '.', '_', '-' only)"
        ) from None
    subject, visit, aug = _ints(_SCAN_KEY.fullmatch(key))
    for numbers in kinds.values():
        for paths in numbers.values():
            if len(paths) > 1:
                raise SourceError(key, paths[1], f"duplicate slice (also {paths[0]})")
    if "3d" in kinds:
        path = kinds["3d"][0][0]
        other = kinds.get(IMAGE_SUFFIX) or kinds.get(MASK_SUFFIX)
        if other:
            first = next(iter(other.values()))[0]
            raise SourceError(key, path, f"scan also given as 2D slices ({first})")
        return ScanSpec(key, str(root), "3d", split, subject, visit, aug, (path,))
    images, masks = kinds.get(IMAGE_SUFFIX, {}), kinds.get(MASK_SUFFIX, {})
    if not images:
        first = masks[min(masks)][0]
        raise SourceError(key, first, "mask slices without any image slice (.im)")
    image_files = _contiguous(key, images, IMAGE_SUFFIX)
    mask_files: tuple[str, ...] = ()
    if masks:
        for number in sorted(set(masks) - set(images)):
            raise SourceError(key, masks[number][0], "mask slice has no matching image slice")
        for number in sorted(set(images) - set(masks)):
            expected = images[number][0][: -len(IMAGE_SUFFIX)] + MASK_SUFFIX
            raise SourceError(key, expected, f"mask slice {number} missing (image slice exists)")
        mask_files = tuple(masks[n][0] for n in sorted(masks))
    return ScanSpec(key, str(root), "2d", split, subject, visit, aug, image_files, mask_files)


def _contiguous(key: str, numbers: dict[int, list[str]], suffix: str) -> tuple[str, ...]:
    """Slices must be exactly 1..N."""
    if 0 in numbers:
        raise SourceError(key, numbers[0][0], "slice number 0 (slices are 1-indexed)")
    last = max(numbers)
    missing = [n for n in range(1, last + 1) if n not in numbers]
    if missing:
        folder = Path(numbers[last][0]).parent
        expected = (folder / f"{key}_{missing[0]:03d}{suffix}").as_posix()
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SourceError(key, expected, f"missing slice {missing[0]}{more} of 1..{last}")
    return tuple(numbers[n][0] for n in range(1, last + 1))


# -- fingerprint ------------------------------------------------------------------------------
def fingerprint(spec: ScanSpec, layout: ChunkLayout) -> tuple[str, int]:
    """sha256 over the sources' (relative path, size, mtime), the layout and the scan's options
    (``ScanOptions``); and total bytes.

    Stat'ed before reading: a file changed while the job reads it gets a new fingerprint on
    the next run and is redone.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": FORMAT_VERSION, "layout": layout.to_json()}).encode())
    options = spec.options.to_json()
    if options:  # only then: scans converted before options existed keep their fingerprint
        digest.update(json.dumps(options, sort_keys=True).encode())
    total = 0
    for rel in sorted(spec.files):
        try:
            st = os.stat(Path(spec.root) / rel)
        except OSError as err:
            raise SourceError(spec.scan_id, rel, f"cannot stat ({err.strerror})") from None
        total += st.st_size
        digest.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest(), total

"""``export_nifti(predictions, out_dir)``: stored predictions as NIfTI files in the source's geometry.

One file per scan, ``OUT/<scan_id>.nii.gz``, that 3D Slicer or ITK-SNAP overlay on the original
image without a shift: the voxels go back from the store's orientation (NIfTI scans are stored
reoriented to (P, L, S)) to the source file's voxel order, and the file carries the source's
affine (``source_affine``; for MedSegPy scans the stored ``affine``, diag(spacing, 1)).

* Label map values: when every category is one class of the scan, the class's source label
  value (``label_values``: what the source label file used; 1..n for MedSegPy scans), so the
  export means what the source labels mean; when categories merge classes, 1..n in the
  categories' order. 0 is background either way.
* ``OUT/<scan_id>.json`` beside it names every value (``{"0": "background", "1": "liver"}``)
  and gives the Dice per class name.
* ``probabilities=True`` adds ``OUT/<scan_id>_probabilities.nii.gz``: float32 (x, y, z, c), the
  channels in the sidecar's ``channels`` order.

A prediction of some slices only is exported on the scan's whole grid (0 elsewhere). The
geometry comes from the prediction's attributes (recorded by ``write_predictions``); for
predictions written before they were recorded, pass the scan store (``scan_store=``).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from store.predictions import LABEL_MAP, PROBABILITIES, PredictionStore, check_predictions_root
from store.progress import Progress
from store.units import count_of

LABEL_SUFFIX = ".nii.gz"
PROBABILITIES_SUFFIX = "_probabilities.nii.gz"
SIDECAR_SUFFIX = ".json"
AFFINE_TOLERANCE = 1e-4  # mm: float32 rounding of a recorded affine, never a voxel's shift


@dataclass(frozen=True)
class ExportedScan:
    """The files written for one scan."""

    scan_id: str
    label_map: Path
    sidecar: Path
    probabilities: Path | None = None


@dataclass(frozen=True)
class _Geometry:
    """What the export needs of the scan a prediction was made on."""

    scan_shape: tuple[int, int, int]
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, ...] | None
    class_names: list[str]  # the scan's, one per mask channel
    label_values: list[int]  # the scan's, one per mask channel
    # the source file's sform and qform codes and its axes (``nifti_source``), when recorded
    source_header: dict[str, int] | None = None


def export_nifti(
    predictions: str | os.PathLike[str] | PredictionStore,
    out_dir: str | os.PathLike[str],
    *,
    scans: Sequence[str] | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    scan_store: str | os.PathLike[str] | Any | None = None,
    progress: bool | None = None,
    skip_existing: bool = False,
) -> list[ExportedScan]:
    """Export the predictions of ``scans`` (default: every scan with one) into ``out_dir``.

    Refuses, before writing anything, an unknown scan and scans already in ``out_dir`` (unless
    ``overwrite``, or ``skip_existing``: export only the scans not there yet, as after a run
    that stopped, e.g. on a full disk). ``scan_store`` (a store folder, a server URL or a ``ScanSource``) supplies
    the geometry of predictions that record none. ``progress`` (default: on a terminal or in a
    notebook) shows a bar of scans on stderr (``store.progress``)."""
    nib = _import_nibabel()
    store = predictions if isinstance(predictions, PredictionStore) else _open_predictions(predictions)
    available = store.scan_ids()
    if isinstance(scans, str):  # one scan id, not its characters
        scans = [scans]
    wanted = list(available) if scans is None else list(dict.fromkeys(scans))
    if not wanted:  # "exported 0 scans" would read as success (a run that wrote nothing)
        raise ValueError(f"{store.storage.url}: the predictions store holds no predictions")
    for scan_id in wanted:
        if not store.has(scan_id):
            raise ValueError(
                f"scan {scan_id!r} has no prediction in {store.storage.url} ({_listed(available)})"
            )
    if probabilities:  # refused before writing anything, not after half the scans' files
        for scan_id in wanted:
            store.stored_shape(scan_id, PROBABILITIES)  # ArrayNotFound: one line naming the scan
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; choose a folder")
    if overwrite and skip_existing:
        raise ValueError(
            "give --overwrite (overwrite=True) or --skip-existing (skip_existing=True), not both"
        )
    if not overwrite:
        # a scan is exported once its label map is there (renamed last): a sidecar or
        # probabilities without it are what an export stopped between renames left, replaced
        # without asking
        there = [scan_id for scan_id in wanted if _paths(out, scan_id, probabilities)[0].exists()]
        if there and not skip_existing:
            raise FileExistsError(
                f"{_paths(out, there[0], probabilities)[0]} exists ({count_of(len(there), 'scan')} of "
                f"{len(wanted)} already exported); pass --skip-existing (skip_existing=True) to export "
                "the others, or --overwrite (overwrite=True) to replace them"
            )
        # skipped: a scan with every file asked for (with --probabilities, a label map exported
        # without them is written again, probabilities included)
        complete = {s for s in there if all(p.exists() for p in _paths(out, s, probabilities))}
        wanted = [scan_id for scan_id in wanted if scan_id not in complete]
    source = _open_scan_store(scan_store)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    done = []
    try:
        with Progress(len(wanted), label="scancache export", enabled=progress) as bar:
            for scan_id in wanted:
                try:
                    done.append(_export_scan(nib, store, scan_id, out, probabilities, source))
                except OSError as err:  # a full disk: the scan and how far the run got, said
                    if type(err) is not OSError or err.errno is None:
                        raise
                    where = f"{err.filename}: " if err.filename else f"{out}: "
                    room = "once there is room, " if err.errno in _NO_ROOM else ""
                    raise OSError(
                        err.errno,
                        f"scan {scan_id!r}: {where}{err.strerror} ({len(done)} of {len(wanted)} exported; "
                        f"{room}run it again with --skip-existing)",
                    ) from None
                bar.advance(scan_id)
    except BaseException:
        if made and not any(out.iterdir()):  # refused at the first scan: leave no empty folder
            out.rmdir()
        raise
    return done


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


def _import_nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise RuntimeError("the NIfTI export needs nibabel: pip install 'scancache[service]'") from None
    return nibabel


def _open_predictions(path: str | os.PathLike[str]) -> PredictionStore:
    check_predictions_root(path)
    return PredictionStore(path)


def _open_scan_store(scan_store: Any) -> Any:
    if scan_store is None or hasattr(scan_store, "metadata"):
        return scan_store
    from loaders.catalog import open_source

    return open_source(scan_store)


def _listed(scan_ids: Sequence[str], shown: int = 10) -> str:
    if not scan_ids:
        return "it has none"
    more = f", ... ({len(scan_ids)} in all)" if len(scan_ids) > shown else ""
    return "it has " + ", ".join(scan_ids[:shown]) + more


def _remove_partials(out: Path, scan_id: str) -> None:
    """The hidden files of a scan's export that was stopped (or killed) before its renames,
    probabilities included whether or not this export writes them."""
    for path in _paths(out, scan_id, probabilities=True):
        _partial(path).unlink(missing_ok=True)


def _paths(out: Path, scan_id: str, probabilities: bool) -> list[Path]:
    paths = [out / f"{scan_id}{LABEL_SUFFIX}", out / f"{scan_id}{SIDECAR_SUFFIX}"]
    return [*paths, out / f"{scan_id}{PROBABILITIES_SUFFIX}"] if probabilities else paths


def _has_scan(source: Any, scan_id: str) -> bool:
    try:
        source.metadata(scan_id)
    except KeyError:  # ScanNotFound
        return False
    return True


def _geometry(scan_id: str, attrs: dict[str, Any], source: Any) -> _Geometry:
    """From the prediction's attributes, else from the scan store's metadata."""
    if attrs.get("affine") is not None and attrs.get("scan_shape") is not None:
        if source is not None and not _has_scan(source, scan_id):  # given, so meant: not ignored
            raise ValueError(
                f"scan {scan_id!r}: the scan store given (--store, scan_store=) has no scan of that id, so it"
                " is not the store the prediction was made from (its geometry is recorded: leave --store out)"
            )
        found: dict[str, Any] = attrs
        names, values = attrs.get("scan_class_names"), attrs.get("label_values")
        if found.get("source_header") is None and source is not None:  # written before it was recorded
            found = {**attrs, "source_header": source.metadata(scan_id).attrs.get("source_header")}
    elif source is not None:
        try:
            meta = source.metadata(scan_id)
        except KeyError:  # ScanNotFound: say which store lacks it, not just "not found"
            raise ValueError(
                f"scan {scan_id!r}: its prediction records no geometry and the scan store given"
                " (--store, scan_store=) has no scan of that id; pass the store the prediction was made from"
            ) from None
        found = {
            "scan_shape": list(meta.shape),
            "affine": meta.affine,
            "source_affine": meta.source_affine,
            "source_shape": meta.attrs.get("source_shape"),
            "source_header": meta.attrs.get("source_header"),
        }
        names, values = meta.class_names, meta.label_values
    else:
        raise ValueError(
            f"scan {scan_id!r}: its prediction records no geometry (written by an older scancache);"
            " pass the scan store it was made from: --store STORE (scan_store=...)"
        )
    affine = np.asarray(found["affine"], np.float64)
    source_affine = np.asarray(found.get("source_affine") or found["affine"], np.float64)
    shape = found.get("source_shape")
    return _Geometry(
        tuple(int(n) for n in found["scan_shape"]),  # type: ignore[arg-type]
        affine,
        source_affine,
        None if shape is None else tuple(int(n) for n in shape),
        [str(n) for n in names or ()],
        [int(v) for v in values or ()],
        _header_of(found.get("source_header")),
    )


def _header_of(value: Any) -> dict[str, int] | None:
    """The recorded source header fields, if they are what ``nifti_source`` writes."""
    if not isinstance(value, dict):
        return None
    fields = {k: value.get(k) for k in ("sform_code", "qform_code", "ndim")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()):
        return None
    return fields  # type: ignore[return-value]


def _categories(attrs: dict[str, Any]) -> list[tuple[int, ...]] | None:
    """The prediction's categories as scan classes (every class when it selected all); None
    when the model gave another number of channels than its categories (``write_predictions``
    keeps such a prediction, without names): its categories are then no known classes."""
    count = int(attrs["channels"]) - int(bool(attrs.get("include_background")))
    found = attrs.get("categories")
    if not found:
        return [(k,) for k in range(count)]
    if len(found) != count:
        return None
    return [tuple(int(k) for k in g) if isinstance(g, list) else (int(g),) for g in found]


def _labels(attrs: dict[str, Any], geometry: _Geometry) -> tuple[np.ndarray, dict[str, str], bool]:
    """The table from stored label (0, k+1 = category k) to exported value, the sidecar's
    value -> name, and whether the values are the source's label values."""
    categories = _categories(attrs)
    if categories is None:  # values 1..n named by their number, never by a class they may not be
        count = int(attrs["channels"]) - int(bool(attrs.get("include_background")))
        values = list(range(1, count + 1))
        return (
            np.array([0, *values], np.min_scalar_type(count)),
            {"0": "background", **{str(v): f"category {v - 1}" for v in values}},
            False,
        )
    names = attrs.get("class_names")
    if not isinstance(names, list) or len(names) != len(categories):
        scan_names = geometry.class_names
        in_range = all(k < len(scan_names) for g in categories for k in g)
        names = [
            "+".join(scan_names[k] for k in g) if in_range else f"category {i}"
            for i, g in enumerate(categories)
        ]
    known = len(geometry.label_values)
    source_values = all(len(g) == 1 and g[0] < known for g in categories)
    values = (
        [geometry.label_values[g[0]] for g in categories] if source_values else list(range(1, len(names) + 1))
    )
    table = np.array([0, *values], np.int64)
    dtype = np.result_type(np.min_scalar_type(int(table.min())), np.min_scalar_type(int(table.max())))
    return (
        table.astype(dtype),
        {"0": "background", **{str(v): n for v, n in zip(values, names, strict=True)}},
        source_values,
    )


def _full_grid(scan_id: str, data: np.ndarray, attrs: dict[str, Any], geometry: _Geometry) -> np.ndarray:
    """A prediction of some slices placed on the scan's whole grid (0 elsewhere)."""
    slices = attrs.get("slices")
    if not slices:
        if tuple(data.shape[:3]) != geometry.scan_shape:
            raise ValueError(
                f"scan {scan_id!r}: the prediction is {data.shape[:3]}, but the scan is {geometry.scan_shape}"
            )
        return data
    full = np.zeros((*geometry.scan_shape, *data.shape[3:]), data.dtype)
    full[:, :, list(slices)] = data
    return full


def stored_to_source_ornt(affine: np.ndarray, source_affine: np.ndarray) -> np.ndarray | None:
    """The nibabel orientation (flips and a permutation) taking stored voxel order to the
    source's, read off the two affines: ``inv(affine) @ source_affine`` maps a source voxel
    index to a stored one, and its 3x3 part is then a signed permutation. None when it is not.
    (Not ``io_orientation`` of each affine: at an exact 45-degree tie nibabel may pick other
    axes for the stored affine than the ingest did for the source's.)"""
    index_map = np.linalg.solve(np.asarray(affine, np.float64), np.asarray(source_affine, np.float64))[:3, :3]
    signs = np.rint(index_map)
    if not np.allclose(index_map, signs, rtol=0, atol=1e-6) or not (
        (np.abs(signs).sum(axis=0) == 1).all() and (np.abs(signs).sum(axis=1) == 1).all()
    ):
        return None
    ornt = np.zeros((3, 2))
    for source_axis in range(3):
        stored_axis = int(np.flatnonzero(signs[:, source_axis])[0])
        ornt[stored_axis] = (source_axis, signs[stored_axis, source_axis])
    return ornt


def _to_source_order(nib: Any, scan_id: str, data: np.ndarray, geometry: _Geometry) -> np.ndarray:
    """Stored voxel order -> the source's: the flips/permutations between the two affines,
    checked to map the stored affine exactly onto the source affine."""
    from nibabel import orientations

    ornt = stored_to_source_ornt(geometry.affine, geometry.source_affine)
    if ornt is None or not np.allclose(
        geometry.affine @ orientations.inv_ornt_aff(ornt, data.shape[:3]),
        geometry.source_affine,
        rtol=0,
        atol=AFFINE_TOLERANCE,
    ):
        raise ValueError(
            f"scan {scan_id!r}: its stored affine is not its source affine up to axis flips and"
            " permutations; cannot export it on the source's grid"
        )
    moved = orientations.apply_orientation(data, ornt)
    if geometry.source_shape is not None and tuple(moved.shape[:3]) != geometry.source_shape[:3]:
        raise ValueError(
            f"scan {scan_id!r}: in source order the prediction is {moved.shape[:3]}, but the source"
            f" was {tuple(geometry.source_shape)}"
        )
    return np.ascontiguousarray(moved)


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (hidden; nibabel picks the
    format and compression by the name's ending, so .nii.gz stays last)."""
    suffix = LABEL_SUFFIX if path.name.endswith(LABEL_SUFFIX) else SIDECAR_SUFFIX  # (probabilities too)
    return path.with_name(f".{path.name.removesuffix(suffix)}.partial{suffix}")


def _write_nifti(
    nib: Any, path: Path, data: np.ndarray, affine: np.ndarray, header: dict[str, int] | None = None
) -> None:
    """``data`` with ``affine`` as sform and (where it can hold it exactly) qform, under the
    source's codes where recorded (``header``: 2 aligned, 4 MNI, ... ; a transform the source
    left unset stays unset), else the scanner's; a 2D source gets its two axes back."""
    if header is not None and header["ndim"] == 2 and data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)  # no scaling: the values are written as they are
    image.header.set_xyzt_units("mm")
    sform_code, qform_code = (1, 1) if header is None else (header["sform_code"], header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        # the source's affine came from its voxel sizes alone (nibabel's made-up one, which ITK
        # reads otherwise): written so too, so that every reader places both files alike
        image.set_sform(None, code=0)
        image.set_qform(None, code=0)
        nib.save(image, path)
        return
    image.set_sform(affine if sform_code else None, code=sform_code)
    image.set_qform(affine if qform_code else None, code=qform_code)
    if qform_code and not np.allclose(image.get_qform(), affine, rtol=0, atol=AFFINE_TOLERANCE):
        image.set_qform(None, code="unknown")  # a sheared affine: the sform alone holds it
        if not sform_code:
            image.set_sform(affine, code=qform_code)
    nib.save(image, path)


def _export_scan(
    nib: Any, store: PredictionStore, scan_id: str, out: Path, probabilities: bool, source: Any
) -> ExportedScan:
    attrs = store.attrs(scan_id)
    assert attrs is not None
    geometry = _geometry(scan_id, attrs, source)
    table, names, source_values = _labels(attrs, geometry)
    whole = tuple(slice(0, n) for n in store.shape(scan_id, LABEL_MAP))
    stored = store.read(scan_id, LABEL_MAP, whole)
    if int(stored.max(initial=0)) >= len(table):
        raise ValueError(f"scan {scan_id!r}: its label map has values beyond its {len(table) - 1} categories")
    labels = _to_source_order(nib, scan_id, _full_grid(scan_id, table[stored], attrs, geometry), geometry)
    label_path, sidecar_path, *rest = _paths(out, scan_id, probabilities)
    probabilities_path = rest[0] if probabilities else None
    # A scan's files are written under hidden names, then renamed, its label map last: an
    # interrupted export leaves no truncated file, and a label map in OUT_DIR has its sidecar
    # and probabilities beside it.
    try:
        _write_nifti(nib, _partial(label_path), labels, geometry.source_affine, geometry.source_header)
        if probabilities_path is not None:
            probs = store.read(scan_id, PROBABILITIES, whole).astype(np.float32)
            moved = _to_source_order(nib, scan_id, _full_grid(scan_id, probs, attrs, geometry), geometry)
            del probs
            _write_nifti(
                nib, _partial(probabilities_path), moved, geometry.source_affine, geometry.source_header
            )
            del moved
        channels = attrs.get("channel_names")
        sidecar = {
            "scan_id": scan_id,
            "label_map": label_path.name,
            "labels": names,
            "label_values": "source" if source_values else "categories",
            "dice": _named_dice(attrs.get("dice"), list(names.values())[1:]),
            "probabilities": None if probabilities_path is None else probabilities_path.name,
            "channels": channels if isinstance(channels, list) else None,
        }
        _partial(sidecar_path).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        # (stopped between these renames, a scan has its sidecar without its label map: not
        # exported, so the export run again replaces it)
        for path in [p for p in (probabilities_path, sidecar_path) if p is not None] + [label_path]:
            os.replace(_partial(path), path)
    finally:
        _remove_partials(out, scan_id)
    return ExportedScan(scan_id, label_path, sidecar_path, probabilities_path)


def _named_dice(dice: Any, names: list[str]) -> dict[str, float | None] | None:
    if not isinstance(dice, list) or len(dice) != len(names):
        return None
    return dict(zip(names, dice, strict=True))

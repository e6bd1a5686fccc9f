"""Reading one NIfTI case (``service/nnunet_dataset.py`` finds them) with nibabel, losslessly.

* Voxels as nibabel gives them through ``img.dataobj``: the header's scl_slope/scl_inter
  applied where it has them (float), the stored integers as they are where it has none.
* Geometry: the affine nibabel chooses (``img.affine``: the sform before the qform). The case
  is reoriented by axis permutations and flips only, so that the stored axes (0, 1, 2) point
  to (P, L, S): an axial slice ``[:, :, k]`` shows upright as radiologists view it. The
  stored ``affine`` is the source's composed with that reorientation, so stored voxels and
  stored affine describe exactly the source's world image; ``spacing`` is the voxel size
  along the stored axes. Back to the source's voxel order:
  ``ornt_transform(axcodes2ornt(STORED_AXCODES), io_orientation(source_affine))``, the
  inverse of ``stored_orientation`` (``loaders.export`` reads it off the two affines).
* Labels: an integer-valued label map on the image's grid; mask channel c is
  ``label == label_values[c]`` (the dataset's c-th non-background label).

Every problem is a ``SourceError`` naming the case, the file and why, in one line.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.sources import ScanSpec
from store.errors import SourceError, one_line

STORED_AXCODES = ("P", "L", "S")  # where stored axes 0, 1, 2 point (nibabel axis codes)
GRID_TOLERANCE_MM = 1e-4  # label/channel affines equal to the image's within this (float32 headers)


@dataclass
class NiftiCase:
    """A case read and reoriented: channel 0, channels 1.., the binary mask, the attributes."""

    image: np.ndarray  # (H, W, D), stored orientation
    extra_channels: list[np.ndarray] = field(default_factory=list)
    mask: OneHotMask | None = None  # (H, W, D, C) uint8, made slab by slab from the label map
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> list[float]:
        return [float(s) for s in self.attrs["spacing"]]


class OneHotMask:
    """The binary mask (H, W, D, C) uint8 of a label map, channel c being
    ``label == label_values[c]``, made slab by slab when a writer takes ``mask[:, :, z0:z1]``:
    the whole mask is C bytes a voxel (15 organs of a 512x512x300 CT: 1.2 GB) that a worker
    never needs at once. ``np.asarray(mask)`` makes all of it (verify compares whole scans)."""

    def __init__(self, label_map: np.ndarray, label_values: Sequence[int]) -> None:
        self.label_map = label_map
        self.values = np.asarray(label_values, dtype=np.int64)
        self.shape = (*label_map.shape[:3], len(self.values))
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        # one byte per voxel and class; a bool array viewed as uint8 is the binary mask
        return (self.label_map[key][..., np.newaxis] == self.values).view(np.uint8)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[(slice(None),) * 3]
        return whole if dtype is None else whole.astype(dtype)


def stored_orientation(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform from a source's voxel axes to the stored ones."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(affine), axcodes2ornt(STORED_AXCODES))


def stored_affine(source_affine: np.ndarray, transform: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Stored voxel index -> world: the source affine composed with the reorientation's inverse
    (what nibabel's ``as_reoriented`` does)."""
    from nibabel.orientations import inv_ornt_aff

    return np.asarray(source_affine @ inv_ornt_aff(transform, shape[:3]), dtype=np.float64)


@dataclass
class _Volume:
    data: np.ndarray  # 3D, or 4D for a Decathlon multi-channel file
    affine: np.ndarray
    # what an export gives back: the header's sform and qform codes, and the file's axes (a
    # 2D file is read as one slice)
    header: dict[str, int] | None = None


class DamagedGzip(Exception):
    """A ``.gz`` file whose compressed data, CRC or length is damaged."""


def _load(path: Path) -> Any:
    """``nib.load``, except that a ``.gz`` file is decompressed whole first: nibabel stops
    reading once it has the voxels, so gzip's CRC and length at the end of the file are never
    checked and a damaged file converts with wrong voxels (``verify`` reads the same way and
    would call the store exact). ``gzip`` checks both; decompressing once keeps the cost."""
    import nibabel as nib

    if not path.name.lower().endswith(".gz"):
        return nib.load(path)
    with open(path, "rb") as probe:
        if probe.read(2) not in (b"", b"\x1f\x8b"):  # gzip's magic number (empty: refused below)
            raise DamagedGzip("not gzip data, though its name ends in .gz (a .nii file renamed?)")
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DamagedGzip(f"damaged gzip data ({one_line(err, 120)})") from None
    if len(raw) < 348:  # what nib.load says of such a file, with the reason
        raise nib.filebasedimages.ImageFileError(f"{len(raw)} bytes, too few for a NIfTI header")
    # sizeof_hdr, the first 4 bytes in the file's byte order: 348 for NIfTI-1, 540 for NIfTI-2
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    image_class = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    return image_class.from_bytes(raw)


_quiet_lock = threading.Lock()
_quiet_readers = 0  # reads in progress that keep nibabel's logger off (several threads of a worker)
_quiet_was = False


@contextlib.contextmanager
def _nibabel_quiet(logger: logging.Logger) -> Iterator[None]:
    global _quiet_readers, _quiet_was
    with _quiet_lock:
        if _quiet_readers == 0:
            _quiet_was, logger.disabled = logger.disabled, True
        _quiet_readers += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_readers -= 1
            if _quiet_readers == 0:  # the last read out: as it was before the first came in
                logger.disabled = _quiet_was


def _read(spec: ScanSpec, rel: str) -> _Volume:
    """One NIfTI file's voxels (scaled as nibabel scales them) and best affine."""
    import nibabel as nib

    path = Path(spec.root) / rel
    img = None
    try:
        # nibabel prints its header checks ("sizeof_hdr should be 348") to stderr: a file it
        # cannot read is this case's one failure line instead (nibabel's own suppressor leaves
        # its logger without handlers, so Python's last-resort handler prints them anyway)
        with _nibabel_quiet(nib.imageglobals.logger):
            img = _load(path)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise SourceError(spec.scan_id, rel, f"not a NIfTI image ({type(img).__name__})")
            data = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(spec.scan_id, rel, "file not found") from None
    except DamagedGzip as err:
        raise SourceError(spec.scan_id, rel, f"cannot read as NIfTI: {err}") from None
    except MemoryError:  # a header declaring more voxels than this machine holds
        shape = "x".join(str(n) for n in getattr(img, "shape", ())) or "its"
        raise SourceError(spec.scan_id, rel, f"the header's {shape} voxels do not fit in memory") from None
    except Exception as err:  # truncated gzip, bad header, ...: this case fails, others go on
        why = one_line(err, 160).replace(str(path), rel)  # nibabel repeats the path: once is enough
        raise SourceError(spec.scan_id, rel, f"cannot read as NIfTI: {type(err).__name__}: {why}") from None
    if data.dtype.kind not in "iuf" or data.dtype.fields is not None:
        raise SourceError(spec.scan_id, rel, f"voxel type {data.dtype} is not a real number type")
    data = integer_scaled(data, img)
    header = {
        "sform_code": int(img.header["sform_code"]),
        "qform_code": int(img.header["qform_code"]),
        "ndim": int(data.ndim),
    }
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1): one volume
        data = data[..., 0]
    if data.ndim == 2:  # a 2D image: one slice
        data = data[..., np.newaxis]
    if data.ndim == 5 and data.shape[3] == 1:  # ITK's vector image: (X, Y, Z, 1, components)
        raise SourceError(
            spec.scan_id,
            rel,
            f"image of shape {list(data.shape)} is a vector image (ITK's components in a 5th axis), which is "
            f"not read: save each component as its own channel file ({spec.scan_id}_0000, _0001, ...)",
        )
    if data.ndim not in (3, 4) or min(data.shape) < 1:
        raise SourceError(spec.scan_id, rel, f"image of shape {list(data.shape)} is not 3D")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SourceError(spec.scan_id, rel, "its affine is degenerate (zero or non-finite voxel axes)")
    return _Volume(data, affine, header)


INTEGER_TYPES = (np.int16, np.int32)  # what integer-scaled voxels are stored in, smallest first


def integer_scaled(data: np.ndarray, img: Any) -> np.ndarray:
    """Integers stored with an integer ``scl_slope``/``scl_inter`` (CT's uint16 with
    intercept -1024) are integers after scaling too: nibabel gives them as float64, here they
    come back as the smallest of int16/int32 holding them, the same values in a quarter (or
    half) of the bytes, which the store then compresses and a loader decodes that much faster.
    Anything else (a fractional slope, float voxels) stays as nibabel gives it."""
    if data.dtype.kind != "f" or data.size == 0 or np.dtype(img.get_data_dtype()).kind not in "iu":
        return data
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    if not (slope.is_integer() and inter.is_integer()):
        return data
    kind = smallest_integer_type(float(data.min()), float(data.max()), INTEGER_TYPES)
    if kind is None:
        return data
    try:
        out = data.astype(kind)
        return out if np.array_equal(out, data) else data  # exact, or left as it was
    except MemoryError:  # no room for the smaller copy: stored as nibabel gives it
        return data


def smallest_integer_type(low: float, high: float, kinds: tuple[type, ...]) -> np.dtype | None:
    """The first of ``kinds`` (smallest first) whose range holds ``low``..``high``, or None."""
    for kind in kinds:
        info = np.iinfo(kind)
        if info.min <= low and high <= info.max:
            return np.dtype(kind)
    return None


def _check_grid(spec: ScanSpec, rel: str, what: str, volume: _Volume, reference: _Volume, first: str) -> None:
    shape, want = volume.data.shape[:3], reference.data.shape[:3]
    if shape != want:
        raise SourceError(
            spec.scan_id, rel, f"{what} grid {list(shape)} differs from the image's {list(want)} ({first})"
        )
    off = float(np.abs(volume.affine - reference.affine).max())
    if off > GRID_TOLERANCE_MM:
        # what the user can picture: how far apart the two place a voxel centre (largest at a
        # corner of the grid, the maps being affine), not the largest matrix entry's difference
        corners = np.array([[*(0 if c == "0" else n - 1 for c, n in zip(bits, shape, strict=True)), 1]
                            for bits in ("000", "001", "010", "011", "100", "101", "110", "111")]).T  # fmt: skip
        apart = float(np.linalg.norm((volume.affine - reference.affine)[:3] @ corners, axis=0).max())
        raise SourceError(
            spec.scan_id,
            rel,
            f"{what} affine differs from the image's ({first}): voxel centres up to {apart:.4g} mm apart",
        )


def _channel_volumes(spec: ScanSpec, first: _Volume) -> list[np.ndarray]:
    """Every channel's 3D voxels in source orientation (channel files, or a 4D Decathlon file)."""
    declared = len(spec.options.channel_names)
    rel0 = spec.image_files[0]
    if first.data.ndim == 4:
        if len(spec.image_files) > 1 or (declared and first.data.shape[3] != declared):
            want = declared or 1
            raise SourceError(
                spec.scan_id,
                rel0,
                f"holds {first.data.shape[3]} volumes; dataset.json declares {want} channel{'s' if want > 1 else ''}",
            )
        return [first.data[..., k] for k in range(first.data.shape[3])]
    if len(spec.image_files) == 1 and declared > 1:
        raise SourceError(spec.scan_id, rel0, f"holds 1 volume; dataset.json declares {declared} channels")
    volumes = [first.data]
    for k, rel in enumerate(spec.image_files[1:], start=1):
        volume = _read(spec, rel)
        if volume.data.ndim != 3:
            raise SourceError(spec.scan_id, rel, f"channel {k} is not one 3D volume")
        _check_grid(spec, rel, f"channel {k}", volume, first, rel0)
        volumes.append(volume.data)
    return volumes


def _label_map(spec: ScanSpec, rel: str, volume: _Volume) -> np.ndarray:
    """The label file's values as integers; refuses fractions, non-finite values, and values
    that dataset.json does not list."""
    data = volume.data
    if data.ndim != 3:
        raise SourceError(spec.scan_id, rel, f"label map of shape {list(data.shape)} is not 3D")
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise SourceError(
                spec.scan_id,
                rel,
                f"label file is not integer-valued ({float(data[where])!r} at voxel {list(where)})",
            )
        data = data.astype(np.int64)
    known = {0, *spec.options.label_values}
    present = np.unique(data)
    unknown = [int(v) for v in present if int(v) not in known]
    if unknown:
        listed = value_ranges(sorted(known))
        raise SourceError(
            spec.scan_id, rel, f"label value {unknown[0]} is not in dataset.json's labels ({listed})"
        )
    # held through the whole write (OneHotMask): in the smallest type of the known values, not
    # the int64 of a float file (exact: every value is one of them)
    kind = smallest_integer_type(min(known), max(known), (np.uint8, np.uint16))
    if kind is not None and data.dtype.itemsize > kind.itemsize:
        return data.astype(kind)
    return data


def value_ranges(values: list[int]) -> str:
    """Increasing integers as runs, short even for an atlas of hundreds: ``0-116, 200, 210-212``."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def load_case(spec: ScanSpec) -> NiftiCase:
    """Read, check and reorient one case (every channel and its label map)."""
    from nibabel.affines import voxel_sizes
    from nibabel.orientations import apply_orientation

    rel0 = spec.image_files[0]
    first = _read(spec, rel0)
    source_shape = first.data.shape[:3]
    try:
        transform = stored_orientation(first.affine)
    except Exception as err:
        raise SourceError(
            spec.scan_id, rel0, f"no axis orientation for its affine: {one_line(err, 120)}"
        ) from None
    channels = [apply_orientation(v, transform) for v in _channel_volumes(spec, first)]
    mask = None
    if spec.mask_files:
        rel = spec.mask_files[0]
        labels = _read(spec, rel)
        _check_grid(spec, rel, "label", labels, first, rel0)
        label_map = apply_orientation(_label_map(spec, rel, labels), transform)
        mask = OneHotMask(label_map, spec.options.label_values)
    affine = stored_affine(first.affine, transform, source_shape)
    attrs: dict[str, Any] = {
        "spacing": [float(s) for s in voxel_sizes(affine)],
        "affine": affine.tolist(),
        "source_affine": first.affine.tolist(),
        "source_shape": [int(n) for n in source_shape],
        "source_header": first.header,
        "class_names": list(spec.options.class_names),
        "label_values": list(spec.options.label_values),
    }
    names = spec.options.channel_names or tuple(f"channel {k}" for k in range(len(channels)))
    attrs["channel_names"] = list(names)
    return NiftiCase(channels[0], channels[1:], mask, attrs)

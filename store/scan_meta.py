"""A scan's attributes as stored in its group's ``zarr.json``, parsed and checked once into a
frozen value (docs/store-format.md lists them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from store import ome


@dataclass(frozen=True)
class ScanMeta:
    """A scan's attributes as stored in its group's ``zarr.json`` (see docs/store-format.md)."""

    scan_id: str
    shape: tuple[int, int, int]
    dtype: str
    num_classes: int
    split: str | None
    subject_id: int | None
    time_point: int | None
    augmentation: int | None
    attrs: dict[str, Any]
    # the published version these attributes are of (``STORE/<scan_id>`` link target), when known
    version: str | None = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], version: str | None = None) -> ScanMeta:
        """Raises ValueError or TypeError for attributes that do not parse, the geometry's
        included: a hand-edited ``affine`` fails here, once, not in every route that uses it."""
        meta = cls(
            scan_id=attrs["scan_id"],
            shape=tuple(int(n) for n in attrs["shape"]),  # type: ignore[arg-type]
            dtype=attrs["dtype"],
            num_classes=int(attrs.get("num_classes", 0)),
            split=attrs.get("split"),
            subject_id=attrs.get("subject_id"),
            time_point=attrs.get("time_point"),
            augmentation=attrs.get("augmentation"),
            attrs=attrs,
            version=version,
        )
        meta.spacing, meta.affine, meta.source_affine, meta.label_values, meta.channels  # noqa: B018 (parsed for their errors)
        return meta

    @property
    def has_mask(self) -> bool:
        return self.num_classes > 0

    # Geometry and names (docs/store-format.md, "Geometry"): defaults for scans written before
    # they were recorded and for sources without them.
    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm along the stored axes (y, x, z); [1, 1, 1] when the scan records none."""
        return ome.spacing_of(self.attrs)

    @property
    def affine(self) -> list[list[float]]:
        """4x4, stored voxel index (axis 0, 1, 2, 1) -> RAS+ world mm; diag(spacing, 1) when the
        scan records none."""
        found = self.attrs.get("affine")
        if found is not None:
            return _matrix4(found, "affine")
        sy, sx, sz = self.spacing
        return [[sy, 0.0, 0.0, 0.0], [0.0, sx, 0.0, 0.0], [0.0, 0.0, sz, 0.0], [0.0, 0.0, 0.0, 1.0]]

    @property
    def source_affine(self) -> list[list[float]]:
        """The source file's affine (NIfTI sources); the stored ``affine`` for others."""
        found = self.attrs.get("source_affine")
        return _matrix4(found, "source_affine") if found is not None else self.affine

    @property
    def named_classes(self) -> int:
        """How many classes ``class_names`` and ``label_values`` list: ``num_classes`` for a scan
        with a mask; for one without (an nnU-Net ``imagesTs`` case without ``labelsTs``, an
        image-only MedSegPy scan), the dataset's classes it records, 0 if it records none.
        ``num_classes`` stays the mask's channels (0: no mask)."""
        if self.has_mask:
            return self.num_classes
        for key in ("class_names", "label_values"):
            found = self.attrs.get(key)
            if isinstance(found, list) and found:
                return len(found)
        return 0

    @property
    def class_names(self) -> list[str]:
        """One name per mask channel, ``"class k"`` for every class the scan does not name; for
        a scan without a mask, the dataset's class names it records (``named_classes``)."""
        return ome.class_names_of(self.attrs, self.named_classes)

    @property
    def label_values(self) -> list[int]:
        """The source label value of each class of ``class_names`` (label-map value c + 1 by
        default)."""
        count = self.named_classes
        found = self.attrs.get("label_values")
        if isinstance(found, list) and len(found) == count:
            return [int(v) for v in found]
        return list(range(1, count + 1))

    @property
    def channels(self) -> int:
        """Image channels: ``image`` is channel 0, ``image_c1`` ... the others."""
        return int(self.attrs.get("channels", 1))

    @property
    def channel_names(self) -> list[str]:
        found = self.attrs.get("channel_names")
        names = [str(n) for n in found] if isinstance(found, list) else []
        return names[: self.channels] + [f"channel {k}" for k in range(len(names), self.channels)]

    def class_voxels(self) -> list[int]:
        return [int(v) for v in self.attrs.get("class_voxels", [])]

    def class_voxels_per_slice(self) -> list[list[int]]:
        """``[z][class]`` voxel counts; used for foreground sampling."""
        return [[int(v) for v in row] for row in self.attrs.get("class_voxels_per_slice", [])]


def _matrix4(found: Any, name: str) -> list[list[float]]:
    """A 4x4 attribute of finite numbers (an affine), as floats; ValueError naming it otherwise."""
    try:
        matrix = [[float(v) for v in row] for row in found]
    except (TypeError, ValueError):
        matrix = []
    if len(matrix) != 4 or any(len(row) != 4 or not all(math.isfinite(v) for v in row) for row in matrix):
        raise ValueError(f"{name}: expected a 4x4 list of finite numbers, got {str(found)[:80]}")
    return matrix

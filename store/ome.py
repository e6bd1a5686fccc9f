"""OME-Zarr (NGFF 0.5) metadata, so scans and predictions open in napari and neuroglancer.

Pure builders of the ``"ome"`` group attribute, plus :func:`link_labels`, which adds a labels
group to a scan folder without copying data. The class colours live here too: previews, the
viewer page and the label metadata all draw class k in ``CLASS_COLORS[k]``.

Axes: scancache arrays are stored (y, x, z) (a slice is ``[:, :, k]``). NGFF only asks that
space axes come last; it does not fix their order, so the metadata declares the arrays as they
are (``y, x, z``) and nothing is copied or transposed. neuroglancer reads the axis names and
shows all three planes; napari shows the last two axes, so set ``viewer.dims.order = (2, 0, 1)``
to page through z (docs/viewer.md). One resolution level: scans of a few hundred voxels a side
open in both viewers without a pyramid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NGFF_VERSION = "0.5"
SPACE_AXES = ("y", "x", "z")
LABELS_GROUP = "labels"
SCAN_LABELS = "classes"  # STORE/<scan>/labels/classes: the scan's label map as an NGFF label image
LABEL_LEVEL = "0"  # the one resolution level of a label image

# Class k's colour (RGB), repeating after 12 classes; chosen to stay apart on a grey image.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


def class_color(k: int) -> tuple[int, int, int]:
    return CLASS_COLORS[k % len(CLASS_COLORS)]


def _axes(names: Sequence[str]) -> list[dict[str, str]]:
    return [{"name": n, "type": "space"} for n in names]


def multiscales(name: str, path: str, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[dict[str, Any]]:
    """One single-level multiscale over the (y, x, z) array at ``path`` (relative to the group)."""
    scale = [float(s) for s in spacing]
    if len(scale) != len(SPACE_AXES) or any(s <= 0 for s in scale):
        raise ValueError(f"spacing: expected three positive numbers, got {list(spacing)}")
    return [
        {
            "name": name,
            "axes": _axes(SPACE_AXES),
            "datasets": [{"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
        }
    ]


def image_attrs(name: str, path: str, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """The ``ome`` attribute of an image group whose image array is ``path``."""
    return {"version": NGFF_VERSION, "multiscales": multiscales(name, path, spacing)}


def label_colors(num_classes: int, alpha: int = 255) -> list[dict[str, Any]]:
    """``image-label`` colours: label value k+1 is class k (0 is no class)."""
    return [{"label-value": k + 1, "rgba": [*class_color(k), alpha]} for k in range(num_classes)]


def label_image_attrs(
    name: str,
    path: str,
    num_classes: int,
    source_image: str | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, Any]:
    """The ``ome`` attribute of a label image (uint8, 0 = no class, k+1 = class k)."""
    image_label: dict[str, Any] = {"colors": label_colors(num_classes)}
    if source_image is not None:
        image_label["source"] = {"image": source_image}
    return {**image_attrs(name, path, spacing), "image-label": image_label}


def labels_group_attrs(names: Sequence[str]) -> dict[str, Any]:
    return {"version": NGFF_VERSION, "labels": list(names)}


def group_document(ome: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    """A Zarr v3 group ``zarr.json`` carrying ``ome`` and other attributes."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {**attributes, "ome": ome}}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2))


def link_labels(
    scan_dir: str | os.PathLike[str], label_array: str, num_classes: int, name: str = SCAN_LABELS
) -> bool:
    """Give a scan folder an NGFF labels group over its existing label map, without a copy.

    Writes ``labels/zarr.json``, ``labels/<name>/zarr.json`` and a relative symlink
    ``labels/<name>/0 -> ../../<label_array>``. Call it on the staged folder before it is
    published. Returns False (and writes nothing) when the scan has no ``label_array``.
    """
    scan = Path(scan_dir)
    if not (scan / label_array / "zarr.json").is_file():
        return False
    label_dir = scan / LABELS_GROUP / name
    label_dir.mkdir(parents=True, exist_ok=True)
    _write_json(scan / LABELS_GROUP / "zarr.json", group_document(labels_group_attrs([name])))
    _write_json(
        label_dir / "zarr.json", group_document(label_image_attrs(name, LABEL_LEVEL, num_classes, "../../"))
    )
    link = label_dir / LABEL_LEVEL
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path("..") / ".." / label_array, target_is_directory=True)
    return True

"""OME-Zarr (NGFF 0.5) metadata, so scans and predictions open upright in napari and neuroglancer.

Pure builders of the ``"ome"`` group attributes. The class colours live here too: previews,
the viewer page and the label metadata all draw class k in ``CLASS_COLORS[k]``.

Axes: scancache arrays are stored (y, x, z) (a slice is ``[:, :, k]``), and the loaders rely on
that. NGFF viewers want space axes ordered ``z, y, x`` (ngff-zarr's validation refuses any
other order; napari shows the last two axes, so an axial slice only comes upright in that
order). So the metadata never describes the stored arrays: it describes their **OME views**,
arrays of the same voxels declared (z, y, x) (``store/ome_views.py`` makes them from the stored
chunks without recompressing), with each axis's unit (millimetre) and the voxel spacing as the
scale. One resolution level: scans of a few hundred voxels a side open without a pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NGFF_VERSION = "0.5"
SPACE_AXES = ("z", "y", "x")  # the views' axes; the stored arrays are (y, x, z)
UNIT = "millimeter"  # spacing is in mm (the scan attribute ``spacing``)
CHANNEL_AXIS = "c"
LABELS_GROUP = "labels"
SCAN_LABELS = "classes"  # STORE/<scan>/labels/classes: the scan's label map as an NGFF label image
LABEL_LEVEL = "0"  # the one resolution level of a label image
DEFAULT_SPACING = (1.0, 1.0, 1.0)

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


def spacing_of(attrs: dict[str, Any]) -> tuple[float, float, float]:
    """A scan's ``spacing`` attribute ([sy, sx, sz] mm along the stored axes), [1, 1, 1] when
    it has none."""
    found = attrs.get("spacing")
    if found is None:
        return DEFAULT_SPACING
    return zyx_checked(found)


def zyx_checked(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = [float(s) for s in spacing]
    if len(values) != 3 or not all(s > 0 and s != float("inf") for s in values):
        raise ValueError(f"spacing: expected three positive finite numbers, got {list(spacing)}")
    return values[0], values[1], values[2]


def axes(channels: int = 1) -> list[dict[str, str]]:
    """The views' axes: ``z, y, x`` in millimetres, after a channel axis ``c`` when there are
    several channels."""
    space = [{"name": n, "type": "space", "unit": UNIT} for n in SPACE_AXES]
    return ([{"name": CHANNEL_AXIS, "type": "channel"}] if channels > 1 else []) + space


def scale(spacing: Sequence[float], channels: int = 1) -> list[float]:
    """The NGFF scale of a view: ``[sz, sy, sx]`` from the stored axes' spacing ``[sy, sx, sz]``
    (with 1 for a channel axis)."""
    sy, sx, sz = zyx_checked(spacing)
    return ([1.0] if channels > 1 else []) + [sz, sy, sx]


def multiscales(
    name: str, path: str, spacing: Sequence[float] = DEFAULT_SPACING, channels: int = 1
) -> list[dict[str, Any]]:
    """One single-level multiscale over the (z, y, x) view at ``path`` (relative to the group)."""
    transform = {"type": "scale", "scale": scale(spacing, channels)}
    return [
        {
            "name": name,
            "axes": axes(channels),
            "datasets": [{"path": path, "coordinateTransformations": [transform]}],
        }
    ]


def image_attrs(
    name: str, path: str, spacing: Sequence[float] = DEFAULT_SPACING, channels: int = 1
) -> dict[str, Any]:
    """The ``ome`` attribute of an image group whose (z, y, x) view is the array ``path``."""
    return {"version": NGFF_VERSION, "multiscales": multiscales(name, path, spacing, channels)}


def omero(channel_names: Sequence[str], intensity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``omero`` block napari's OME-Zarr reader takes layer names and contrast from: one
    entry per image channel; channel 0 gets a window of mean +- 3 std within [min, max] from
    the scan's intensity statistics (the other channels have none recorded)."""
    channels: list[dict[str, Any]] = [
        {"label": str(n), "color": "FFFFFF", "active": k == 0} for k, n in enumerate(channel_names)
    ]
    stats = intensity or {}
    values = [stats.get(key) for key in ("min", "max", "mean", "std")]
    if channels and all(isinstance(v, (int, float)) for v in values):
        low, high, mean, std = (float(v) for v in values)  # type: ignore[arg-type]
        if high > low:
            start = max(low, mean - 3 * std)
            end = max(start, min(high, mean + 3 * std))
            channels[0]["window"] = {"min": low, "max": high, "start": start, "end": end}
    return {"channels": channels}


def label_colors(num_classes: int, alpha: int = 255) -> list[dict[str, Any]]:
    """``image-label`` colours: label value k+1 is class k (0 is no class)."""
    return [{"label-value": k + 1, "rgba": [*class_color(k), alpha]} for k in range(num_classes)]


def label_properties(class_names: Sequence[str]) -> list[dict[str, Any]]:
    """``image-label`` properties: the name of each label value (napari shows it on hover)."""
    return [{"label-value": k + 1, "class": str(n)} for k, n in enumerate(class_names)]


def label_image_attrs(
    name: str,
    path: str,
    num_classes: int,
    source_image: str | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``ome`` attribute of a label image (uint8, 0 = no class, k+1 = class k)."""
    image_label: dict[str, Any] = {"colors": label_colors(num_classes)}
    if class_names:
        image_label["properties"] = label_properties(class_names[:num_classes])
    if source_image is not None:
        image_label["source"] = {"image": source_image}
    return {**image_attrs(name, path, spacing), "image-label": image_label}


def labels_group_attrs(names: Sequence[str]) -> dict[str, Any]:
    return {"version": NGFF_VERSION, "labels": list(names)}


def group_document(ome: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    """A Zarr v3 group ``zarr.json`` carrying ``ome`` and other attributes."""
    return {"zarr_format": 3, "node_type": "group", "attributes": {**attributes, "ome": ome}}


def class_names_of(attrs: dict[str, Any], num_classes: int) -> list[str]:
    """A scan's ``class_names`` attribute, ``"class k"`` for every class it does not name."""
    found = attrs.get("class_names")
    names = [str(n) for n in found] if isinstance(found, list) else []
    return names[:num_classes] + [f"class {k}" for k in range(len(names), num_classes)]

"""OME views: the stored (y, x, z) arrays declared (z, y, x) for NGFF viewers, in the same files.

NGFF viewers want space axes ``z, y, x``; scancache stores (y, x, z) and its loaders rely on
it. A view is a second Zarr v3 array of the same voxels whose metadata is the stored array's
with the axes permuted and a ``transpose`` codec (Zarr v3 core, order ``[1, 2, 0]``) put first
in the chunk codecs: a (z, y, x) chunk transposed that way is the stored (y, x, z) chunk, so
its encoded bytes are exactly the stored chunk's. So the view is made of the stored files,
each under its permuted key (``c/i/j/k`` -> ``c/k/i/j``):

* an unsharded array (a predictions store's ``label_map``): the chunk files, hard-linked;
* a sharded array (the scan store's ``image`` and ``label_map``): the view's shards have their
  index at the **start**, the stored array's at the end. The writer (``store/shards.py``)
  begins every 3D shard file with the view's index, so the view's shard is the stored file
  itself, hard-linked: no byte is written twice. A shard file without it (another writer) is
  copied behind a view index instead. Sharding lets a file hold bytes no index points at, and
  each reader follows only its own index.

Where hard links are impossible (another file system) files are copied. Several same-shaped
arrays (image channels) make one view with a leading channel axis ``c``. zarr-python,
tensorstore, ngff-zarr, ome-zarr-py and neuroglancer decode the transpose codec and both index
locations (tests/test_ome.py reads every view back with the first four).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from store import ome

VIEW_SUFFIX = "_zyx"  # image -> image_zyx, label_map -> label_map_zyx
_SHARDING = "sharding_indexed"
_CRC = 4  # the crc32c after a shard index
_MISSING = np.uint64(2**64 - 1)  # the index entry of an inner chunk that is not stored


def encoded_index(index: np.ndarray) -> bytes:
    """A shard index as the store's ``index_codecs`` encode it: little-endian uint64 pairs,
    then their crc32c."""
    import google_crc32c  # the writer's dependency (the service extra); unsharded views need none

    table = np.ascontiguousarray(index, dtype="<u8").tobytes()
    return table + np.uint32(google_crc32c.value(table)).astype("<u4").tobytes()


def zyx_index(index: np.ndarray) -> np.ndarray:
    """The index of a (y, x, z) shard, ``(gy, gx, gz, 2)``, as the (z, y, x) view of the same
    chunks indexes them: ``(gz, gy, gx, 2)`` (a channel view's ``(1, gz, gy, gx, 2)`` is the
    same bytes)."""
    return index.transpose(2, 0, 1, 3)


def _to_zyx(values: Sequence[Any]) -> list[Any]:
    """(y, x, z, ...) -> (z, y, x): the view's order of a stored array's first three axes."""
    return [values[2], values[0], values[1]]


def view_metadata(doc: dict[str, Any], channels: int = 1) -> dict[str, Any]:
    """The ``zarr.json`` of the (z, y, x) view (``c, z, y, x`` for several channels) of a
    stored 3D (y, x, z) array's ``zarr.json``."""
    if doc.get("node_type") != "array" or len(doc.get("shape", ())) != 3:
        raise ValueError("an OME view is made of a 3D (y, x, z) array")
    lead = [channels] if channels > 1 else []
    one = [1] if channels > 1 else []
    order = [0, 2, 3, 1] if channels > 1 else [1, 2, 0]  # decoded (c, z, y, x) -> encoded (c, y, x, z)
    view = copy.deepcopy(doc)
    view["shape"] = lead + _to_zyx(doc["shape"])
    grid = view["chunk_grid"]["configuration"]
    grid["chunk_shape"] = one + _to_zyx(grid["chunk_shape"])
    transpose = {"name": "transpose", "configuration": {"order": order}}
    first = view["codecs"][0]
    if first["name"] == _SHARDING:  # the inner chunks are transposed, the index is per shard
        inner = first["configuration"]
        inner["chunk_shape"] = one + _to_zyx(inner["chunk_shape"])
        inner["codecs"] = [transpose, *inner["codecs"]]
        inner["index_location"] = "start"  # the stored array's is at the end of the same file
    else:
        view["codecs"] = [transpose, *view["codecs"]]
    view["dimension_names"] = ([ome.CHANNEL_AXIS] if channels > 1 else []) + list(ome.SPACE_AXES)
    view["attributes"] = {}
    return view


def _chunk_files(array: Path) -> list[tuple[list[int], Path]]:
    """(chunk key as integers, file) of every stored chunk or shard of a ``/``-keyed array."""
    out = []
    root = array / "c"
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            out.append(([int(p) for p in path.relative_to(root).parts], path))
    return sorted(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the same bytes: a hard link costs no space
    except OSError:
        shutil.copyfile(src, dst)


def _write_view_shard(src: Path, dst: Path, grid: Sequence[int]) -> None:
    """The view's shard (index at the start) of a stored shard (index at the end): the file
    itself when it already begins with the view's index (store/shards.py writes it), else a
    copy behind one (offsets moved by its length)."""
    size = len(encoded_index(np.zeros((*grid, 2), "<u8")))
    with open(src, "rb") as f:
        head = f.read(size)
        f.seek(-size, os.SEEK_END)
        tail = f.read(size)
    index = np.frombuffer(tail[:-_CRC], "<u8").reshape(*grid, 2)
    if head == encoded_index(zyx_index(index)):
        _link_or_copy(src, dst)
        return
    moved = np.where(index == _MISSING, _MISSING, index + np.uint64(size))
    moved[..., 1] = index[..., 1]  # sizes stay; offsets move behind the new index
    dst.write_bytes(encoded_index(zyx_index(moved)) + src.read_bytes())


def _layout(doc: dict[str, Any]) -> list[Any]:
    """What channels of one view must share (their attributes may differ)."""
    return [
        doc.get(k) for k in ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")
    ]


def write_view(sources: Sequence[Path], dest: Path) -> None:
    """Write the (z, y, x) view of the stored (y, x, z) arrays ``sources`` at ``dest``: one
    array, or several of the same metadata (image channels) as a (c, z, y, x) view."""
    docs = [json.loads((src / "zarr.json").read_text()) for src in sources]
    if any(_layout(doc) != _layout(docs[0]) for doc in docs[1:]):
        names = ", ".join(src.name for src in sources)
        raise ValueError(f"{dest.name}: the channel arrays {names} differ in shape, type or chunks")
    channels = len(sources)
    meta = view_metadata(docs[0], channels)
    sharding = docs[0]["codecs"][0]
    sharded = sharding["name"] == _SHARDING
    if sharded:
        config = sharding["configuration"]
        codecs = [c["name"] for c in config["index_codecs"]]
        if config.get("index_location", "end") != "end" or codecs != ["bytes", "crc32c"]:
            raise ValueError(f"{dest.name}: only end indexes with crc32c are supported")
        shard = docs[0]["chunk_grid"]["configuration"]["chunk_shape"]
        grid = [s // c for s, c in zip(shard, config["chunk_shape"], strict=True)]
    dest.mkdir(parents=True)
    (dest / "zarr.json").write_text(json.dumps(meta, indent=2))
    lead = channels > 1
    for channel, src in enumerate(sources):
        for key, path in _chunk_files(src):
            out = dest.joinpath("c", *[str(n) for n in ([channel] if lead else []) + _to_zyx(key)])
            out.parent.mkdir(parents=True, exist_ok=True)
            if sharded:
                _write_view_shard(path, out, grid)
            else:
                _link_or_copy(path, out)


def _write_group(folder: Path, attrs: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zarr.json").write_text(json.dumps(ome.group_document(attrs), indent=2))


def is_view_chunk_file(path: str) -> bool:
    """Whether a scan file (path relative to its version, ``/``-separated) holds chunks of an OME
    view: the bytes of a stored array's file under a second name (a hard link locally)."""
    parts = path.split("/")
    if "c" not in parts:
        return False
    array = parts[: parts.index("c")]
    return bool(array) and (array[0].endswith(VIEW_SUFFIX) or array[0] == ome.LABELS_GROUP)


def channel_arrays(scan: Path, image: str) -> list[Path]:
    """``image`` and its channels ``image_c1``, ``image_c2``, ... that exist in a scan folder."""
    found = [scan / image]
    while (scan / f"{image}_c{len(found)}" / "zarr.json").is_file():
        found.append(scan / f"{image}_c{len(found)}")
    return found


def write_scan_views(
    scan: Path,
    name: str,
    image: str,
    label_map: str | None,
    spacing: Sequence[float],
    class_names: Sequence[str],
    channel_names: Sequence[str] = (),
    intensity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OME views of a staged scan folder: ``<image>_zyx`` (all its channels), and where
    the scan has a label map, the NGFF labels group ``labels/classes`` whose level ``0`` is the
    label map's view. Returns the scan group's ``ome`` attribute (with ``omero`` channel
    names and channel 0's contrast window, for napari)."""
    sources = channel_arrays(scan, image)
    write_view(sources, scan / f"{image}{VIEW_SUFFIX}")
    if label_map is not None and (scan / label_map / "zarr.json").is_file():
        labels = scan / ome.LABELS_GROUP / ome.SCAN_LABELS
        _write_group(scan / ome.LABELS_GROUP, ome.labels_group_attrs([ome.SCAN_LABELS]))
        attrs = ome.label_image_attrs(
            ome.SCAN_LABELS, ome.LABEL_LEVEL, len(class_names), "../../", spacing, class_names
        )
        _write_group(labels, attrs)
        write_view([scan / label_map], labels / ome.LABEL_LEVEL)
    names = list(channel_names)[: len(sources)]
    names += [f"channel {k}" for k in range(len(names), len(sources))]
    return {
        **ome.image_attrs(name, f"{image}{VIEW_SUFFIX}", spacing, len(sources)),
        "omero": ome.omero(names, intensity),
    }


def write_label_image_view(
    folder: Path,
    name: str,
    label_map: str,
    num_classes: int,
    spacing: Sequence[float],
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The (z, y, x) view ``<label_map>_zyx`` of a group that is itself an NGFF label image (a
    prediction); returns the group's ``ome`` attribute."""
    write_view([folder / label_map], folder / f"{label_map}{VIEW_SUFFIX}")
    return ome.label_image_attrs(
        name, f"{label_map}{VIEW_SUFFIX}", num_classes, spacing=spacing, class_names=class_names
    )

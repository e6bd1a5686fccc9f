"""The scancache store format (Zarr v3), shared by the writer, the readers and the server.

A store (format 2) is a Zarr v3 root group with one child group per scan, each a relative
symlink to the scan's current version::

    STORE/zarr.json                         root group, attributes {"scancache": {"format": 2, "store_id": ...}}
    STORE/<scan_id> -> .versions/<scan_id>/<version>      switched atomically on re-publish
    STORE/.versions/<scan_id>/<version>/zarr.json          scan group: see ScanMeta
    STORE/.versions/<scan_id>/<version>/image/             (H, W, D) array in the source dtype
    STORE/.versions/<scan_id>/<version>/mask/              (H, W, D, C) uint8 (absent if image-only)
    STORE/.staging/<job>-<random>/                         scans being written; never read
    STORE/.lock                                            the running job's lock

Publication (``store/publish.py``) renames a complete, fsynced version folder into
``.versions`` and then switches the symlink, so every ``STORE/<scan_id>`` a reader finds is a
complete scan, and a reader that resolved the link keeps a consistent version.

Arrays are sharded: one shard spans whole slices (H, W) and ``shard_depth`` slices, holding
inner chunks of ``chunks`` voxels compressed with blosc-lz4 and byte shuffling. That keeps a
few files per scan while a whole slice or a 3D patch decodes only the chunks it touches.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.errors import InvalidPath, ScanCacheError
from store.publish import STAGING_DIR as STAGING_DIR  # re-exported: the store format
from store.publish import VERSIONS_DIR as VERSIONS_DIR
from store.scan_meta import ScanMeta as ScanMeta  # re-exported: the store format

FORMAT_VERSION = 2
STORE_ID_KEY = "store_id"  # root attribute scancache.store_id: the store's identity (random)
LOCK_FILE = ".lock"
IMAGE = "image"
MASK = "mask"
ARRAYS = (IMAGE, MASK)


def extra_channel_arrays(channels: int) -> list[str]:
    """The arrays of an image's channels 1 .. channels-1 (channel 0 is ``image``); not to be
    confused with ``ScanMeta.channel_names``, the channels' names for users."""
    return [f"{IMAGE}_c{k}" for k in range(1, channels)]


# fullmatch, never match with "$": "$" also matches before a final newline ("image_c1\n")
_CHANNEL_ARRAY = re.compile(r"image_c([1-9][0-9]{0,3})")


def channel_dtype(*dtypes: Any) -> Any:
    """The one dtype every image channel of a scan is stored in: numpy's promotion of the
    channels' own (int16 with float32 is float32, int16 with uint16 int32: values unchanged), so
    a loader stacks channels without casts and the OME view is one array."""
    import numpy as np  # not at the top: the command line parses its arguments without numpy

    return np.result_type(*dtypes)


def image_arrays(channels: int) -> list[str]:
    """The arrays of all of an image's channels, in channel order: ``image``, ``image_c1``, ..."""
    return [IMAGE, *extra_channel_arrays(channels)]


def channel_array(channel: int) -> str:
    """The array holding image channel ``channel`` (0: ``image``)."""
    if int(channel) < 0:
        raise ValueError(f"image channel {channel} is negative")
    return IMAGE if int(channel) == 0 else f"{IMAGE}_c{int(channel)}"


def channel_of(name: str) -> int | None:
    """The image channel an array holds (``image``: 0, ``image_c2``: 2), None for other arrays."""
    if name == IMAGE:
        return 0
    found = _CHANNEL_ARRAY.fullmatch(name)
    return int(found.group(1)) if found else None


_SCAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def validate_scan_id(scan_id: str) -> str:
    """Scan ids are one path component of safe characters: no slashes, no ``..``, no dotfiles."""
    if not isinstance(scan_id, str) or not _SCAN_ID.fullmatch(scan_id) or ".." in scan_id:
        raise InvalidPath(f"invalid scan id {scan_id!r}")
    return scan_id


class StoreFormatError(ScanCacheError, ValueError):
    """A store written in another format version than this scancache reads."""


def check_store_format(store: object, root_doc: object) -> None:
    """Refuse a root ``zarr.json`` document that is not a store of this format, in one line."""
    attrs = root_doc.get("attributes") if isinstance(root_doc, dict) else None
    marker = attrs.get("scancache") if isinstance(attrs, dict) else None
    if not isinstance(marker, dict):
        raise StoreFormatError(f"{store}: not a scancache store (its zarr.json has no scancache attributes)")
    found = marker.get("format")
    if found != FORMAT_VERSION:
        raise StoreFormatError(
            f"{store}: store format {found!r}, but this scancache reads format {FORMAT_VERSION!r}; "
            "re-run `scancache preprocess` into a new store"
        )


def new_store_id() -> str:
    """A store's identity, written once when the store is created (``scancache.store_id``)."""
    return uuid.uuid4().hex


_STORE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)  # what new_store_id writes, and more


def store_identity(store: str | os.PathLike[str], root_doc: object, local: bool = True) -> str:
    """The store's ``scancache.store_id``; a store written before there was one gets an id
    derived from its root ``zarr.json`` (inode and modification time, never rewritten after
    creation): stable while the store stays where it is, another for a copy of it. (Stores on
    object storage always have one: they came with the version that wrote ids; else their URL.)"""
    attrs = root_doc.get("attributes") if isinstance(root_doc, dict) else None
    marker = attrs.get("scancache") if isinstance(attrs, dict) else None
    found = marker.get(STORE_ID_KEY) if isinstance(marker, dict) else None
    if isinstance(found, str) and found:
        if _STORE_ID.fullmatch(found) is None:  # it goes into every response's headers
            raise StoreFormatError(
                f"{store}: its zarr.json's scancache.store_id {found[:40]!r} is not an identifier"
            )
        return found
    if not local:
        return "derived-" + hashlib.sha256(str(store).encode()).hexdigest()[:24]
    st = os.stat(Path(store) / "zarr.json")
    digest = hashlib.sha256(f"{st.st_ino}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"derived-{digest[:24]}"


def validate_array_name(name: str) -> str:
    """``image``, ``mask``, or an image channel ``image_c1``, ``image_c2``, ..."""
    if name not in ARRAYS and channel_of(name) is None:
        raise InvalidPath(
            f"invalid array name {name!r}; expected one of {', '.join(ARRAYS)} or image_c1, image_c2, ..."
        )
    return name


@dataclass(frozen=True)
class ChunkLayout:
    """Inner chunk shape (y, x, z) and how many slices one shard holds."""

    chunks: tuple[int, int, int] = (64, 64, 8)  # service/layouts.py: why
    shard_depth: int = 32
    codec: str = "blosc-lz4"  # or "zstd" or "none"

    def __post_init__(self) -> None:
        if len(self.chunks) != 3 or any(int(c) < 1 for c in self.chunks):
            raise ValueError(f"chunks must be three positive integers, got {self.chunks}")
        if self.shard_depth < 1:
            raise ValueError(f"shard depth must be positive, got {self.shard_depth}")
        if self.codec not in ("blosc-lz4", "zstd", "none"):
            raise ValueError(f"unknown codec {self.codec!r}")

    @classmethod
    def parse(
        cls, text: str | Sequence[int], shard_depth: int | None = None, codec: str | None = None
    ) -> ChunkLayout:
        """``--chunks 64,64,8`` (or ``64x64x8``, or a preset's ``(64, 64, 8)``): the one parser of
        integer tuples, ``store.units.parse_int_tuple``; a ValueError names ``--chunks``."""
        from store.units import parse_int_tuple

        y, x, z = parse_int_tuple(text, "--chunks")
        base = cls()
        return cls(
            chunks=(y, x, z),
            shard_depth=base.shard_depth if shard_depth is None else shard_depth,
            codec=codec or base.codec,
        )

    def inner_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Inner chunks never larger than the volume."""
        return (
            min(self.chunks[0], int(shape[0])),
            min(self.chunks[1], int(shape[1])),
            min(self.chunks[2], int(shape[2])),
        )

    def shard_for(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """Whole slices per shard, rounded up to whole inner chunks (sharding requires it)."""
        cy, cx, cz = self.inner_for(shape)
        depth = min(max(self.shard_depth, cz), int(shape[2]))
        return (
            math.ceil(int(shape[0]) / cy) * cy,
            math.ceil(int(shape[1]) / cx) * cx,
            math.ceil(depth / cz) * cz,
        )

    def to_json(self) -> dict[str, Any]:
        return {"chunks": list(self.chunks), "shard_depth": self.shard_depth, "codec": self.codec}

    @classmethod
    def from_json(cls, found: Any) -> ChunkLayout | None:
        """The layout a scan records (its ``layout`` attribute), or None if it records none
        that is valid (scans written before it was recorded; a damaged attribute)."""
        try:
            base = cls()
            chunks = tuple(int(c) for c in found["chunks"])
            return cls(
                chunks=(chunks[0], chunks[1], chunks[2]) if len(chunks) == 3 else (0, 0, 0),
                shard_depth=int(found.get("shard_depth", base.shard_depth)),
                codec=str(found.get("codec", base.codec)),
            )
        except (TypeError, KeyError, ValueError, AttributeError, IndexError):
            return None


def _inner_codecs(codec: str, itemsize: int) -> list[dict[str, Any]]:
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "blosc-lz4":
        codecs.append(
            {
                "name": "blosc",
                "configuration": {
                    "cname": "lz4",
                    "clevel": 5,
                    # Byte shuffling groups like bytes of multi-byte values; a uint8 mask has
                    # none to group, and bitshuffle made its decode 2-4x slower (docs/tuning.md).
                    "shuffle": "shuffle" if itemsize > 1 else "noshuffle",
                    "typesize": itemsize,
                    "blocksize": 0,
                },
            }
        )
    elif codec == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    return codecs


def array_metadata(
    shape: Sequence[int], data_type: str, itemsize: int, layout: ChunkLayout
) -> dict[str, Any]:
    """The Zarr v3 ``zarr.json`` of an image (3D) or mask (4D, classes last) array."""
    vol = tuple(int(n) for n in shape[:3])
    inner = list(layout.inner_for(vol))
    shard = list(layout.shard_for(vol))
    names = ["y", "x", "z"]
    if len(shape) == 4:  # all classes of a voxel in one chunk: masks are read whole-channel
        inner.append(int(shape[3]))
        shard.append(int(shape[3]))
        names.append("class")
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [int(n) for n in shape],
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if data_type == "bool" else 0,  # zarr v3: a bool fill value is a JSON boolean
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": inner,
                    "codecs": _inner_codecs(layout.codec, itemsize),
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": names,
        "attributes": {},
    }


def group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


_MOVED_TO_SCAN_FILTERS = (
    "FILTER_KEYS",
    "has_any_class",
    "has_class_values",
    "matches",
    "why_nothing_matches",
)


def __getattr__(name: str) -> Any:
    """Names that moved to ``store.scan_filters`` (which imports this module), still found here."""
    if name in _MOVED_TO_SCAN_FILTERS:
        from store import scan_filters

        return getattr(scan_filters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

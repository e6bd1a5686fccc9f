"""The wire format: ``.npy`` bytes, and a stream of them for batches.

A single region is one ``.npy`` file (``application/x-npy``); ``numpy.load`` reads it. A batch
is the concatenation of several ``.npy`` payloads (``application/x-npy-stream``): each header
states shape and dtype, so the stream needs no other framing and decodes without copies. In a
batch asked with ``label_maps``, a mask region may come as two payloads, its label map (3-D)
and the table that merges it (2-D); a merged mask is 4-D, so the header tells which.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from store.label_map import Decoded, LabelRegion, apply_table

NPY_MEDIA_TYPE = "application/x-npy"
NPY_STREAM_MEDIA_TYPE = "application/x-npy-stream"
# decoded chunk bytes the server's read of a response needed (``io_counters``, docs/rest-api.md)
DECODED_BYTES_HEADER = "X-Scancache-Decoded-Bytes"
# the served store's identity (root attribute scancache.store_id), on every response
STORE_HEADER = "X-Scancache-Store"
# the version each scan of a data response was read at: ``scan_id=version`` pairs, comma-separated
VERSIONS_HEADER = "X-Scancache-Versions"
# a response names at most this many scans' versions (a header stays well under clients' limits)
MAX_VERSIONED_SCANS = 256


def versions_header(versions: dict[str, str]) -> str | None:
    """The ``X-Scancache-Versions`` value, or None past ``MAX_VERSIONED_SCANS`` scans."""
    if len(versions) > MAX_VERSIONED_SCANS:
        return None
    return ",".join(f"{scan_id}={version}" for scan_id, version in versions.items())


def parse_versions_header(value: str | None) -> dict[str, str]:
    """``versions_header`` read back; malformed pairs (a proxy's header) are skipped."""
    out: dict[str, str] = {}
    for pair in (value or "").split(","):
        scan_id, sep, version = pair.strip().partition("=")
        if sep and scan_id and version:
            out[scan_id] = version
    return out


def npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    return npy_header(arr) + arr.tobytes()


def encode_npy_parts(arr: np.ndarray) -> list[bytes | memoryview]:
    """Header and body apart, so a server can send the body without concatenating."""
    arr = np.ascontiguousarray(arr)
    return [npy_header(arr), memoryview(arr).cast("B")]  # type: ignore[arg-type]


def decode_npy(data: bytes | memoryview) -> np.ndarray:
    arrays = decode_npy_stream(data)
    if len(arrays) != 1:
        raise ValueError(f"expected one .npy array, found {len(arrays)}")
    return arrays[0]


def _header_size(view: memoryview, pos: int) -> int:
    """Bytes of magic plus header of the ``.npy`` payload at ``pos`` (version 1 or 2/3)."""
    if len(view) - pos < 10 or bytes(view[pos : pos + 6]) != b"\x93NUMPY":
        raise ValueError("not a .npy payload")
    if view[pos + 6] == 1:
        return 10 + int.from_bytes(view[pos + 8 : pos + 10], "little")
    return 12 + int.from_bytes(view[pos + 8 : pos + 12], "little")


def decode_npy_stream(data: bytes | memoryview) -> list[np.ndarray]:
    """Split concatenated ``.npy`` payloads into arrays (views into ``data``)."""
    view = memoryview(data)
    out: list[np.ndarray] = []
    pos = 0
    while pos < len(view):
        fp = io.BytesIO(view[pos : pos + _header_size(view, pos)])
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        if fortran:
            raise ValueError("fortran-ordered arrays are not supported on the wire")
        start = pos + fp.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes > len(view):
            raise ValueError("truncated .npy stream")
        out.append(np.frombuffer(view[start : start + nbytes], dtype=dtype).reshape(shape))
        pos = start + nbytes
    return out


def decode_batch(
    data: bytes | memoryview,
    masks: Sequence[bool],
    merge: bool = True,
    slice_major: Sequence[bool] | None = None,
) -> list[Decoded]:
    """The regions of a batch response, ``masks[i]`` telling whether region ``i`` is a mask;
    a mask sent as label map and table is merged here (``label_map.apply_table``), or with
    ``merge=False`` returned as a ``LabelRegion``. A 3-D payload of a region asked
    ``slice_major[i]`` is (d, h, w) and comes back as its (h, w, d) view."""
    flags = list(slice_major) if slice_major is not None else [False] * len(masks)
    arrays = decode_npy_stream(data)
    out: list[Decoded] = []
    pos = 0
    for i, is_mask in enumerate(masks):
        if pos >= len(arrays):
            raise ValueError(f"the stream's {len(arrays)} payloads end before region {i} of {len(masks)}")
        arr = arrays[pos]
        pos += 1
        if arr.ndim == 3 and i < len(flags) and flags[i]:
            arr = np.moveaxis(arr, 0, 2)  # (d, h, w) on the wire: each slice contiguous
        if is_mask and arr.ndim == 3:  # a label map: its table follows
            table = arrays[pos] if pos < len(arrays) else None
            if table is None or table.ndim != 2 or arr.dtype != np.uint8 or table.dtype != np.uint8:
                raise ValueError("a label map without its uint8 table")
            pos += 1
            out.append(apply_table(arr, table) if merge else LabelRegion(arr, table))
            continue
        out.append(arr)
    if pos != len(arrays):
        raise ValueError(f"{len(arrays) - pos} payloads left over after {len(masks)} regions")
    return out

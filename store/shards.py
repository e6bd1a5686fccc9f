"""Encoding scancache arrays: Zarr v3 shards written slab by slab, in exactly the store format.

The store format (``store/format.py``: ``sharding_indexed`` shards of whole slices holding
inner chunks encoded with ``bytes`` little endian plus blosc-lz4 / zstd / nothing, the index at
the end followed by its crc32c) is written here directly with the c-blosc and zstd that
numcodecs ships and google-crc32c, the libraries zarr-python decodes with; tests read every
layout back with zarr-python and tensorstore. Slabs arrive slice-major from the reader, each
inner chunk is gathered once into a reused buffer, compressed with numcodecs' documented
``blosc.compress`` / ``zstd.compress`` and appended to its shard file. Inner chunks equal to
the fill value (0) are left out, as zarr-python and tensorstore do, so empty mask regions cost
nothing. A 3D array's shard file also begins with the index of its chunks in (z, y, x) order,
so that the same file, hard-linked, is a shard of the array's OME view (``store/ome_views.py``)
at no extra space; readers of the stored array never look at it. Measured against tensorstore writing the same shards (``python -m
benchmarks.writepath``), this writer is 1.3-1.7x faster for images, which is why it stays;
calling c-blosc through ctypes into reused buffers was not measurably faster than numcodecs'
public function, so it is gone (docs/tuning.md, "The write path").

Everything runs in the calling thread, one chunk at a time: a Dask worker with one thread
uses one core, so N workers on N cores do not oversubscribe.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numcodecs import blosc, zstd

from store.format import ChunkLayout, array_metadata
from store.ome_views import encoded_index, zyx_index
from store.scratch import scratch

_MISSING = np.uint64(2**64 - 1)  # index entry of an inner chunk that is not stored


def _encoder(codec_doc: dict[str, object] | None) -> Callable[[np.ndarray, np.ndarray], int]:
    """``encode(chunk, out) -> n``: the codecs after ``bytes`` applied to a C-contiguous chunk,
    the result written to ``out[:n]`` (``out`` holds at least chunk bytes + 16 + 64)."""

    def copy_into(data: bytes | np.ndarray, out: np.ndarray) -> int:
        raw = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.reshape(-1).view(np.uint8)
        out[: raw.size] = raw
        return int(raw.size)

    if codec_doc is None:
        return copy_into
    name, config = codec_doc["name"], codec_doc["configuration"]
    assert isinstance(config, dict)
    if name == "blosc":
        # numcodecs' documented blosc.compress; called from a Dask worker's task thread it
        # compresses with one thread (numcodecs' use_threads default), as this module wants
        cname = str(config["cname"])
        clevel, typesize = int(config["clevel"]), int(config["typesize"])
        shuffles = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}
        shuffle = shuffles[str(config["shuffle"])]
        blocksize = int(config["blocksize"])
        return lambda chunk, out: copy_into(
            blosc.compress(chunk, cname.encode(), clevel, shuffle, blocksize, typesize), out
        )
    if name == "zstd":
        level, checksum = int(config["level"]), bool(config["checksum"])
        return lambda chunk, out: copy_into(zstd.compress(chunk, level, checksum), out)
    raise ValueError(f"no encoder for codec {name!r}")


def _records(array: np.ndarray) -> np.ndarray:
    """A 4D (..., C) array whose last axis is contiguous, seen as 3D records of C items.

    Gathering a mask chunk moves C-byte runs; numpy copies one C-byte record at a time
    about twice as fast as C separate bytes.
    """
    if array.ndim == 4 and array.strides[3] == array.itemsize:
        record = np.dtype((np.void, array.shape[3] * array.itemsize))
        return array.view(record)[..., 0]
    return array


class _OpenShard:
    """A shard file being appended to: chunks go in as they are encoded, the index last.

    Zarr v3 sharding finds every inner chunk through the index, so chunks may sit in the
    file in any order; here they are in the order slabs arrive (z-layer by z-layer). With
    ``view_index`` (3D arrays) the file also begins with the index of the same chunks in
    (z, y, x) order, so one file is both a shard of the stored array (index at the end) and a
    shard of its OME view (index at the start, ``store/ome_views.py``); each reader follows
    its own index's offsets and never reads the other.
    """

    def __init__(self, path: Path, grid: list[int], view_index: bool = False) -> None:
        self.path = path
        self.index = np.full((*grid, 2), _MISSING, dtype="<u8")
        self.fd = -1
        self.view_index = view_index and len(grid) == 3
        self.offset = len(encoded_index(self.index)) if self.view_index else 0

    def append(self, where: tuple[int, int, int], data: memoryview) -> None:
        if self.fd < 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0o666 less the umask, as every other file of the store (group-writable where a
            # shared store's umask 002 says so)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            if self.offset:  # room for the view's index, written once the offsets are known
                _write_all(self.fd, memoryview(bytes(self.offset)), self.path)
        _write_all(self.fd, data, self.path)
        self.index[where] = (self.offset, len(data))  # a trailing class axis has grid size 1
        self.offset += len(data)

    def finish(self) -> int:
        """Write the index (and its crc32c) and close; returns the file's size (0: no file,
        every chunk was the fill value)."""
        if self.fd < 0:
            return 0
        try:
            end = encoded_index(self.index)
            _write_all(self.fd, memoryview(end), self.path)
            if self.view_index:
                os.pwrite(self.fd, encoded_index(zyx_index(self.index)), 0)
            return self.offset + len(end)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShardedArrayWriter:
    """One array of a scan: ``zarr.json`` at creation, then shards as slabs of slices arrive.

    ``write_slab(z0, slab)`` takes slices ``z0 .. z0 + slab_depth`` (one inner chunk deep,
    fewer at the end) as an (H, W, dz[, C]) array of any strides, in increasing ``z0``; each
    inner chunk is gathered into a reused buffer, encoded into another and appended to its
    shard's file, whose index is written once its last slab is in (or at ``close``). So the
    caller needs only a chunk-deep slab of slices in memory, not a shard's or a scan's.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, layout: ChunkLayout) -> None:
        self.path, self.shape, self.dtype = path, tuple(int(n) for n in shape), np.dtype(dtype)
        meta = array_metadata(self.shape, self.dtype.name, self.dtype.itemsize, layout)
        sharding = meta["codecs"][0]["configuration"]
        self.inner = tuple(int(n) for n in sharding["chunk_shape"])
        self.shard = tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
        self._grid = [s // c for s, c in zip(self.shard, self.inner, strict=True)]
        after_bytes = sharding["codecs"][1:]
        self._encode = _encoder(after_bytes[0] if after_bytes else None)
        # the bytes codec is little endian: the gather buffer converts as it copies
        self._chunk = scratch(f"chunk-{path.name}", self.inner, self.dtype.newbyteorder("<"))
        self._chunk_bytes = self._chunk.reshape(-1).view(np.uint8)
        self._chunk_records = _records(self._chunk)
        bound = self._chunk.nbytes + self._chunk.nbytes // 128 + 1024  # >= blosc, zstd, raw sizes
        self._encoded = scratch(f"encoded-{path.name}", (bound,), np.uint8)
        self._open: dict[tuple[int, ...], _OpenShard] = {}
        self._next_z = 0
        self.bytes_written = 0
        path.mkdir(parents=True)
        doc = json.dumps(meta, indent=2).encode()
        (path / "zarr.json").write_bytes(doc)
        self.bytes_written += len(doc)

    @property
    def slab_depth(self) -> int:
        return self.inner[2]

    @property
    def pending(self) -> bool:
        """Whether slices are still to come (the array is not complete)."""
        return self._next_z < self.shape[2]

    def write_slab(self, z0: int, slab: np.ndarray) -> None:
        depth = min(self.slab_depth, self.shape[2] - z0)
        expected = (*self.shape[:2], depth, *self.shape[3:])
        if z0 != self._next_z or slab.shape != expected:
            raise ValueError(
                f"{self.path.name}: slab at z={z0} of shape {slab.shape}; "
                f"expected z={self._next_z} of shape {expected}"
            )
        self._next_z = z0 + depth
        # mask slabs move as C-byte records when their class axis is contiguous in memory
        records, dest = slab, self._chunk
        if slab.dtype == self._chunk.dtype and _records(slab).ndim < slab.ndim:
            records, dest = _records(slab), self._chunk_records
        # For one-byte integers zero bits are the fill value, so an empty chunk can be seen on
        # the source side (a max over contiguous runs) and never gathered; most of a mask is.
        precheck = slab if slab.dtype.itemsize == 1 and slab.dtype.kind in "ub" else None
        shard_z, layer = divmod(z0, self.shard[2])
        cy, cx = self.inner[:2]
        for y0, x0 in itertools.product(range(0, self.shape[0], cy), range(0, self.shape[1], cx)):
            (sy, iy), (sx, ix) = divmod(y0, self.shard[0]), divmod(x0, self.shard[1])
            where = (slice(y0, y0 + cy), slice(x0, x0 + cx))
            block = records[where]
            if precheck is not None and not precheck[where].max():
                continue
            if block.shape[:3] != self.inner[:3]:  # an edge chunk: the rest is the fill value
                self._chunk.fill(0)
                np.copyto(dest[: block.shape[0], : block.shape[1], : block.shape[2]], block)
            else:
                np.copyto(dest, block)
            if not self._chunk_bytes.any():  # all fill value, bit for bit (-0.0 is stored)
                continue
            size = self._encode(self._chunk, self._encoded)
            self._shard((sy, sx, shard_z)).append(
                (iy // cy, ix // cx, layer // self.inner[2]), self._encoded[:size].data
            )
        if self._next_z % self.shard[2] == 0 or self._next_z == self.shape[2]:
            self._finish_shards()

    def _shard(self, where: tuple[int, int, int]) -> _OpenShard:
        shard = self._open.get(where)
        if shard is None:
            key = [str(n) for n in where] + ["0"] * (len(self.shape) - 3)
            path = self.path.joinpath("c", *key)
            shard = self._open[where] = _OpenShard(path, self._grid, view_index=len(self.shape) == 3)
        return shard

    def _finish_shards(self) -> None:
        for shard in self._open.values():
            self.bytes_written += shard.finish()
        self._open.clear()

    def close(self) -> None:
        """Close any shard left open (an aborted scan); a finished array has none."""
        for shard in self._open.values():
            shard.close()
        self._open.clear()


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError as err:  # a full disk said with the file (and so the store) it filled
        raise OSError(err.errno, err.strerror, str(path)) from None

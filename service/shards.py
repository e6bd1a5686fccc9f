"""Encoding scancache arrays: Zarr v3 shards written slab by slab, in exactly the store format.

The store format (``client/layout.py``: ``sharding_indexed`` shards of whole slices holding
inner chunks encoded with ``bytes`` little endian plus blosc-lz4 / zstd / nothing, the index at
the end followed by its crc32c) is written here directly with numcodecs and google-crc32c, the
libraries zarr-python itself decodes with. Measured on a 384x384x160 scan with a 6-class mask
this costs about half of what a tensorstore write costs (docs/tuning.md, "Conversion"): the
slabs arrive slice-major from the reader, and the one gather per inner chunk into a reused
buffer is all the copying there is. Inner chunks equal to the fill value (0) are left out of
the shard, as zarr-python and tensorstore do, so empty mask regions cost no space.

Compression runs in the calling thread, one chunk at a time: a Dask worker with one thread
uses one core, so that N workers on N cores do not oversubscribe.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import blosc, zstd

from client.layout import ChunkLayout, array_metadata

_MISSING = np.uint64(2**64 - 1)  # index entry of an inner chunk that is not stored


def _encoder(codec_doc: dict[str, object] | None) -> Callable[[np.ndarray], bytes]:
    """The byte encoder after the ``bytes`` codec, from the array metadata's inner codec entry."""
    if codec_doc is None:
        return lambda chunk: chunk.tobytes()
    name, config = codec_doc["name"], codec_doc["configuration"]
    assert isinstance(config, dict)
    if name == "blosc":
        cname = str(config["cname"]).encode()
        clevel, typesize = int(config["clevel"]), int(config["typesize"])
        shuffle = {"noshuffle": blosc.NOSHUFFLE, "shuffle": blosc.SHUFFLE, "bitshuffle": blosc.BITSHUFFLE}[
            str(config["shuffle"])
        ]
        blocksize = int(config["blocksize"])
        return lambda chunk: blosc.compress(chunk, cname, clevel, shuffle, blocksize, typesize)
    if name == "zstd":
        level, checksum = int(config["level"]), bool(config["checksum"])
        return lambda chunk: zstd.compress(chunk, level, checksum)
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


class ShardedArrayWriter:
    """One array of a scan: ``zarr.json`` at creation, then shards as slabs of slices arrive.

    ``write_slab(z0, slab)`` takes slices ``z0 .. z0 + slab_depth`` (fewer at the end) as an
    (H, W, dz[, C]) array of any strides; ``z0`` must be a multiple of ``slab_depth`` (one
    shard deep), so every shard is written once, whole.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, layout: ChunkLayout) -> None:
        self.path, self.shape, self.dtype = path, tuple(int(n) for n in shape), np.dtype(dtype)
        meta = array_metadata(self.shape, self.dtype.name, self.dtype.itemsize, layout)
        sharding = meta["codecs"][0]["configuration"]
        self.inner = tuple(int(n) for n in sharding["chunk_shape"])
        self.shard = tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])
        after_bytes = sharding["codecs"][1:]
        self._encode = _encoder(after_bytes[0] if after_bytes else None)
        # the bytes codec is little endian: the gather buffer converts as it copies
        self._chunk = np.zeros(self.inner, self.dtype.newbyteorder("<"))
        self._chunk_bytes = self._chunk.reshape(-1).view(np.uint8)
        self._chunk_records = _records(self._chunk)
        self.bytes_written = 0
        path.mkdir(parents=True)
        doc = json.dumps(meta, indent=2).encode()
        (path / "zarr.json").write_bytes(doc)
        self.bytes_written += len(doc)

    @property
    def slab_depth(self) -> int:
        return self.shard[2]

    def write_slab(self, z0: int, slab: np.ndarray) -> None:
        depth = min(self.slab_depth, self.shape[2] - z0)
        expected = (*self.shape[:2], depth, *self.shape[3:])
        if z0 % self.slab_depth or slab.shape != expected:
            raise ValueError(f"{self.path.name}: slab at z={z0} has shape {slab.shape}, expected {expected}")
        # mask slabs move as C-byte records when their class axis is contiguous in memory
        records, dest = slab, self._chunk
        if slab.dtype == self._chunk.dtype and _records(slab).ndim < slab.ndim:
            records, dest = _records(slab), self._chunk_records
        # For one-byte integers zero bits are the fill value, so an empty chunk can be seen on
        # the source side (a max over contiguous runs) and never gathered; most of a mask is.
        precheck = slab if slab.dtype.itemsize == 1 and slab.dtype.kind in "ub" else None
        for sy, sx in itertools.product(
            range(math.ceil(self.shape[0] / self.shard[0])), range(math.ceil(self.shape[1] / self.shard[1]))
        ):
            y0, x0 = sy * self.shard[0], sx * self.shard[1]
            window = (slice(y0, y0 + self.shard[0]), slice(x0, x0 + self.shard[1]))
            key = [str(sy), str(sx), str(z0 // self.slab_depth)] + ["0"] * (len(self.shape) - 3)
            self._write_shard(records[window], dest, None if precheck is None else precheck[window], key)

    def _write_shard(
        self, region: np.ndarray, dest: np.ndarray, precheck: np.ndarray | None, key: list[str]
    ) -> None:
        grid = [s // c for s, c in zip(self.shard, self.inner, strict=True)]
        index = np.full((*grid, 2), _MISSING, dtype="<u8")
        parts: list[bytes] = []
        offset = 0
        cy, cx, cz = self.inner[:3]
        for iy, ix, iz in itertools.product(*(range(n) for n in grid[:3])):
            where = (
                slice(iy * cy, (iy + 1) * cy),
                slice(ix * cx, (ix + 1) * cx),
                slice(iz * cz, (iz + 1) * cz),
            )
            block = region[where]
            if block.size == 0:  # an inner chunk wholly past the array's edge
                continue
            if precheck is not None and not precheck[where].max():
                continue
            if block.shape[:3] != (cy, cx, cz):  # an edge chunk: the rest is the fill value
                self._chunk.fill(0)
                np.copyto(dest[: block.shape[0], : block.shape[1], : block.shape[2]], block)
            else:
                np.copyto(dest, block)
            if not self._chunk_bytes.any():  # all fill value, bit for bit (-0.0 is stored)
                continue
            encoded = self._encode(self._chunk)
            index[iy, ix, iz] = (offset, len(encoded))  # trailing class axis: grid size 1
            offset += len(encoded)
            parts.append(encoded)
        if not parts:  # an all-empty shard is simply absent, as the fill value
            return
        table = index.tobytes()
        parts.append(table)
        parts.append(np.uint32(google_crc32c.value(table)).astype("<u4").tobytes())
        target = self.path.joinpath("c", *key)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.bytes_written += _write_file(target, parts)


def _write_file(path: Path, parts: list[bytes]) -> int:
    """Write byte strings one after the other (``writev``: no joined copy of the shard)."""
    total = sum(len(part) for part in parts)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        views = [memoryview(part) for part in parts]
        while views:
            n = os.writev(fd, views[:512])
            written += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    finally:
        os.close(fd)
    return total

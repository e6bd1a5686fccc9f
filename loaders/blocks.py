"""Chunk-deep blocks: read the slices that share an inner chunk once, serve them all from memory.

A 2D example needs one slice, but the store decodes whole inner chunks (``64x64x8`` by
default): read slice by slice, every slice decodes eight, and at real scale (the data set
larger than every cache) each of them is decoded again for each of its slices. The slice
loaders therefore group their examples into *blocks*, the examples of one scan whose slice
falls in the same inner chunk along z, and the epoch order interleaves a window of blocks
(:func:`loaders.ordering.block_epoch_order`). :class:`BlockBuffer` reads a block's bounding
box (image, and mask with the categories merged) in one request the first time one of its
examples is wanted, cuts each example's windows from it, and drops it when its last example
of the epoch has been cut, so about a window of blocks is in memory at a time. Windows are cut
exactly as a read of the window would return them (:func:`loaders.geometry.take_window`), the
padding of windows that reach outside the volume included.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loaders.geometry import AxisRead, take_window
from loaders.registry import Element
from loaders.scans import (
    ScanEntry,
    element_reads,
    paired_reads,
    read_grouped_unmerged,
    read_in_slabs,
    scan_requests,
    sweep_exceeds_cache,
    take_mask_window,
)
from store.errors import RequestTooLarge
from store.interrupts import wait_event
from store.label_map import Decoded, LabelRegion

BlockKey = tuple[int, int]  # (scan index, inner-chunk index along z)


def chunk_depth(scan: ScanEntry) -> int:
    """The inner chunk depth along z of a scan's arrays (its ``layout`` attribute), 1 if unknown."""
    layout = scan.meta.attrs.get("layout") or {}
    chunks = layout.get("chunks") if isinstance(layout, dict) else None
    try:
        return max(1, int(chunks[2]))  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return 1


def block_key(element: Element, scans: Sequence[ScanEntry]) -> BlockKey:
    """The block of an element: its scan and the inner chunk of its output window's first slice."""
    scan = scans[element.scan]
    z = min(max(int(element.output_window[2][0]), 0), scan.shape[2] - 1)
    return (element.scan, z // chunk_depth(scan))


def block_ids(keys: Sequence[BlockKey]) -> list[int]:
    """One integer per block key (the order's ``block_of``)."""
    ids: dict[BlockKey, int] = {}
    return [ids.setdefault(k, len(ids)) for k in keys]


@dataclass(frozen=True)
class _Box:
    """The region read for a block: per axis ``[lo, hi)``, image and mask apart."""

    image: Span
    mask: Span


Span = tuple[tuple[int, int], ...]  # per axis [lo, hi)


def _widen(span: Span | None, axes: Sequence[AxisRead]) -> Span:
    """``span`` grown to cover the reads ``axes`` (the reads themselves when ``span`` is None)."""
    if span is None:
        return tuple((a.lo, a.hi) for a in axes)
    return tuple((min(lo, a.lo), max(hi, a.hi)) for (lo, hi), a in zip(span, axes, strict=True))


class _Slot:
    """One block in the buffer: filled once by the thread that reads it, waited on by others."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.arrays: tuple[np.ndarray, Decoded] | None = None
        self.error: BaseException | None = None


class BlockBuffer:
    """Blocks of one epoch's plan: ``read(elements)`` -> (image window, mask window) each.

    ``elements``/``order``: the epoch's elements and the ones this loader serves (counts of
    each block's uses, so a block leaves memory after its last use). ``capacity``: blocks kept
    at most in any access pattern (least recently used first out); a block evicted early is
    simply read again. Thread-safe: read-ahead threads share it.
    """

    def __init__(
        self,
        scans: Sequence[ScanEntry],
        elements: Sequence[Element],
        order: Sequence[int],
        keys: Sequence[BlockKey],
        pad_mode: str,
        background: bool,
        capacity: int,
    ) -> None:
        self.scans = scans
        self.pad_mode = pad_mode
        self.background = background
        self.capacity = max(1, int(capacity))
        # examples of each block still to be cut this epoch: a block leaves memory after its
        # last, also when it was evicted early and read again
        self._left = Counter(keys[i] for i in order)
        image_spans: dict[BlockKey, Span] = {}
        mask_spans: dict[BlockKey, Span] = {}
        for key, e in zip(keys, elements, strict=True):
            img_axes, mask_axes = element_reads(e, scans[e.scan].shape, pad_mode)
            image_spans[key] = _widen(image_spans.get(key), img_axes)
            mask_spans[key] = _widen(mask_spans.get(key), mask_axes)
        self._boxes = {k: _Box(image_spans[k], mask_spans[k]) for k in image_spans}
        # Each block is read once an epoch. A block whose box lies in one layer of inner chunks
        # (2D) is the only reader of those chunks; where the scans decode to more than the
        # source's chunk cache, the sweep evicts them before their next use, so caching them
        # only fills the cache with memory touched for the first time (a third more page
        # faults in a first 2D epoch; docs/tuning.md section 12). Those blocks skip the cache.
        # Blocks whose windows reach into the next layer (2.5D) share those chunks: cached.
        past = sweep_exceeds_cache(scans)
        self._uncached = {
            k
            for k, box in self._boxes.items()
            if k[0] in past and _within_layer(box, chunk_depth(scans[k[0]]))
        }
        self._slots: OrderedDict[BlockKey, _Slot] = OrderedDict()
        self._lock = threading.Lock()
        self.peak_blocks = 0  # most blocks held at once (tests, docs)

    def read(self, elements: Sequence[Element]) -> list[tuple[np.ndarray, Decoded]]:
        """(image window, mask window) of each element of a batch (elements of this plan); a
        mask window of a label-map scan is a ``LabelRegion`` (the loader writes its target
        from the labels: ``DataLoader.load_batch``)."""
        keys = [block_key(e, self.scans) for e in elements]
        unknown = [k for k in keys if k not in self._boxes]
        if unknown:
            raise ValueError(f"block {unknown[0]} is not part of this epoch's plan")
        mine: list[BlockKey] = []
        slots: dict[BlockKey, _Slot] = {}
        with self._lock:
            for key in dict.fromkeys(keys):
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
                    mine.append(key)
                self._slots.move_to_end(key)
                slots[key] = slot
            self._evict()
            self.peak_blocks = max(self.peak_blocks, len(self._slots))
        if mine:
            self._fill(mine, slots)
        out = []
        for element, key in zip(elements, keys, strict=True):
            slot = slots[key]
            wait_event(slot.ready)  # filled by another reader's thread; Ctrl-C between waits
            if slot.error is not None:
                raise slot.error
            assert slot.arrays is not None
            out.append(self._cut(element, key, slot.arrays))
        with self._lock:
            for key in keys:
                left = self._left[key]
                self._left[key] = left - 1
                # A block leaves memory with its last planned example. Examples served again
                # (batches of this epoch asked for twice: a replay, a second pass) find their
                # block's count spent: it then stays under the LRU bound, so the replay's other
                # examples of it reuse it instead of reading the whole block again each.
                if left == 1 and self._slots.get(key) is slots[key]:
                    del self._slots[key]
        return out

    def _fill(self, keys: list[BlockKey], slots: dict[BlockKey, _Slot]) -> None:
        """Read the blocks this thread registered, in one ``read_unmerged`` round per source."""
        requests = []
        for key in keys:
            box = self._boxes[key]
            # slice-major: every example takes whole slices, which are then contiguous
            keep = key not in self._uncached
            requests += scan_requests(
                self.scans[key[0]], _slices(box.image), _slices(box.mask), self.background, True, keep
            )
        arrays: list[Decoded]
        try:
            try:
                arrays = read_grouped_unmerged(requests)
            except RequestTooLarge:  # a server's --max-bytes below a block: slabs along z
                arrays = [read_in_slabs(src, req, req.roi) for src, req in requests]  # type: ignore[arg-type]
        except BaseException as err:
            with self._lock:
                for key in keys:
                    slots[key].error = err
                    if self._slots.get(key) is slots[key]:
                        del self._slots[key]  # the next batch that wants it tries again
                    slots[key].ready.set()
            raise
        for key, pair in zip(keys, paired_reads(arrays, [self.scans[k[0]] for k in keys]), strict=True):
            slots[key].arrays = pair
            slots[key].ready.set()

    def _cut(
        self, element: Element, key: BlockKey, arrays: tuple[np.ndarray, Decoded]
    ) -> tuple[np.ndarray, Decoded]:
        img_axes, mask_axes = element_reads(element, self.scans[element.scan].shape, self.pad_mode)
        box = self._boxes[key]
        image = take_window(arrays[0][_within(box.image, img_axes)], img_axes)
        mask, within = arrays[1], _within(box.mask, mask_axes)
        region = (
            LabelRegion(mask.labels[within], mask.table) if isinstance(mask, LabelRegion) else mask[within]
        )
        return image, take_mask_window(region, mask_axes)

    def _evict(self) -> None:
        """Least recently used first, never a block still being read (others wait on it)."""
        excess = len(self._slots) - self.capacity
        for key in [k for k, slot in self._slots.items() if slot.ready.is_set()][: max(0, excess)]:
            del self._slots[key]


def _within_layer(box: _Box, depth: int) -> bool:
    """Do the block's image and mask boxes lie in one layer of inner chunks along z?"""
    return all((lo // depth) == ((hi - 1) // depth) for lo, hi in (box.image[2], box.mask[2]))


def _slices(box: Span) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def _within(box: Span, axes: Sequence[AxisRead]) -> tuple[slice, ...]:
    """The element's read region ``[a.lo, a.hi)`` inside its block's box."""
    if any(a.lo < lo or a.hi > hi for (lo, hi), a in zip(box, axes, strict=True)):
        raise ValueError("an element's window lies outside its block: not an element of this plan")
    return tuple(slice(a.lo - lo, a.hi - lo) for (lo, _), a in zip(box, axes, strict=True))

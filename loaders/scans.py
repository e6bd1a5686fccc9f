"""The scans a loader reads, and reading windows of them from any ``ScanSource``.

A window is ``((y0, y1), (x0, x1), (z0, z1))`` in voxels and may reach outside the scan;
``window_reads`` turns it into the region to read and the gather that pads it (geometry), so
a window read from a store, a server or an in-memory volume comes out identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from loaders.catalog import shared_source
from loaders.class_index import refuse_overlap
from loaders.config import Config
from loaders.geometry import AxisRead, Window, padded_indices, take_window
from store.categories import Categories, Selection, format_names, parse_categories, resolve_categories
from store.errors import InvalidCategories, RequestTooLarge, ScanChanged, ScanNotFound, changed_message
from store.format import MASK, ScanMeta, image_arrays
from store.label_map import Decoded, LabelRegion, apply_table, has_label_map, merged
from store.protocol import RegionRequest, ScanSource


@dataclass(frozen=True)
class ScanEntry:
    """A scan of the loader's dataset: where it is, its metadata and the slices used."""

    index: int
    scan_id: str
    source: ScanSource = field(repr=False)
    meta: ScanMeta = field(repr=False)
    info: dict[str, Any] = field(repr=False)
    slices: tuple[int, ...]
    categories: Categories | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.meta.shape

    @property
    def channels(self) -> int:
        """Image channels K (``ScanMeta.channels``): x gets them as its last axis when K > 1."""
        return self.meta.channels

    @property
    def version(self) -> str | None:
        """The scan version the loader's plan rests on: every read of it asks for exactly this
        one, so a scan re-published mid-epoch is one ``ScanChanged`` error, never other voxels."""
        return self.meta.version

    def check_version(self, meta: ScanMeta) -> ScanMeta:
        """``meta`` read again later, refused (``ScanChanged``) if it is another version."""
        if self.version is not None and meta.version is not None and meta.version != self.version:
            raise ScanChanged(changed_message(self.scan_id, self.version, meta.version))
        return meta

    def inference_attributes(self) -> dict[str, Any]:
        """``scan_*`` keys for inference inputs: dataset-dict keys and scalar scan attributes."""
        out: dict[str, Any] = {}
        for key, value in self.meta.attrs.items():
            if key == "scan_id" or key.startswith("scancache"):
                continue
            if value is None or isinstance(value, (str, int, float, bool)):
                out[key if key.startswith("scan") else f"scan_{key}"] = value
        out["scan_shape"] = tuple(self.meta.shape)
        # MedSegPy's evaluators take scan_spacing for distances in mm (ASSD, Hausdorff)
        out["scan_spacing"] = tuple(self.meta.spacing)
        out.update({k: v for k, v in self.info.items() if k.startswith("scan") and k != "scan_id"})
        if self.meta.subject_id is not None:
            out["subject_id"] = self.meta.subject_id
        return out


def _metadata_of(source: ScanSource, scan_id: Any, location: Any) -> ScanMeta:
    """A dataset dict's scan, or one line naming the source and the ids it holds that are close
    (a MedSegPy OAI dict's "0000001_V00" is stored as "0000001_V00-Aug00")."""
    import difflib

    try:
        return source.metadata(str(scan_id))
    except ScanNotFound:
        ids = [m.scan_id for m in source.list_scans()]
        close = [i for i in ids if i.startswith(f"{scan_id}-")][:1] or difflib.get_close_matches(
            str(scan_id), ids, n=1
        )
        where = location if isinstance(location, str) else "its source"
        hint = f" (did you mean {close[0]!r}?)" if close else f" ({len(ids)} scans there)"
        raise ScanNotFound(f"dataset dict: scan {scan_id!r} is not in {where}{hint}") from None


def scans_from_dicts(
    dataset_dicts: Sequence[dict[str, Any]], cfg: Config, unlabelled: bool = False
) -> list[ScanEntry]:
    """Group dataset dicts by scan (first appearance order); per-slice dicts select slices.

    ``unlabelled`` (test loaders) admits scans without a mask: they can be predicted
    (``loader.inference``), not batched as (x, y). Otherwise such a scan is refused in one line."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in dataset_dicts:
        source = d["source"]
        key = (source if isinstance(source, str) else f"<{id(source)}>", d["scan_id"])
        grouped.setdefault(key, []).append(d)
    found: list[tuple[ScanSource, ScanMeta, dict[str, Any], tuple[int, ...]]] = []
    for dicts in grouped.values():
        first = dicts[0]
        source = shared_source(first["source"])
        meta = first.get("_meta") or _metadata_of(source, first["scan_id"], first["source"])
        depth = meta.shape[2]
        if all("slice_id" in d for d in dicts):
            slices = tuple(sorted({int(d["slice_id"]) - 1 for d in dicts}))  # MedSegPy: 1-indexed
            if slices[0] < 0 or slices[-1] >= depth:
                raise ValueError(f"scan {meta.scan_id!r}: slice_id out of 1..{depth}")
        else:
            slices = tuple(range(depth))
        if not meta.has_mask and not unlabelled:
            raise ValueError(
                f"scan {meta.scan_id!r} has no mask; training loaders need labelled scans "
                "(a test loader, is_test=True, predicts it: loader.inference(model) or write_predictions)"
            )
        if found and meta.channels != found[0][1].channels:  # one model input for every scan
            raise ValueError(
                f"scan {meta.scan_id!r} has {meta.channels} image channel(s), but scan "
                f"{found[0][1].scan_id!r} has {found[0][1].channels}: one loader needs the same channels in every scan"
            )
        found.append((source, meta, first, slices))
    selection = parse_categories(cfg.CATEGORIES, "CATEGORIES") if cfg.CATEGORIES else None
    # the scan that CATEGORIES' names resolve against: the first that has classes (a mask, or
    # the dataset's class names recorded without one)
    named = [meta for _, meta, _, _ in found if meta.named_classes > 0]
    reference = None
    if selection is not None and named:
        reference = (named[0].scan_id, scan_categories(selection, named[0], None))
    per_source: dict[int, tuple[ScanSource, list[str]]] = {}
    for source, meta, _, _ in found:
        per_source.setdefault(id(source), (source, []))[1].append(meta.scan_id)
    for source, scan_ids in per_source.values():
        expect = getattr(source, "expect_scans", None)  # a local store's caches hold every scan
        if expect is not None:
            expect(scan_ids)
    scans: list[ScanEntry] = []
    for index, (source, meta, first, slices) in enumerate(found):
        cats = None if selection is None else categories_of(selection, meta, reference)
        if cats is not None and cfg.Y_FORMAT == "class_index":
            refuse_overlap(cats, meta.scan_id)
        scans.append(ScanEntry(index, meta.scan_id, source, meta, first, slices, cats))
    return scans


def categories_of(
    selection: Selection, meta: ScanMeta, reference: tuple[str, Categories] | None
) -> Categories:
    """``CATEGORIES`` for one scan of a loader. A scan with classes resolves them itself
    (:func:`scan_categories`). One with neither a mask nor recorded class names (an image-only
    MedSegPy scan preprocessed without ``--class-names``) takes them as the loader's scans with
    classes resolve them (``reference``: the first such scan and its categories): one model
    predicts the same channels for every scan. Without any such scan there is nothing to check
    numbers against, so they are taken as given; a name is refused in one line."""
    if meta.named_classes > 0:
        return scan_categories(selection, meta, reference)
    if reference is not None:
        return reference[1]
    for group in selection:
        for k in group:
            if isinstance(k, str):
                raise InvalidCategories(
                    f"scan {meta.scan_id!r} has no mask and records no class names, so class {k!r} names "
                    "nothing: select classes by number, or preprocess it with --class-names",
                    "CATEGORIES",
                )
    return tuple(tuple(int(k) for k in group) for group in selection)


def scan_categories(
    selection: Selection, meta: ScanMeta, reference: tuple[str, Categories] | None
) -> Categories:
    """``CATEGORIES`` resolved against a scan's classes (``ScanMeta.named_classes``: its mask's,
    or the dataset's class names a scan without a mask records). Names resolve against the
    reference scan's class names (``reference``: its id and categories, None for the reference
    itself); every other scan must give each name used the same index (one channel means one
    class in every batch), else one line names the scan, the name and its classes."""
    try:
        cats = resolve_categories(selection, meta.named_classes, meta.class_names, "CATEGORIES")
    except InvalidCategories as exc:
        raise InvalidCategories(
            f"scan {meta.scan_id!r}: {str(exc)[len(exc.param) + 2 :]}", exc.param
        ) from None
    if reference is None or cats == reference[1]:
        return cats
    for group, theirs in zip(selection, reference[1], strict=True):
        for k, index in zip(group, theirs, strict=True):
            if isinstance(k, str) and meta.class_names.index(k) != index:
                raise ValueError(
                    f"CATEGORIES: class {k!r} is class {meta.class_names.index(k)} of scan {meta.scan_id!r}"
                    f" but class {index} of scan {reference[0]!r}: the scans of a loader must name their"
                    f" classes alike (scan {meta.scan_id!r} has {format_names(meta.class_names)})"
                )
    return cats


def window_reads(window: Window, shape: Sequence[int], mode: str) -> tuple[AxisRead, ...]:
    return tuple(padded_indices(a, b, int(n), mode) for (a, b), n in zip(window, shape, strict=True))


def element_reads(
    element: Any, shape: Sequence[int], mode: str
) -> tuple[tuple[AxisRead, ...], tuple[AxisRead, ...]]:
    """How to read an element's image window and its mask (target) window."""
    image = window_reads(element.window, shape, mode)
    mask = image if element.target is None else window_reads(element.target, shape, mode)
    return image, mask


def scan_requests(
    scan: ScanEntry,
    image_roi: tuple[slice, ...],
    mask_roi: tuple[slice, ...],
    background: bool,
    slice_major: bool = False,
    keep_in_cache: bool = True,
) -> list[tuple[ScanSource, RegionRequest]]:
    """The image and the merged-mask requests of one read of a scan (what the loaders read):
    one request per image channel (``image``, ``image_c1``, ...: the same region, so the same
    chunks of each channel's array), then the mask; :func:`paired_reads` puts the answers back
    together. ``slice_major`` for reads that are cut slice by slice, ``keep_in_cache`` False
    for reads of a sweep larger than the cache (``RegionRequest``)."""
    images = [
        RegionRequest(
            scan.scan_id,
            name,
            image_roi,
            slice_major=slice_major,
            keep_in_cache=keep_in_cache,
            version=scan.version,
        )
        for name in image_arrays(scan.channels)
    ]
    mask = replace(images[0], array=MASK, roi=mask_roi, categories=scan.categories, background=background)
    return [(scan.source, r) for r in (*images, mask)]


def paired_reads(arrays: Sequence[Decoded], scans: Sequence[ScanEntry]) -> list[tuple[np.ndarray, Decoded]]:
    """(image, mask) per read of :func:`scan_requests` (``scans``: the scan of each, in order);
    the image of a K-channel scan is its channels stacked last (:func:`stack_channels`)."""
    out: list[tuple[np.ndarray, Decoded]] = []
    pos = 0
    for scan in scans:
        k = scan.channels
        if k == 1:  # one image region, as it was read
            out.append((merged(arrays[pos]), arrays[pos + 1]))
        else:
            out.append((stack_channels([merged(a) for a in arrays[pos : pos + k]]), arrays[pos + k]))
        pos += k + 1
    if pos != len(arrays):
        raise ValueError(f"{len(arrays)} regions read for {pos} requested")
    return out


def stack_channels(channels: Sequence[np.ndarray]) -> np.ndarray:
    """(h, w, d) regions of each channel as one (h, w, d, K) array (one channel: itself).

    Regions read slice-major (an (h, w, d) view of (d, h, w) memory) are stacked as (d, h, w,
    K) memory, so that each slice's (h, w, K) stays contiguous for the slice loaders."""
    if len(channels) == 1:
        return channels[0]
    first = channels[0]
    if first.ndim == 3 and first.shape[2] > 1 and first.strides[2] > first.strides[0]:
        return np.moveaxis(np.stack([np.moveaxis(c, 2, 0) for c in channels], axis=-1), 0, 2)
    return np.stack(channels, axis=-1)


def sweep_exceeds_cache(scans: Sequence[ScanEntry]) -> set[int]:
    """Indices of the scans whose source's chunk cache (``cache_bytes``, where the source has
    one) holds less than all of that source's scans decoded (image, and label map or mask):
    for them an epoch that reads every chunk once is a cyclic sweep larger than the LRU."""
    decoded: dict[int, int] = {}
    for scan in scans:
        h, w, d = scan.shape
        mask_bytes = 1 if has_label_map(scan.meta.attrs) else scan.meta.num_classes
        voxel = np.dtype(scan.meta.dtype).itemsize * scan.channels + mask_bytes
        decoded[id(scan.source)] = decoded.get(id(scan.source), 0) + h * w * d * voxel
    return {s.index for s in scans if decoded[id(s.source)] > getattr(s.source, "cache_bytes", float("inf"))}


def cut_window(volume: np.ndarray, window: Window, mode: str) -> np.ndarray:
    """A window of an in-memory (H, W, D[, C]) volume, padded like a read from the store."""
    axes = window_reads(window, volume.shape[:3], mode)
    return take_window(volume[tuple(slice(a.lo, a.hi) for a in axes)], axes)


def take_mask_window(mask: Decoded, axes: Sequence[AxisRead]) -> Decoded:
    """``take_window`` of a mask region as read, a label map kept as labels (``LabelRegion``).

    Constant padding is all-zero channels, which no label stands for (label 0 is background):
    a window that reaches into it is merged first."""
    if not isinstance(mask, LabelRegion):
        return take_window(mask, axes)
    if any(a.fills for a in axes):
        return take_window(apply_table(mask.labels, mask.table), axes)
    return LabelRegion(take_window(mask.labels, axes), mask.table)


def read_grouped(requests: Sequence[tuple[ScanSource, RegionRequest]]) -> list[np.ndarray]:
    """Read requests from possibly several sources: one ``read_regions`` call per source."""
    return [merged(a) for a in _per_source(requests, lambda s, r: s.read_regions(r))]


def read_grouped_unmerged(requests: Sequence[tuple[ScanSource, RegionRequest]]) -> list[Decoded]:
    """As ``read_grouped``, label-map masks left unmerged (``ScanSource.read_unmerged``)."""
    return _per_source(requests, lambda s, r: s.read_unmerged(r))


def _per_source(
    requests: Sequence[tuple[ScanSource, RegionRequest]],
    read: Callable[[ScanSource, list[RegionRequest]], Sequence[Decoded]],
) -> list[Decoded]:
    """``read`` once per source with its requests; the results in request order."""
    by_source: dict[int, tuple[ScanSource, list[int]]] = {}
    for i, (source, _) in enumerate(requests):
        by_source.setdefault(id(source), (source, []))[1].append(i)
    out: list[Decoded | None] = [None] * len(requests)
    for source, positions in by_source.values():
        for i, arr in zip(positions, read(source, [requests[i][1] for i in positions]), strict=True):
            out[i] = arr
    return [a for a in out if a is not None]


def read_in_slabs(
    source: ScanSource, request: RegionRequest, region: tuple[slice, slice, slice]
) -> np.ndarray:
    """Read ``region``; if a server refuses it as too large (413), read its halves along z."""
    try:
        return source.read_regions([replace(request, roi=region)])[0]
    except RequestTooLarge:
        y, x, z = region
        if z.stop - z.start <= 1:
            raise
        mid = (z.start + z.stop) // 2
        halves = [(y, x, slice(z.start, mid)), (y, x, slice(mid, z.stop))]
        return np.concatenate([read_in_slabs(source, request, h) for h in halves], axis=2)

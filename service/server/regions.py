"""Planning region reads: validate, size and tag each region before anything is read.

A plan knows the output shape, dtype and byte cost of a request from the scan's metadata alone,
so oversize requests are refused (413) and unchanged ones answered (304) without touching
array data. Validation errors name the parameter, prefixed for batch items (``regions[3].roi``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.categories import Categories, categories_to_json, normalize_categories
from store.errors import (
    ArrayNotFound,
    InvalidCategories,
    InvalidPath,
    RequestTooLarge,
    ScanNotFound,
)
from store.format import ARRAYS, MASK, channel_of, validate_scan_id
from store.protocol import RegionRequest
from store.roi import Region, format_roi, parse_roi, region_shape
from store.source import LocalSource, check_request

WIRE_VERSION = 1  # bump to invalidate every cached region when the encoding changes


@dataclass(frozen=True)
class RegionPlan:
    """One validated region: what to read, what comes out, and what it costs."""

    scan_id: str
    array: str
    region: Region
    categories: Categories | None
    background: bool
    out_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    read_bytes: int
    version: str

    @property
    def out_bytes(self) -> int:
        return math.prod(self.out_shape) * self.dtype.itemsize

    @property
    def cost(self) -> int:
        """Bytes the server holds for this region: the raw read or the merged output."""
        return max(self.read_bytes, self.out_bytes)

    def request(self) -> RegionRequest:
        return RegionRequest(self.scan_id, self.array, self.region, self.categories, self.background)

    def tag(self) -> str:
        """Everything that determines the response bytes, normalized (``:`` == ``0:n``)."""
        cats = categories_to_json(self.categories) if self.array == MASK else None
        bg = self.background if self.array == MASK else False
        return (
            f"{WIRE_VERSION}|{self.scan_id}@{self.version}|{self.array}|{format_roi(self.region)}|{cats}|{bg}"
        )


def _located(exc: Exception, prefix: str, field: str) -> Exception:
    """A batch item's error names its field (``regions[2].scan_id``) in the body's ``param``;
    on the GET routes the path names the scan and the array."""
    if prefix:
        exc.param = prefix + field  # type: ignore[attr-defined]
    return exc


def plan_region(
    source: LocalSource,
    scan_id: str,
    array: str,
    roi: str | None,
    categories: Any = None,
    background: bool = False,
    prefix: str = "",
) -> RegionPlan:
    """Validate one region request against the scan's metadata. ``prefix`` locates batch items."""
    where = prefix.rstrip(".") + ": " if prefix else ""
    try:
        validate_scan_id(scan_id)
    except InvalidPath as exc:
        raise _located(InvalidPath(f"{where}{exc}"), prefix, "scan_id") from None
    channel = channel_of(array)  # image (0), image_c1 (1), ...; None for the mask
    if array not in ARRAYS and channel is None:
        expected = f"{', '.join(ARRAYS)} or an image channel image_c1, image_c2, ..."
        raise _located(
            ArrayNotFound(f"{where}no array {array!r}; expected one of {expected}"), prefix, "array"
        )
    try:
        version = source.version(scan_id)
        meta = source.metadata(scan_id)
    except ScanNotFound as exc:
        raise _located(ScanNotFound(f"{where}{exc}"), prefix, "scan_id") from None
    if array == MASK and not meta.has_mask:
        raise _located(ArrayNotFound(f"{where}scan {scan_id!r} has no mask"), prefix, "array")
    if channel is not None and channel >= meta.channels:
        raise _located(
            ArrayNotFound(f"{where}scan {scan_id!r} has no image channel {channel} (it has {meta.channels})"),
            prefix,
            "array",
        )
    if prefix:  # a batch item: a mask's fields on an image region are its "array" left out
        check_request(RegionRequest(scan_id, array, roi, categories, background), prefix)
    try:
        region = parse_roi(roi, meta.shape, param=prefix + "roi")
        cats = None
        if array == MASK and categories is not None:
            cats = normalize_categories(categories, meta.num_classes, meta.class_names)
    except RecursionError:  # json.loads of "[[[[..." deeper than the interpreter allows
        raise InvalidCategories("nested too deeply", param=prefix + "categories") from None
    except InvalidCategories as exc:
        if not prefix:
            raise
        raise InvalidCategories(str(exc)[len(exc.param) + 2 :], param=prefix + exc.param) from None
    voxels = region_shape(region)
    if channel is not None:  # channels share the image's dtype (store-format.md)
        dtype = np.dtype(meta.dtype)
        return RegionPlan(
            scan_id, array, region, None, False, voxels, dtype, math.prod(voxels) * dtype.itemsize, version
        )
    channels = (meta.num_classes if cats is None else len(cats)) + int(background)
    read_bytes = math.prod(voxels) * meta.num_classes
    return RegionPlan(
        scan_id, MASK, region, cats, background, (*voxels, channels), np.dtype(np.uint8), read_bytes, version
    )


def check_budget(plans: Sequence[RegionPlan], max_bytes: int) -> int:
    """Refuse (413) a request whose regions together exceed ``max_bytes``; returns the total."""
    total = sum(p.cost for p in plans)
    if total > max_bytes:
        what = "region needs" if len(plans) == 1 else f"{len(plans)} regions need"
        raise RequestTooLarge(
            f"the {what} {total} bytes, over the server's limit of {max_bytes} bytes (--max-bytes);"
            " request smaller regions"
        )
    return total

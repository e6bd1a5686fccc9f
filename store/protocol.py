"""The one narrow interface for reading scans: list, metadata, read a region.

``LocalSource`` (a store path, read with tensorstore) and ``HttpSource`` (a server URL)
implement it; loaders and the server know nothing else. ``tests/test_source_contract.py`` runs
one suite against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from store.categories import Categories
from store.errors import InvalidParameter
from store.format import IMAGE, MASK, ScanMeta, validate_array_name
from store.label_map import Decoded

RoiLike = str | Sequence[slice] | None


@dataclass(frozen=True)
class RegionRequest:
    """One region of one array: ``array`` is ``image``, an image channel ``image_c1``, ... (a
    multi-channel scan, ``ScanMeta.channels``) or ``mask``; ``roi`` covers (y, x, z).

    ``slice_major`` is a layout hint, never a change of values: the caller will use the region
    slice by slice, so a source may return an image or a label map as an (h, w, d) view of
    (d, h, w) memory, each z slice contiguous (``LocalSource`` does, at no cost: tensorstore
    lays the decoded chunks out so; over HTTP the payload is C order).

    ``keep_in_cache`` is a cache hint, never a change of values either: ``False`` when the
    caller reads these chunks once per pass over data larger than the source's chunk cache.
    An LRU swept cyclically by more than it holds never hits again, and filling it only costs
    memory touched for the first time, so ``LocalSource`` reads such regions past its cache;
    ``HttpSource`` leaves the choice to the server, which serves many readers.

    ``version`` is the scan version (``ScanMeta.version``) the caller's plan rests on (shape,
    class counts): a source refuses to read any other with ``ScanChanged``, naming the scan, so
    a scan re-published mid-epoch is one clear error, never other voxels. None: read the current
    version (``HttpSource`` still refuses one that differs from the version it saw first).
    """

    scan_id: str
    array: str = IMAGE
    roi: RoiLike = None
    categories: Categories | None = None
    background: bool = False
    slice_major: bool = False
    keep_in_cache: bool = True
    version: str | None = None


@runtime_checkable
class ScanSource(Protocol):
    def list_scans(self, **filters: Any) -> list[ScanMeta]:
        """Complete scans, sorted by id, that match attribute filters (see ``layout.matches``)."""
        ...

    def metadata(self, scan_id: str) -> ScanMeta:
        """Raises ``ScanNotFound`` (a ``KeyError``)."""
        ...

    def read_image(self, scan_id: str, roi: RoiLike = None, channel: int = 0) -> np.ndarray:
        """(h, w, d) of image channel ``channel`` in the stored dtype."""
        ...

    def read_mask(
        self,
        scan_id: str,
        roi: RoiLike = None,
        categories: Categories | Sequence[Any] | None = None,
        background: bool = False,
    ) -> np.ndarray:
        """(h, w, d, C') uint8 after category merging; raises ``ArrayNotFound`` if image-only."""
        ...

    def read_regions(self, requests: Sequence[RegionRequest]) -> list[np.ndarray]:
        """Many regions at once (concurrently, or in one round trip), in request order."""
        ...

    def read_unmerged(self, requests: Sequence[RegionRequest]) -> list[Decoded]:
        """As ``read_regions``, except that a mask of a scan with a label map may come unmerged,
        as a ``LabelRegion`` (its labels and the table that merges them), a fifth of the bytes
        at 4 categories plus background: the loaders write their float32 targets straight from
        it (``label_map.apply_table``). ``label_map.merged`` gives what ``read_regions`` would."""
        ...

    def close(self) -> None: ...


def check_request(request: RegionRequest, prefix: str = "") -> None:
    """What a request may not ask, refused alike by the server (``prefix`` locates a batch
    item) and a store read directly: an array that is not the scan's image, image channel or
    mask, and a mask's fields on an image region (they would be ignored: a request that lacks
    its mask ``array``)."""
    validate_array_name(request.array)
    if request.array != MASK and (request.categories is not None or request.background):
        field = "categories" if request.categories is not None else "background"
        raise InvalidParameter(
            prefix + field, f"only mask regions take {field} (this region's array is {request.array!r})"
        )

"""3D patch loaders: a grid (MedSegPy's ``PatchDataLoader``) and random foreground sampling."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from loaders.base import DataLoader, Element, register_loader
from loaders.config import Config
from loaders.geometry import blend_weights, normalize_per_axis
from loaders.sampling import (
    LOCATION_CACHE_BYTES,
    ClassLocations,
    ForegroundSampler,
    LocationCache,
    Sample,
    grid_windows,
)
from loaders.scans import ScanEntry, read_grouped
from store.format import MASK
from store.label_map import location_counts
from store.protocol import RegionRequest, ScanSource
from store.reader_share import memory_bytes
from store.units import format_bytes

LOCATION_READS = 8  # scans' stored locations read at once (a round trip each over HTTP)


@register_loader
class PatchDataLoader(DataLoader):
    """3D patches on a grid: ``IMG_SIZE = (h, w, d, 1)`` (x gets a channel) or ``(h, w, d)``;
    for scans of K > 1 image channels ``(h, w, d, K)``, x ``(N, h, w, d, K)``.

    Patches start every ``IMG_STRIDE`` (default: the patch size; smaller strides overlap)
    over the volume padded by ``IMG_PAD_SIZE`` voxels per side with ``IMG_PAD_MODE``; the
    last patch of each axis snaps to the end, so every voxel is covered. Volumes smaller
    than a patch are padded at the end. ``inference`` blends overlaps with ``BLEND_MODE``.
    """

    batch_fields: tuple[str, ...] = ("IMG_SIZE", "IMG_STRIDE", "IMG_PAD_SIZE")

    def __init__(
        self,
        cfg: Config,
        dataset_dicts: Sequence[dict[str, Any]],
        is_test: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int = 1,
        **sharding: Any,
    ) -> None:
        size = tuple(int(n) for n in cfg.IMG_SIZE)
        if len(size) == 4 and size[3] >= 1:  # the channels are checked against the scans below
            self.patch, self.add_channel = size[:3], True
        elif len(size) == 3:
            self.patch, self.add_channel = size, False
        else:
            raise ValueError(f"IMG_SIZE: 3D patches need (h, w, d, K) or (h, w, d), got {size}")
        self.stride = normalize_per_axis(cfg.IMG_STRIDE, 3, "IMG_STRIDE") or self.patch
        self.pad = normalize_per_axis(cfg.IMG_PAD_SIZE, 3, "IMG_PAD_SIZE") or (0, 0, 0)
        self.blend_mode = cfg.BLEND_MODE
        blend_weights((1, 1, 1), self.blend_mode)  # validates the mode early
        super().__init__(cfg, dataset_dicts, is_test, shuffle, drop_last, batch_size, **sharding)
        self._check_channels(size)
        self._check_fits(size)

    def _check_fits(self, size: tuple[int, ...]) -> None:
        """A batch of x and y that this machine cannot hold is refused now, naming IMG_SIZE,
        not at the first read as a MemoryError naming neither it nor the scan."""
        memory = memory_bytes()
        if memory is None or not self.scans:
            return
        voxels = math.prod(int(n) for n in self.patch)
        per_voxel = 4 * self.scans[0].channels + self.y_dtype.itemsize * (
            1 if self.class_index else self.num_classes()
        )
        need = self.batch_size * voxels * per_voxel
        if need > memory // 2:
            raise ValueError(
                f"IMG_SIZE {size} with batch_size {self.batch_size}: a batch of x and y takes "
                f"{format_bytes(need)}, more than half the memory this process may use ({format_bytes(memory)})"
            )

    def _check_channels(self, size: tuple[int, ...]) -> None:
        """IMG_SIZE's channels are the scans' image channels K: (h, w, d) only for K = 1."""
        if not self.scans:
            return
        channels = self.scans[0].channels
        wanted = size[3] if len(size) == 4 else 1
        if wanted != channels or (channels > 1 and len(size) == 3):
            raise ValueError(
                f"IMG_SIZE {size}: scan {self.scans[0].scan_id!r} has {channels} image channel(s); "
                f"use IMG_SIZE {(*size[:3], channels)}"
            )

    def examples_note(self) -> str:
        return f" ({len(self._plan[1])} patches of IMG_SIZE {self.patch} in {len(self.scans)} scans)"

    def grid(self, scan: ScanEntry) -> list[Element]:
        return [Element(scan.index, w) for w in grid_windows(scan.shape, self.patch, self.stride, self.pad)]

    def build_elements(self) -> Sequence[Any]:
        return [e for scan in self.scans for e in self.grid(scan)]

    def inference_elements(self, scan: ScanEntry) -> Sequence[Element]:
        return self.grid(scan)

    def model_input(self, image: np.ndarray, element: Element) -> np.ndarray:
        # (h, w, d) gets a channel axis; K > 1 channels come as (h, w, d, K) already
        return image[..., None] if self.add_channel and image.ndim == 3 else image

    @functools.cached_property
    def _weights(self) -> np.ndarray:
        return blend_weights(self.patch, self.blend_mode)

    def blend_weights(self, element: Element) -> np.ndarray | None:
        return self._weights


@register_loader
class RandomPatchDataLoader(PatchDataLoader):
    """Training patches drawn at random, ``FOREGROUND_RATIO`` of them centred on a labelled voxel.

    Each epoch holds ``PATCHES_PER_SCAN`` patches per scan; classes count as foreground if
    ``CATEGORIES`` selects them (all classes when it is empty). Draws are deterministic from
    ``SEED`` and the epoch (see ``loaders.sampling``). ``inference`` uses the grid.
    """

    # IMG_STRIDE is the inference grid's only; CATEGORIES decides what is foreground
    batch_fields = ("IMG_SIZE", "IMG_PAD_SIZE", "PATCHES_PER_SCAN", "FOREGROUND_RATIO", "CATEGORIES")

    def __init__(
        self,
        cfg: Config,
        dataset_dicts: Sequence[dict[str, Any]],
        is_test: bool = False,
        shuffle: bool = True,
        drop_last: bool = False,
        batch_size: int = 1,
        **sharding: Any,
    ) -> None:
        self.per_scan = int(cfg.PATCHES_PER_SCAN)
        self.ratio = float(cfg.FOREGROUND_RATIO)
        self._counts: dict[int, list[list[int]]] = {}
        self._locations = LocationCache(LOCATION_CACHE_BYTES)
        self._stored: dict[int, ClassLocations | None] = {}  # scan -> its store's locations
        super().__init__(cfg, dataset_dicts, is_test, shuffle, drop_last, batch_size, **sharding)

    @property
    def sampler(self) -> ForegroundSampler:  # not cached: load_state_dict may change the seed
        patch = (int(self.patch[0]), int(self.patch[1]), int(self.patch[2]))
        pad = (int(self.pad[0]), int(self.pad[1]), int(self.pad[2]))
        return ForegroundSampler(patch, pad, self.ratio, int(self.seed))

    def build_elements(self) -> Sequence[Any]:
        return self.sampler.plan(len(self.scans), self.per_scan, epoch=0)

    def epoch_elements(self, epoch: int) -> list[Any]:
        return list(self.sampler.plan(len(self.scans), self.per_scan, epoch=epoch))

    def _per_slice(self, scan_index: int) -> list[list[int]]:
        counts = self._counts.get(scan_index)
        if counts is None:
            scan = self.scans[scan_index]
            counts = scan.meta.class_voxels_per_slice()
            if not counts:  # a server's listing omits per-slice counts; the scan's metadata has them
                counts = scan.check_version(scan.source.metadata(scan.scan_id)).class_voxels_per_slice()
            self._counts[scan_index] = counts
        return counts

    def _foreground_classes(self, scan_index: int) -> list[int]:
        scan = self.scans[scan_index]
        if scan.categories is None:
            return list(range(scan.meta.num_classes))
        return sorted({k for group in scan.categories for k in group})

    def _locate(self, wanted: list[tuple[int, int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Voxels of class k in slice z, per ``(scan, k, z)``: cached, since a slice is drawn from
        again and again over epochs and finding them means reading (and decoding) a whole mask
        slice."""
        found = {key: self._locations.get(key) for key in set(wanted)}
        missing = [key for key, hit in found.items() if hit is None]
        if missing:
            requests: list[tuple[ScanSource, RegionRequest]] = []
            for scan_index, k, z in missing:
                scan = self.scans[scan_index]
                roi = (slice(None), slice(None), slice(z, z + 1))
                request = RegionRequest(scan.scan_id, MASK, roi, ((k,),), False, version=scan.version)
                requests.append((scan.source, request))
            for key, mask in zip(missing, read_grouped(requests), strict=True):
                ys, xs = np.nonzero(mask[:, :, 0, 0])
                index_type = np.int16 if max(mask.shape[:2]) < 2**15 else np.int32
                located = (ys.astype(index_type), xs.astype(index_type))
                self._locations.put(key, located)
                found[key] = located
        return [found[key] for key in wanted]  # type: ignore[misc]

    def _stored_locations(self, scan_index: int) -> ClassLocations | None:
        """The scan's stored foreground locations (format 2), read once; None without them."""
        if scan_index not in self._stored:
            scan = self.scans[scan_index]
            counts = location_counts(scan.meta.attrs)
            read = getattr(scan.source, "read_locations", None)
            rows = (
                read(scan.scan_id, rows=sum(counts), version=scan.version)
                if counts is not None and read is not None
                else None
            )
            self._stored[scan_index] = None if rows is None or counts is None else (rows, counts)
        return self._stored[scan_index]

    def _read_stored_locations(self, scan_indices: set[int]) -> None:
        """The stored locations of the scans a batch draws from and not read yet, concurrently:
        over HTTP each is a round trip, and a first epoch over thousands of scans would wait
        for them one after the other."""
        todo = [i for i in scan_indices if i not in self._stored]
        if len(todo) > 1:
            with ThreadPoolExecutor(
                min(LOCATION_READS, len(todo)), thread_name_prefix="scancache-locations"
            ) as pool:
                list(pool.map(self._stored_locations, todo))

    def resolve(self, samples: Sequence[Sample], epoch: int) -> list[Element]:
        self._read_stored_locations({s.scan for s in samples})
        windows = self.sampler.draw(
            samples,
            epoch,
            [s.shape for s in self.scans],
            self._per_slice,
            self._foreground_classes,
            self._locate,
            self._stored_locations,
        )
        return [Element(s.scan, w) for s, w in zip(samples, windows, strict=True)]

    def batch_elements(self, index: int, epoch: int | None = None) -> list[Any]:
        # The epoch goes with the plan's samples, so a read-ahead stays in its epoch.
        epoch = self.epoch if epoch is None else epoch
        return self.resolve(super().batch_elements(index, epoch), epoch)

"""``LocalSource``: reads a scancache store on a local (or mounted) filesystem.

tensorstore is the read engine: it decodes shards' inner chunks concurrently in C++ threads
without holding the GIL and keeps an LRU of decoded chunks capped in bytes (``cache_bytes``).
zarr-python reads the same store without our code; tensorstore is simply faster (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import numbers
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from store.categories import merge_mask, normalize_categories
from store.errors import (
    ArrayNotFound,
    ScanCacheError,
    ScanChanged,
    ScanDamaged,
    ScanNotFound,
    changed_message,
    one_line,
    warn_skipped,
)
from store.format import (
    MASK,
    ScanMeta,
    StoreFormatError,
    channel_array,
    channel_of,
    check_store_format,
    store_identity,
    validate_array_name,
    validate_scan_id,
)
from store.inventory import MANIFEST, manifest_mismatch
from store.label_map import (
    LABEL_MAP,
    LOCATIONS,
    Decoded,
    LabelRegion,
    category_table,
    has_label_map,
    merged,
)
from store.lru import BoundedLRU
from store.protocol import RegionRequest, RoiLike
from store.protocol import check_request as check_request  # where the server imports it
from store.reader_share import (
    default_cache_bytes,
    mark_tensorstore_used,
    rank_cores,
    read_threads,
    refuse_forked_reads,
)
from store.roi import Region, as_region, chunk_bytes_touched
from store.scan_filters import matches, normalized_filters
from store.storage import Storage, no_store_message, open_storage
from store.ts_status import is_damage, is_passing, result_or_damage
from store.ts_status import refused_read as refused_read  # where it was first
from store.units import parse_bytes

META_CACHE_ENTRIES = 4096  # scans whose metadata a LocalSource keeps (LRU) ...
ARRAY_CACHE_ENTRIES = 1024  # open tensorstore arrays it keeps (LRU); each holds no chunk data
# ... both grown to a store's or a loader's scans (expect_scans), up to these: an epoch visits
# every scan, and an LRU smaller than that cycle reopens every array every epoch
META_CACHE_MAX = 65536  # about 12 KiB each
ARRAYS_PER_SCAN = 4  # image, mask or label map, locations, and an uncached handle
ARRAY_CACHE_MAX = 32768  # about 10-20 KiB each
INTACT_CACHE_ENTRIES = 65536  # scan versions found intact (a listing each): a data set's worth
STORE_ID_TTL_S = 1.0  # how long the store's identity is trusted before its zarr.json is read again


class LocalSource:
    """A store read directly, without a server: a folder (local or mounted) or
    ``s3://BUCKET/PREFIX`` (``store.s3``). Thread-safe; cheap to create; ``close`` is optional.

    ``cache_bytes``: the decoded-chunk LRU (default :func:`default_cache_bytes`).

    Every call resolves each scan's current version once (the link
    ``STORE/<scan_id> -> .versions/<scan_id>/<version>``, or on S3 its pointer object, trusted
    for a second) and reads that version, so one call never mixes two versions and never sees
    a gap while a job re-publishes; the next call reads the new version. Metadata and open
    arrays are cached by version, in LRUs bounded in entries.
    """

    _store_id: str
    _store_id_read: float
    _store_id_lock: threading.Lock

    @property
    def store_id(self) -> str:
        """The store's identity, read again in the background at most once a second: a store
        deleted and written anew at the same path (another store to its clients) is served
        under its own id, not under the id the process started with. Never blocks: the server
        asks it on its event loop, and on S3 a read may wait for a slow endpoint."""
        now = time.monotonic()
        if now - self._store_id_read >= STORE_ID_TTL_S and self._store_id_lock.acquire(blocking=False):
            self._store_id_read = now  # one refresh at a time; the next one a second after it
            threading.Thread(target=self._refresh_store_id, name="scancache-store-id", daemon=True).start()
        return self._store_id

    def _refresh_store_id(self) -> None:
        try:
            data = self.storage.read("zarr.json")
            if data is not None:
                self._store_id = store_identity(self.root, json.loads(data), local=self.storage.is_local)
        except (OSError, ValueError, ScanCacheError):
            pass  # gone or half-written for a moment: the last id until it reads again
        finally:
            self._store_id_read = time.monotonic()
            self._store_id_lock.release()

    def __init__(self, path: str | os.PathLike[str] | Storage, cache_bytes: int | None = None) -> None:
        self.storage = open_storage(path)
        self.root = self.storage.local_path() or Path(self.storage.url)
        data = self.storage.read("zarr.json")
        if data is None:
            raise FileNotFoundError(no_store_message(self.storage))
        try:
            root_doc = json.loads(data)
        except ValueError:
            raise StoreFormatError(
                f"{self.storage}: not a scancache store (its zarr.json is not JSON)"
            ) from None
        check_store_format(self.storage, root_doc)
        # the server sends it to clients (see store_id: it follows a store replaced in place)
        self._store_id = store_identity(self.root, root_doc, local=self.storage.is_local)
        self._store_id_read = time.monotonic()
        self._store_id_lock = threading.Lock()
        if cache_bytes is None:
            cache_bytes = default_cache_bytes()
        # "512M" as in the environment; a negative or fractional size in one line naming it
        cache_bytes = parse_bytes(cache_bytes, "cache_bytes")
        self.cache_bytes = int(cache_bytes)
        threads = read_threads() or max(2, rank_cores())
        resources: dict[str, Any] = {
            "cache_pool": {"total_bytes_limit": int(cache_bytes)},
            "data_copy_concurrency": {"limit": threads},
        }
        if read_threads() is not None:
            resources["file_io_concurrency"] = {"limit": threads}
        self._context = ts.Context(resources)
        # reads asked not to fill the cache (``RegionRequest.keep_in_cache``): same resources, no LRU
        self._uncached = ts.Context(
            ts.Context.Spec({"cache_pool": {"total_bytes_limit": 0}}), parent=self._context
        )
        # scan_id -> (version, metadata)
        self._meta: BoundedLRU[tuple[str, ScanMeta]] = BoundedLRU(META_CACHE_ENTRIES)
        # (scan_id, name, version, cached) -> (tensorstore, inner chunk shape, itemsize)
        self._arrays: BoundedLRU[Any] = BoundedLRU(ARRAY_CACHE_ENTRIES)
        # (scan_id, version) -> when its files were last found as its manifest lists them
        self._intact: BoundedLRU[float] = BoundedLRU(INTACT_CACHE_ENTRIES)
        self._expected: set[str] = set()  # the scans listings and loaders said they will read
        self._counters_lock = threading.Lock()
        self._counters = {"bytes_decoded": 0, "bytes_returned": 0, "read_s": 0.0, "regions": 0}

    def __repr__(self) -> str:
        return f"LocalSource({self.storage.url!r})"

    # -- metadata ---------------------------------------------------------------------------
    def _current(self, scan_id: str) -> str:
        version = self.storage.current_version(scan_id)
        if version is None:  # no link: never published, removed, or a file in the store root
            raise ScanNotFound(f"scan {scan_id!r} not found")
        return version

    def _state(self, scan_id: str) -> tuple[str, ScanMeta]:
        """(version, metadata) of a scan's current version: one ``readlink``."""
        validate_scan_id(scan_id)
        version = self._current(scan_id)
        cached = self._meta.get(scan_id)
        if cached is not None and cached[0] == version:
            return cached
        folder = self.storage.version_key(scan_id, version)
        data = self.storage.read(f"{folder}/zarr.json")
        if data is None:
            if self._current(scan_id) == version and self.storage.sizes(folder):
                raise ScanDamaged(scan_id, "its zarr.json is missing")  # still current, files there
            raise ScanNotFound(f"scan {scan_id!r} not found")  # the version was removed under us
        try:
            meta = ScanMeta.from_attrs(json.loads(data)["attributes"], version)
        except (KeyError, ValueError, TypeError):
            # a published version is never changed: a zarr.json that does not parse was damaged
            # after publication (verify reports it TORN)
            raise ScanDamaged(scan_id, "its zarr.json is not a scan's") from None
        state = (version, meta)
        self._meta.put(scan_id, state)
        return state

    def metadata(self, scan_id: str) -> ScanMeta:
        return self._state(scan_id)[1]

    def version(self, scan_id: str) -> str:
        """The scan's published version (an opaque tag): it changes whenever the scan is
        re-published (the server derives HTTP ETags from it)."""
        return self._state(scan_id)[0]

    def scan_ids(self) -> list[str]:
        return self.storage.published_names()

    def expect_scans(self, scan_ids: Iterable[str] | int) -> None:
        """Keep the metadata and open arrays of these scans (a listing's, a loader's), with those
        expected before: a training and a validation loader sharing this source both stay open.
        A count (as before 2026-12-08) keeps that many more than the scans named so far."""
        with self._store_id_lock:
            if isinstance(scan_ids, numbers.Integral) and not isinstance(scan_ids, bool):
                count = len(self._expected) + int(scan_ids)
            else:
                names: Iterable[str] = [scan_ids] if isinstance(scan_ids, str) else scan_ids  # type: ignore[assignment]
                self._expected.update(names)
                count = len(self._expected)
        self._meta.at_least(min(META_CACHE_MAX, count + 64))
        self._arrays.at_least(min(ARRAY_CACHE_MAX, ARRAYS_PER_SCAN * count + 64))

    def list_scans(self, **filters: Any) -> list[ScanMeta]:
        """Every readable scan matching ``filters``; a damaged or unreadable one is left out
        with a warning naming it (as a server's listing says it, ``warn_skipped``)."""
        filters = normalized_filters(filters)
        out: list[ScanMeta] = []
        skipped: list[str] = []
        refusals: list[PermissionError] = []
        names = self.scan_ids()
        self.expect_scans(names)
        for scan_id in names:
            try:
                meta = self.metadata(scan_id)
            except ScanNotFound as err:
                if self.storage.current_version(scan_id) is None:
                    continue  # unpublished meanwhile: simply not there
                skipped.append(f"{scan_id} ({one_line(err, 160)})")  # a link to a version gone
                continue
            except (KeyError, ValueError, ScanDamaged, PermissionError) as err:  # damaged, unreadable
                if isinstance(err, PermissionError):
                    refusals.append(err)
                skipped.append(f"{scan_id} ({one_line(err, 160)})")
                continue
            if matches(meta, filters):
                out.append(meta)
        if names and len(refusals) == len(names):
            raise refusals[0]  # no scan readable: the store refuses this reader, not "no scans"
        warn_skipped(self.storage.url, skipped)
        return out

    # -- arrays -----------------------------------------------------------------------------
    def _array(self, scan_id: str, name: str, state: tuple[str, ScanMeta] | None = None) -> Any:
        return self._opened(scan_id, name, state)[0]

    def _opened(
        self, scan_id: str, name: str, state: tuple[str, ScanMeta] | None = None, cached: bool = True
    ) -> tuple[Any, tuple[int, ...], int]:
        """(array, inner chunk shape, itemsize): the chunk geometry feeds ``io_counters``.
        ``cached=False``: a handle on the same array whose reads bypass the chunk cache."""
        if name not in (LABEL_MAP, LOCATIONS):  # derived arrays are opened only from here
            validate_array_name(name)
        version, meta = state or self._state(scan_id)
        if name == MASK and not meta.has_mask:
            raise ArrayNotFound(f"scan {scan_id!r} has no mask")
        channel = channel_of(name)
        if channel is not None and channel >= meta.channels:
            raise ArrayNotFound(f"scan {scan_id!r} has no image channel {channel} (it has {meta.channels})")
        self._check_intact(scan_id, version, meta, name)
        key = (scan_id, name, version, cached)
        opened = self._arrays.get(key)
        if opened is None:
            spec = {
                "driver": "zarr3",
                "kvstore": self.storage.kvstore(f"{self.storage.version_key(scan_id, version)}/{name}"),
                # A published version's files never change (a new version gets new keys), so
                # cached chunks and shard indexes need no revalidation: tensorstore's default
                # re-checks them on every read, one conditional request per shard on S3 (a
                # stat locally) even when every chunk is in the cache (docs/tuning.md 13).
                "recheck_cached_data": False,
                "recheck_cached_metadata": False,
            }
            mark_tensorstore_used()
            try:
                context = self._context if cached else self._uncached
                arr = ts.open(spec, context=context, read=True, open=True).result()
            except ValueError as err:
                manifest = meta.attrs.get(MANIFEST)
                written = isinstance(manifest, dict) and f"{name}/zarr.json" in manifest
                if written and is_damage(err):
                    raise ScanDamaged(scan_id, f"its {name} array does not open") from err
                if is_passing(err):  # storage that failed for now: as it is, so it is retried
                    raise
                raise ArrayNotFound(f"scan {scan_id!r} has no array {name!r}") from None
            if name != LOCATIONS and tuple(arr.shape[:3]) != tuple(meta.shape[:3]):
                # its attributes edited or from another version: every region check would be wrong
                raise ScanDamaged(
                    scan_id,
                    f"its {name} array is {tuple(arr.shape[:3])}, its attributes say {tuple(meta.shape[:3])}",
                )
            inner = tuple(int(n or 1) for n in arr.chunk_layout.read_chunk.shape or arr.shape)
            opened = (arr, inner, int(arr.dtype.numpy_dtype.itemsize))
            self._arrays.put(key, opened)
        return opened  # type: ignore[no-any-return]

    def _check_intact(self, scan_id: str, version: str, meta: ScanMeta, name: str) -> None:
        """A scan version's files are there at the sizes its manifest lists: all of them when
        the version is first read (a stat of each in a folder, one LIST request on object
        storage), then the files of the array read, every ``storage.intact_recheck_s`` of
        reading it (on object storage, where a listing is a billed request, never). A shard file
        lost after publication would otherwise read as zeros, tensorstore's fill value for a
        missing chunk, also in a process (a server) that read the scan before the loss."""
        manifest = meta.attrs.get(MANIFEST)
        if manifest is None:  # stores before manifests
            return
        now = time.monotonic()
        whole, part = (scan_id, version, ""), (scan_id, version, name)
        all_checked = self._intact.get(whole)
        first = all_checked is None
        if all_checked is not None:
            checked = self._intact.get(part) or all_checked
            every = self.storage.intact_recheck_s
            if every is None or now - checked < every:
                return
        listed = manifest if isinstance(manifest, dict) else {}
        wanted = listed if first else {k: v for k, v in listed.items() if k.startswith(f"{name}/")}
        folder = self.storage.version_key(scan_id, version)
        sizes = self.storage.sizes_of(folder, wanted)
        if wanted and not sizes and self.storage.read_size(f"{folder}/zarr.json") is None:
            raise ScanNotFound(f"scan {scan_id!r} not found")  # the version was removed under us
        problem = manifest_mismatch(sizes, meta.attrs, None if first else name)
        if problem is not None:
            raise ScanDamaged(scan_id, problem)
        self._intact.put(whole if first else part, now)

    def region(self, scan_id: str, roi: RoiLike) -> Region:
        return as_region(roi, self.metadata(scan_id).shape)

    def _uses_label_map(self, req: RegionRequest, meta: ScanMeta) -> bool:
        return req.array == MASK and has_label_map(meta.attrs)

    def _start(self, req: RegionRequest, state: tuple[str, ScanMeta], batch: Any = None) -> tuple[Any, int]:
        """The read's future and the decoded chunk bytes it needs (``io_counters``)."""
        region = as_region(req.roi, state[1].shape)
        name = LABEL_MAP if self._uses_label_map(req, state[1]) else req.array
        arr, inner, itemsize = self._opened(req.scan_id, name, state, req.keep_in_cache)
        view = arr[region]
        if self._slice_major(req, state[1]):  # z first: tensorstore writes each slice contiguous
            view = view[ts.d[2].transpose[0]]
        return view.read(batch=batch), chunk_bytes_touched(region, inner, itemsize)

    def _slice_major(self, req: RegionRequest, meta: ScanMeta) -> bool:
        """Honour the hint for 3-D arrays (image channels, label map), not for a (h, w, d, C) mask."""
        return req.slice_major and (channel_of(req.array) is not None or self._uses_label_map(req, meta))

    def _finish(self, req: RegionRequest, data: np.ndarray, meta: ScanMeta) -> Decoded:
        """What the read returns, before any label-map merge (see ``read_decoded``)."""
        if self._slice_major(req, meta):
            data = np.moveaxis(data, 0, 2)  # (h, w, d) again, as a view
        if req.array != MASK:  # an image channel
            return data
        cats = (
            None
            if req.categories is None
            else normalize_categories(req.categories, meta.num_classes, meta.class_names)
        )
        if self._uses_label_map(req, meta):  # data is the label map: merged through a table
            return LabelRegion(data, category_table(cats, req.background, meta.num_classes))
        if req.categories is None and not req.background:
            return data
        return merge_mask(data, cats, req.background)

    def read_decoded(self, requests: Sequence[RegionRequest]) -> tuple[list[Decoded], int]:
        """The regions as read, a label-map mask left as ``LabelRegion`` (labels and table), and
        the decoded chunk bytes the reads touched. The server sends label maps as they are
        (a fifth of the merged mask's bytes at 4 categories plus background) and the client
        merges; ``read_regions`` merges here."""
        out, decoded, _ = self.read_versioned(requests)
        return out, decoded

    def read_versioned(self, requests: Sequence[RegionRequest]) -> tuple[list[Decoded], int, dict[str, str]]:
        """``read_decoded`` and the version each scan was read at (the server reports them).
        A request that names a ``version`` other than the scan's current one is refused
        (``ScanChanged``) before anything is read."""
        # Each scan's zarr.json is checked once per call (not once per region), then every read
        # is started before waiting on any: tensorstore runs them concurrently.
        refuse_forked_reads()
        for r in requests:
            check_request(r)
        started = time.perf_counter()
        states: dict[str, tuple[str, ScanMeta]] = {}
        for r in requests:
            if r.scan_id not in states:
                states[r.scan_id] = self._state(r.scan_id)
            if r.version is not None and r.version != states[r.scan_id][0]:
                raise ScanChanged(changed_message(r.scan_id, r.version, states[r.scan_id][0]))
        # One tensorstore batch for the call: on object storage the reads of neighbouring inner
        # chunks of one shard may share range requests.
        with ts.Batch() as batch:
            reads = [self._start(r, states[r.scan_id], batch) for r in requests]
        out = [
            self._finish(r, result_or_damage(r, f), states[r.scan_id][1])
            for r, (f, _) in zip(requests, reads, strict=True)
        ]
        decoded = sum(n for _, n in reads)
        with self._counters_lock:
            counters = self._counters
            counters["bytes_decoded"] += decoded
            counters["bytes_returned"] += sum(a.nbytes for a in out)
            counters["read_s"] += time.perf_counter() - started
            counters["regions"] += len(out)
        return out, decoded, {scan_id: state[0] for scan_id, state in states.items()}

    def read_regions(self, requests: Sequence[RegionRequest]) -> list[np.ndarray]:
        return [merged(a) for a in self.read_unmerged(requests)]

    def read_unmerged(self, requests: Sequence[RegionRequest]) -> list[Decoded]:
        return self.read_decoded(requests)[0]

    def io_counters(self) -> dict[str, Any]:
        """Cumulative since the source was opened: ``bytes_decoded`` (decoded bytes of the
        inner chunks the reads touched, whether the chunk cache held them or not),
        ``bytes_returned`` (bytes of the arrays returned), ``read_s``, ``regions``."""
        with self._counters_lock:
            return dict(self._counters)

    def read_locations(
        self, scan_id: str, rows: int | None = None, version: str | None = None
    ) -> np.ndarray | None:
        """(N, 3) int32 foreground locations (class-sorted, ``location_counts``), or None for a
        scan written without them. ``rows`` and ``version``: for remote sources (reads here name
        the current version, which loaders check with their own reads)."""
        refuse_forked_reads()
        state = self._state(scan_id)
        if state[1].attrs.get("location_counts") is None:
            return None
        return np.asarray(self._array(scan_id, LOCATIONS, state).read().result(), dtype=np.int32)

    def read_image(self, scan_id: str, roi: RoiLike = None, channel: int = 0) -> np.ndarray:
        return self.read_regions([RegionRequest(scan_id, channel_array(channel), roi)])[0]

    def read_mask(
        self,
        scan_id: str,
        roi: RoiLike = None,
        categories: Any = None,
        background: bool = False,
    ) -> np.ndarray:
        meta = self.metadata(scan_id)
        cats = (
            None
            if categories is None
            else normalize_categories(categories, meta.num_classes, meta.class_names)
        )
        return self.read_regions([RegionRequest(scan_id, MASK, roi, cats, background)])[0]

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its location and cache size: the copy opens its own arrays and cache (a
        spawned worker's; a forked one may not use its parent's, see refuse_forked_reads)."""
        return (LocalSource, (self.storage.url, self.cache_bytes))

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._arrays.clear()
        self._meta.clear()
        self._intact.clear()

"""``HttpSource``: the ``ScanSource`` protocol over a scancache server's REST API.

One pooled ``httpx.Client`` (keep-alive connections, thread-safe) serves every thread. Batches
of regions go through ``POST /batch`` and come back as one ``application/x-npy-stream``; a
large batch is split over a few concurrent requests. Every request is a read (GET, or the
read-only batch POST), so connection errors, timeouts, 408, 429 and 5xx are retried with
exponential backoff and jitter for up to ``retry_seconds`` in all (a restarted server takes
seconds to answer; a training run should ride that out), honouring ``Retry-After``; other 4xx
become the same typed errors ``LocalSource`` raises. Every answer is checked against the store
and scan versions this source knows it reads (``client.identity``): another store behind the
URL, or a scan re-published since its metadata, is one ``ScanChanged`` error.

Settings (arguments, else environment, else default): ``timeout`` seconds for one attempt of a
request in all, connect to last byte (``SCANCACHE_HTTP_TIMEOUT``, 30; ``client.deadline``: a
server that trickles bytes cannot stretch it), ``retry_seconds`` total time to keep retrying one request
(``SCANCACHE_RETRY_SECONDS``, 120), ``retries`` most retries of one request
(``SCANCACHE_RETRIES``, unlimited within ``retry_seconds``).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import httpx
import numpy as np

from client import deadline
from client.http_batch import BatchPoster, direct_http
from client.http_regions import IoCounters, by_scans, categories_json, region_json, roi_text
from client.identity import ServedIdentity
from client.retries import RetryPolicy
from client.wire import (
    MAX_VERSIONED_SCANS,
    decode_batch,
    decode_npy,
)
from store.errors import (
    ArrayNotFound,
    InvalidParameter,
    RequestTooLarge,
    ScanCacheError,
    ScanChanged,
    ScanNotFound,
    ServerError,
    SourceClosed,
    changed_message,
    one_line,
    warn_skipped,
)
from store.format import IMAGE, MASK, ScanMeta, channel_array, validate_scan_id
from store.interrupts import results_of
from store.label_map import Decoded, merged
from store.protocol import RegionRequest, RoiLike
from store.scan_filters import matches, normalized_filters
from store.units import parse_token

TOKEN_ENV = "SCANCACHE_TOKEN"
# Filters the server understands as query parameters; every filter is also applied here.
SERVER_FILTERS = ("split", "subject_id", "time_point", "augmentation", "has_class")


def _plain_integers(value: Any) -> bool:
    """Values the server's integer filters take as they are (ints, not bools or floats)."""
    items = value if isinstance(value, (list, tuple, set, frozenset)) else (value,)
    return all(isinstance(v, int) and not isinstance(v, bool) for v in items)


# Refusals a region request gets when the scan it planned with is not what the server has now
# (another shape: the roi is out of bounds; removed; image-only now): worth a version check.
CHANGE_SYMPTOMS = (InvalidParameter, ScanNotFound, ArrayNotFound)


class HttpSource:
    """A scancache server. Thread-safe; ``close`` releases the connection pool."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float = 0.25,
        max_connections: int = 16,
        concurrency: int = 4,
        regions_per_request: int = 8,
        retry_seconds: float | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s):// URL")
        # what a pickled copy reopens with (a Dataset holding a source, sent to spawned workers)
        self._settings = {
            "url": url, "token": token, "timeout": timeout, "retries": retries, "backoff": backoff,
            "max_connections": max_connections, "concurrency": concurrency,
            "regions_per_request": regions_per_request, "retry_seconds": retry_seconds,
        }  # fmt: skip
        self.url = url.rstrip("/")
        if self.url.endswith(("/zarr", "/predictions/zarr")):  # the URL the docs give Zarr readers
            raise ValueError(
                f"{url!r} is the server's Zarr tree (for zarr-python, tensorstore); give the "
                f"server's own URL, {self.url.rsplit('/zarr', 1)[0].removesuffix('/predictions')}, to read scans"
            )
        self.retry = RetryPolicy.from_settings(timeout, retry_seconds, retries, backoff)
        timeout = self.retry.timeout
        token = (
            parse_token(token, "token")
            if token is not None
            else parse_token(os.environ.get(TOKEN_ENV), TOKEN_ENV)
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        # every transport httpx built (the direct one, and one per proxy from the environment)
        for transport in (
            getattr(self._client, "_transport", None),
            *getattr(self._client, "_mounts", {}).values(),
        ):
            deadline.install(transport)
        self.concurrency = max(1, int(concurrency))
        self.regions_per_request = max(1, int(regions_per_request))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # set by close(): a read retrying against a gone server (a read-ahead thread after its
        # loader is done) stops at once instead of holding the process for the retry budget
        self._closed = threading.Event()
        # POST /batch bodies are read straight into one buffer when no TLS/proxy is involved.
        self._poster = (
            BatchPoster(self.url, headers, timeout, max_connections) if direct_http(self.url) else None
        )
        self._counters = IoCounters()
        # what this source knows it reads: the served store and each scan's version
        self._identity = ServedIdentity(self.url)

    # the settings in force (arguments, else environment, else defaults): the retry policy's
    @property
    def timeout(self) -> float:
        return self.retry.timeout

    @property
    def retry_seconds(self) -> float:
        return self.retry.retry_seconds

    @property
    def retries(self) -> int | None:
        return self.retry.retries

    @property
    def backoff(self) -> float:
        return self.retry.backoff

    def __repr__(self) -> str:
        return f"HttpSource({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its settings: the copy opens its own connections (a spawned worker's)."""
        return (_reopened, (self._settings,))

    def __enter__(self) -> HttpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------
    def _refuse_if_closed(self) -> None:
        if self._closed.is_set():  # httpx would say "the client has been closed", naming nothing
            raise SourceClosed(f"{self.url}: this HttpSource was closed; open another (open_source)")

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send with retries on connection errors, timeouts and 5xx; raise typed errors on 4xx."""
        self._refuse_if_closed()

        def send() -> tuple[int, httpx.Response, httpx.Response]:
            response = self._client.request(method, path, **kw)
            self._identity.check_store(response.headers)
            return response.status_code, response, response

        return self.retry.run(f"{method} {self.url}{path}", send, self._closed)

    def _post_direct(self, path: str, document: dict[str, Any]) -> tuple[bytearray, dict[str, str]]:
        """POST JSON over the plain-HTTP fast path; the body as one buffer and the headers
        (lower-case names), with the same retries and errors."""
        self._refuse_if_closed()
        assert self._poster is not None
        poster = self._poster
        payload = json.dumps(document, separators=(",", ":")).encode()

        def send() -> tuple[int, tuple[bytearray, dict[str, str]], httpx.Response | None]:
            status, headers, body = poster.post(path, payload, "application/json")
            self._identity.check_store(headers)
            if status < 400:
                return status, (body, headers), None
            request = httpx.Request("POST", f"{self.url}{path}")
            error = httpx.Response(status, headers=headers, content=bytes(body), request=request)
            return status, (body, headers), error

        return self.retry.run(f"POST {self.url}{path}", send, self._closed)

    # -- identity: the store served and each scan's version (client/identity.py) -----------
    def _explain_refusal(self, err: ScanCacheError, expected: dict[str, str], scan_ids: set[str]) -> NoReturn:
        """A region request was refused (422 roi, 404): if a scan it planned with has been
        re-published since (another shape), that is the error to report, not the symptom."""
        for scan_id in sorted(scan_ids & expected.keys()):
            try:
                doc = self._request("GET", f"/scans/{scan_id}").json()
            except (ScanCacheError, ValueError):
                continue
            now = doc.get("version") if isinstance(doc, dict) else None
            if isinstance(now, str) and now != expected[scan_id]:
                raise ScanChanged(changed_message(scan_id, expected[scan_id], now)) from None
        raise err

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "/health").json()
        return result

    # -- metadata ---------------------------------------------------------------------------
    def list_scans(self, **filters: Any) -> list[ScanMeta]:
        # Narrow on the server (a repeated parameter accepts several values); then apply every
        # filter here too, so that both sources match exactly the same scans.
        filters = normalized_filters(filters)
        params: dict[str, Any] = {}
        for key, value in filters.items():
            if key not in SERVER_FILTERS or value is None:
                continue
            if key != "split" and not _plain_integers(value):
                continue  # 1.0, np.int64(1) or a class name: matched here, as LocalSource matches them
            if key == "has_class" and not isinstance(value, int):
                continue  # several classes: the server takes one; matched here, on every scan's counts
            if isinstance(value, (list, tuple, set, frozenset)):
                value = sorted(value, key=str)
            params[key] = value
        doc = self._request("GET", "/scans", params=params).json()
        warn_skipped(self.url, doc.get("skipped") or [])
        metas = [self._meta_of(item) for item in doc["scans"]]
        return sorted((m for m in metas if matches(m, filters)), key=lambda m: m.scan_id)

    def metadata(self, scan_id: str) -> ScanMeta:
        validate_scan_id(scan_id)
        doc = self._request("GET", f"/scans/{scan_id}").json()
        return self._meta_of(doc)

    def _meta_of(self, doc: dict[str, Any]) -> ScanMeta:
        """A scan document as ``ScanMeta``: ``version`` and ``store_id`` are about the document,
        not scan attributes (``LocalSource`` has none such either); the version is remembered."""
        attrs = {k: v for k, v in doc.items() if k not in ("version", "store_id")}
        version = doc.get("version") if isinstance(doc.get("version"), str) else None
        meta = ScanMeta.from_attrs(attrs, version)
        self._identity.remember(meta.scan_id, version)
        return meta

    # -- arrays -----------------------------------------------------------------------------
    def read_image(self, scan_id: str, roi: RoiLike = None, channel: int = 0) -> np.ndarray:
        validate_scan_id(scan_id)
        if int(channel) != 0:
            # By POST /batch, as the loaders read channels: a server older than image channels
            # refuses the array name there, where its GET would ignore ``channel`` and send channel 0.
            return self.read_regions([RegionRequest(scan_id, channel_array(channel), roi)])[0]
        params = {"roi": roi_text(roi)} if roi is not None else {}
        started = time.perf_counter()
        response = self._get_region(scan_id, IMAGE, params)
        return self._counters.counted(_decode_one(response), response.headers, started)

    def read_mask(
        self,
        scan_id: str,
        roi: RoiLike = None,
        categories: Any = None,
        background: bool = False,
    ) -> np.ndarray:
        validate_scan_id(scan_id)
        params: dict[str, str] = {}
        if roi is not None:
            params["roi"] = roi_text(roi) or ""
        cats = categories_json(categories)
        if cats is not None:
            params["categories"] = json.dumps(cats)
        if background:
            params["background"] = "true"
        started = time.perf_counter()
        response = self._get_region(scan_id, MASK, params)
        return self._counters.counted(_decode_one(response), response.headers, started)

    def _get_region(self, scan_id: str, array: str, params: dict[str, Any]) -> httpx.Response:
        """One region by GET, checked against the scan version this source knows."""
        expected = self._identity.expected([RegionRequest(scan_id, array)])
        try:
            response = self._request("GET", f"/scans/{scan_id}/{array}", params=params)
        except CHANGE_SYMPTOMS as err:
            self._explain_refusal(err, expected, {scan_id})
        self._identity.check_versions(response.headers, expected)
        return response

    def _post_batch(
        self, regions: list[dict[str, Any]], merge: bool = True, expected: dict[str, str] | None = None
    ) -> list[Decoded]:
        expected = expected or {}
        # Masks of label-map scans come as label map + table and are merged here: a fifth of
        # the bytes on the wire, and the server's cores (shared with ours on one machine) skip
        # the merge (docs/tuning.md).
        document = {"regions": regions, "label_maps": True}
        body: bytes | bytearray
        headers: Any
        try:
            if self._poster is not None:
                body, headers = self._post_direct("/batch", document)
            else:
                response = self._request("POST", "/batch", json=document)
                body, headers = response.content, response.headers
        except RequestTooLarge:
            if len(regions) == 1:
                raise
            # The server's byte limit is per response: halve the batch until each half fits.
            half = len(regions) // 2
            return self._post_batch(regions[:half], merge, expected) + self._post_batch(
                regions[half:], merge, expected
            )
        except CHANGE_SYMPTOMS as err:
            self._explain_refusal(err, expected, {r["scan_id"] for r in regions})
        self._counters.count_decoded(headers)
        self._identity.check_versions(headers, expected)
        try:
            masks = [r["array"] == MASK for r in regions]
            slice_major = [bool(r.get("slice_major")) for r in regions]
            return decode_batch(memoryview(body), masks, merge, slice_major)
        except ValueError as exc:
            raise ServerError(one_line(f"POST {self.url}/batch: not a valid .npy stream ({exc})")) from None

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="scancache-http")
            return self._pool

    def read_regions(self, requests: Sequence[RegionRequest]) -> list[np.ndarray]:
        """One ``POST /batch`` per group of regions; groups run concurrently, order is kept."""
        return [merged(a) for a in self._read(requests, merge=True)]

    def read_unmerged(self, requests: Sequence[RegionRequest]) -> list[Decoded]:
        return self._read(requests, merge=False)

    def _read(self, requests: Sequence[RegionRequest], merge: bool) -> list[Decoded]:
        if not requests:
            return []
        started = time.perf_counter()
        regions = [region_json(r) for r in requests]
        expected = self._identity.expected(requests)
        groups = min(self.concurrency, -(-len(regions) // self.regions_per_request))
        size = -(-len(regions) // max(groups, 1))
        chunks = [
            part
            for i in range(0, len(regions), size)
            for part in by_scans(regions[i : i + size], MAX_VERSIONED_SCANS)
        ]
        if len(chunks) == 1:
            out = self._post_batch(regions, merge, expected)
        else:
            post = functools.partial(self._post_batch, merge=merge, expected=expected)
            results = results_of([self._executor().submit(post, chunk) for chunk in chunks])
            out = [arr for chunk in results for arr in chunk]
        self._counters.count_returned(out, started)
        return out

    def read_locations(
        self, scan_id: str, rows: int | None = None, version: str | None = None
    ) -> np.ndarray | None:
        """As ``LocalSource.read_locations``: the scan's ``locations`` array, fetched from the
        server's ``/zarr/`` tree (one uncompressed chunk); None if the scan has none. ``rows``
        (the sum of the metadata's ``location_counts``) saves the request for its zarr.json, and
        an answer of another length (another version's) is not taken; ``version``: the one the
        caller planned with (else the one this client last saw)."""
        validate_scan_id(scan_id)
        version = version or self._identity.version_of(scan_id)
        # both files of the version planned with, never one of each; a server older than pinned
        # versions (or a scan without the array) answers not found, and the plain path is tried
        nodes = ([f"{scan_id}@{version}"] if version is not None else []) + [scan_id]
        for node in nodes:
            try:
                found = self._read_locations(node, rows)
            except KeyError:  # ScanNotFound / ArrayNotFound
                continue
            return None if found is None or (rows is not None and len(found) != rows) else found
        return None

    def _read_locations(self, node: str, rows: int | None) -> np.ndarray | None:
        chunk = f"/zarr/{node}/locations/c/0/0"
        try:
            if rows is not None and rows > 0:
                body = self._request("GET", chunk).content
                if len(body) == rows * 12:  # the documented layout: int32 (y, x, z), uncompressed
                    return np.frombuffer(body, "<i4").reshape(rows, 3).astype(np.int32)
            doc = self._request("GET", f"/zarr/{node}/locations/zarr.json").json()
            rows = int(doc["shape"][0])
            plain = doc.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
            single = doc["chunk_grid"]["configuration"]["chunk_shape"] == [max(1, rows), 3]
            if not (plain and single and doc["data_type"] == "int32" and doc["shape"][1] == 3):
                return None
            if rows == 0:
                return np.empty((0, 3), np.int32)
            body = self._request("GET", chunk).content
        except (TypeError, ValueError, IndexError):  # not the plain int32 array the job writes
            return None
        if len(body) != rows * 12:
            return None
        return np.frombuffer(body, "<i4").reshape(rows, 3).astype(np.int32)

    def io_counters(self) -> dict[str, Any]:
        """As ``LocalSource.io_counters``; ``bytes_decoded`` is what the server reported in
        ``X-Scancache-Decoded-Bytes`` (0 from a server that does not send it)."""
        return self._counters.snapshot()

    def close(self) -> None:
        self._closed.set()
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        if self._poster is not None:
            self._poster.close()
        self._client.close()


def _reopened(settings: dict[str, Any]) -> HttpSource:
    return HttpSource(**settings)


def _decode_one(response: httpx.Response) -> np.ndarray:
    """The ``.npy`` body of a region (a proxy's HTML page is a server error, not a crash)."""
    try:
        return decode_npy(response.content)
    except ValueError as exc:
        raise ServerError(f"GET {response.request.url}: not an .npy response ({exc})") from None

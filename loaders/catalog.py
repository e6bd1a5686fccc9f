"""``DatasetCatalog`` and ``open_source``: named datasets of scans from a store or a server.

A dataset dict describes one scan (scancache keeps scans whole, not as slice files)::

    {"source": "/data/store" or "http://host:8000", "scan_id": "0000001_V00-Aug00",
     "image_size": (H, W, D), "scan_num_slices": D, "has_mask": True,
     "split": "train", "subject_id": 1, "time_point": 0, "augmentation": 0, ...}

A MedSegPy-style callable may instead return dicts per slice: the same keys plus
``"slice_id"`` (1-indexed, as MedSegPy's 2D datasets); only those slices are then used.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from store.errors import NotRegistered, ScanListWarning
from store.format import ScanMeta
from store.protocol import ScanSource
from store.scan_filters import has_class_values, normalized_filters, unmatched_values, why_nothing_matches
from store.source import LocalSource

SourceLike = str | ScanSource


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def open_source(path_or_url: str | Any, **kw: Any) -> ScanSource:
    """A ``LocalSource`` for a store path, an ``HttpSource`` for an ``http(s)://`` URL."""
    if not isinstance(path_or_url, str):
        path_or_url = str(path_or_url)
    if is_url(path_or_url):
        from client.http import HttpSource  # httpx only when a URL is used

        return HttpSource(path_or_url, **kw)
    return LocalSource(path_or_url, **kw)


_shared: dict[str, ScanSource] = {}
_shared_lock = threading.Lock()
# HttpSource settings given to DatasetCatalog.register, per URL (one shared source per URL).
_http_options: dict[str, dict[str, Any]] = {}


def _set_http_options(url: str, options: dict[str, Any]) -> None:
    """Remember ``register``'s timeout/retries for ``url``; one URL has one set of them."""
    with _shared_lock:
        known = _http_options.get(url)
        if known is not None and known != options:
            raise ValueError(
                f"{url}: already registered with {known}; one URL takes one timeout/retries "
                "(loaders.close_shared_sources() closes its connections and forgets them)"
            )
        if url in _shared and known is None:
            raise ValueError(f"{url}: already open without timeout/retries; close_shared_sources() first")
        _http_options[url] = options


def _sharing_key(source: str) -> str:
    """One key per store: a local folder by its real path (``store``, ``./store/``, a link to
    it), so that no spelling opens a second chunk cache of the same data; URLs as given."""
    return source if "://" in source else os.path.realpath(source)


def shared_source(source: SourceLike) -> ScanSource:
    """One open source per path/URL for the whole process (connection pool and chunk cache)."""
    if not isinstance(source, str):
        if hasattr(source, "__fspath__"):
            source = str(source)
        else:
            return source
    key = _sharing_key(source)
    with _shared_lock:
        opened = _shared.get(key)
        if opened is None:
            # opened by the key: a link re-pointed later must not make this entry read another store
            opened = _shared[key] = open_source(key, **_http_options.get(source, {}))
        return opened


def close_shared_sources() -> None:
    """Close the sources that registered datasets share (one per path or URL) and forget them,
    e.g. before a long-lived process points its datasets at another server."""
    with _shared_lock:
        for src in _shared.values():
            src.close()
        _shared.clear()
        _http_options.clear()


def forget_shared_sources() -> None:
    """Drop (without closing) the shared sources: a forked child must not use its parent's
    connections or chunk caches; it opens its own on first use."""
    with _shared_lock:
        _shared.clear()


def scan_dict(source: SourceLike, meta: ScanMeta) -> dict[str, Any]:
    """The dataset dict of one scan."""
    d: dict[str, Any] = {
        "source": source,
        "scan_id": meta.scan_id,
        "image_size": tuple(meta.shape),
        "scan_num_slices": int(meta.shape[2]),
        "has_mask": meta.has_mask,
        "num_classes": meta.num_classes,
        "split": meta.split,
        "subject_id": meta.subject_id,
        "time_point": meta.time_point,
        "augmentation": meta.augmentation,
        "_meta": meta,  # saves loaders one metadata request per scan
    }
    return d


class DatasetCatalog:
    """Names -> datasets. ``register(name, source, **filters)`` or ``register(name, func)``."""

    _REGISTERED: dict[str, Callable[[], list[dict[str, Any]]]] = {}

    @staticmethod
    def register(
        name: str,
        source: SourceLike | Callable[[], list[dict[str, Any]]],
        timeout: float | None = None,
        retries: int | None = None,
        retry_seconds: float | None = None,
        **filters: Any,
    ) -> None:
        """Register a store path or server URL with attribute filters, or a callable.

        ``DatasetCatalog.register("oai_train", "/data/store", split="train")`` selects the
        scans whose attributes match (see ``store.scan_filters.matches``). A callable takes no
        arguments and returns dataset dicts, each with ``source`` and ``scan_id``. For a server
        URL, ``timeout`` (seconds per request), ``retries`` (most retries of one request) and
        ``retry_seconds`` (how long to keep retrying) go to its ``HttpSource``.
        """
        if not isinstance(name, str):
            raise TypeError(f"DatasetCatalog.register: a dataset's name is a string, got {name!r}")
        if not name.strip():
            raise ValueError(f"DatasetCatalog.register: a dataset's name is a non-empty string, got {name!r}")
        if name in DatasetCatalog._REGISTERED:
            raise ValueError(
                f"dataset {name!r} is already registered (DatasetCatalog.remove({name!r}) first to register it again)"
            )
        given = {"timeout": timeout, "retries": retries, "retry_seconds": retry_seconds}
        options = {k: v for k, v in given.items() if v is not None}
        if options:
            if not (isinstance(source, str) and is_url(source)):
                raise TypeError(f"dataset {name!r}: timeout/retries apply to a server URL only")
            from client.retries import RetryPolicy

            try:  # checked now, where they enter, not at the first read
                RetryPolicy.from_settings(timeout, retry_seconds, retries, backoff=0.5)
            except ValueError as err:
                raise ValueError(f"dataset {name!r}: {err}") from None
            _set_http_options(source, options)
        if callable(source) and not isinstance(source, str) and not hasattr(source, "list_scans"):
            if filters:
                raise TypeError(f"dataset {name!r}: filters apply to a store or URL, not to a callable")
            DatasetCatalog._REGISTERED[name] = source
            return
        try:  # checked and made plain here, where they enter
            filters = normalized_filters(filters)
            if filters.get("has_class") is not None:
                has_class_values(filters["has_class"])
        except ValueError as err:
            raise ValueError(f"dataset {name!r}: {err}") from None
        location: SourceLike = str(source) if hasattr(source, "__fspath__") else source  # type: ignore[assignment]
        if not isinstance(location, str) and not hasattr(location, "list_scans"):
            raise TypeError(
                f"dataset {name!r}: {source!r} is not a store path, a server URL, a scan source or a "
                "function returning dataset dicts"
            )

        def load() -> list[dict[str, Any]]:
            source = shared_source(location)
            scans = source.list_scans(**filters)

            def every() -> list[ScanMeta]:
                with warnings.catch_warnings():  # the scans left out were named by the first listing
                    warnings.simplefilter("ignore", ScanListWarning)
                    return source.list_scans()

            if not scans and any(v is not None for v in filters.values()):
                raise ValueError(f"dataset {name!r}: {why_nothing_matches(every(), filters)}")
            # values of a list that select nothing (a typo among subject ids): the store's
            # listing is asked only when the selected scans do not have them all
            missing = unmatched_values(scans, filters)
            if missing:
                missing = unmatched_values(every(), {k: v for k, v in missing.items()})
            for key, values in missing.items():
                shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
                warnings.warn(
                    f"dataset {name!r}: {key} {shown} {'matches' if len(values) == 1 else 'match'} no scan "
                    f"of the store (left out of the dataset)",
                    UserWarning,
                    stacklevel=4,
                )
            return [scan_dict(location, m) for m in scans]

        DatasetCatalog._REGISTERED[name] = load

    @staticmethod
    def get(name: str) -> list[dict[str, Any]]:
        try:
            func = DatasetCatalog._REGISTERED[name]
        except KeyError:
            known = ", ".join(sorted(DatasetCatalog._REGISTERED)) or "none"
            raise NotRegistered(f"dataset {name!r} is not registered; registered: {known}") from None
        dicts = func()
        for i, d in enumerate(dicts):
            if not isinstance(d, dict):
                raise ValueError(f"dataset {name!r}: item {i} is a {type(d).__name__}, not a dataset dict")
            missing = [key for key in ("scan_id", "source") if key not in d]
            if missing:
                # MedSegPy's dicts name slice files; here each names its scan and where it is stored
                raise ValueError(
                    f"dataset {name!r}: item {i} has no {' and no '.join(repr(k) for k in missing)} "
                    "(each dict needs 'scan_id' and 'source', the store path or server URL holding the scan)"
                )
        return dicts

    @staticmethod
    def list() -> list[str]:
        return list(DatasetCatalog._REGISTERED)

    @staticmethod
    def remove(name: str) -> None:
        DatasetCatalog._REGISTERED.pop(name, None)

    @staticmethod
    def clear() -> None:
        DatasetCatalog._REGISTERED.clear()

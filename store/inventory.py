"""A store's root and what it has published: opening or creating a store (one line for
anything that is not a store of this format), the published scans and their attributes, and
the manifest check that neither the job's skip nor ``verify`` trusts a scan without."""

from __future__ import annotations

import os
from typing import Any

from store.format import (
    FORMAT_VERSION,
    MASK,
    STORE_ID_KEY,
    check_store_format,
    group_metadata,
    image_arrays,
    new_store_id,
)
from store.s3 import S3Storage
from store.storage import Storage, no_store_message, open_storage

MANIFEST = "manifest"  # scan attribute: {relative file path: size in bytes} of every array file


def ensure_store(location: str | os.PathLike[str] | Storage) -> Storage:
    """Create the root group if needed; refuse a location that is something else, or a store
    of another format version (one line naming the store and both versions)."""
    storage = open_storage(location)
    if isinstance(storage, S3Storage):
        storage.check_bucket()
    local = storage.local_path()
    if local is not None and local.exists() and not local.is_dir():
        raise ValueError(f"{storage}: exists and is a file, not a store folder")
    try:
        doc = storage.read_json("zarr.json")
    except ValueError:
        raise ValueError(f"{storage}: exists and is not a scancache store (unreadable zarr.json)") from None
    if doc is not None:
        if not isinstance(doc, dict) or doc.get("node_type") != "group":
            raise ValueError(f"{storage}: exists and is not a scancache store")
        check_store_format(storage, doc)
        return storage
    if not storage.is_empty():
        raise ValueError(f"{storage}: exists, is not empty and is not a scancache store")
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    root_attrs = {"scancache": {"format": FORMAT_VERSION, STORE_ID_KEY: new_store_id()}}
    storage.write_json("zarr.json", group_metadata(root_attrs))
    return storage


def check_store(location: str | os.PathLike[str] | Storage) -> Storage:
    """An existing store of this format (for readers: verify, scans); refuses anything else."""
    storage = open_storage(location)
    try:
        doc = storage.read_json("zarr.json")
    except ValueError:
        raise ValueError(f"{storage}: not a scancache store (unreadable zarr.json)") from None
    if doc is None:
        raise FileNotFoundError(no_store_message(storage))
    check_store_format(storage, doc)
    return storage


def read_scan_attrs(location: str | os.PathLike[str] | Storage, scan_id: str) -> dict[str, Any] | None:
    """The attributes of a published scan, or None if there is none (or it is unreadable)."""
    storage = open_storage(location)
    version = storage.current_version(scan_id)
    if version is None:
        return None
    try:
        doc = storage.read_json(f"{storage.version_key(scan_id, version)}/zarr.json")
        attrs = doc["attributes"]
        return attrs if isinstance(attrs, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def published_scan_ids(location: str | os.PathLike[str] | Storage) -> list[str]:
    """Names of the store's published scans, sorted."""
    return open_storage(location).published_names()


def manifest_mismatch(sizes: dict[str, int], attrs: dict[str, Any], array: str | None = None) -> str | None:
    """Why a scan version's files (``sizes``: relative path -> bytes) do not match the
    manifest in its attributes (None: all there, all sizes right); ``array``: its files only."""
    manifest = attrs.get(MANIFEST)
    if not isinstance(manifest, dict) or not manifest:
        return "no manifest of its files"
    for rel, size in manifest.items():
        if array is not None and not rel.startswith(f"{array}/"):
            continue
        have = sizes.get(rel)
        if have is None:
            return f"{rel} is missing"
        if have != size:
            return f"{rel} has {have} bytes, {size} were written"
    if array is not None:
        return None
    arrays = image_arrays(int(attrs.get("channels", 1)))
    for name in [*arrays, MASK] if attrs.get("num_classes") else arrays:
        if f"{name}/zarr.json" not in manifest:
            return f"no {name} array"
    return None


def manifest_problem(
    location: str | os.PathLike[str] | Storage, scan_id: str, attrs: dict[str, Any]
) -> str | None:
    """Why a published scan's files do not match its manifest (None: all there, all sizes right).

    Neither the skip check nor ``verify`` trusts a scan this returns a reason for. One listing
    of the version (one LIST request on object storage).
    """
    storage = open_storage(location)
    version = storage.current_version(scan_id)
    if version is None:
        return "not published"
    return manifest_mismatch(storage.sizes(storage.version_key(scan_id, version)), attrs)

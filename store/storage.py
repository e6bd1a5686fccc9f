"""Where a store lives: the narrow storage interface and its local-folder implementation.

Everything above this layer (the writer, the readers, the job, the server) speaks in store
*keys* (``zarr.json``, ``.versions/<scan>/<version>/image/zarr.json``) and a handful of
operations: read and write small documents, list a prefix's sizes, publish a staged local
folder as the new version of a name, find a name's current version, remove old versions, hold
the job's lock, and give tensorstore a kvstore spec for an array. ``LocalStorage`` (a folder:
symlinks, renames, fsync) and ``store.s3.S3Storage`` (an S3-compatible bucket: pointer objects,
conditional writes) implement them; ``open_storage`` picks one from what the user typed.

Scans are always *written* into a local staging folder first (the shard writer needs random
access to files); publishing is where the two storages differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from store import publish as local_publish
from store.format import VERSIONS_DIR

S3_SCHEME = "s3://"


# "S3://", "s3:/", "s3:" ...: meant as S3, but a path to the local file system would take them
# (a folder named "S3:" in the working directory, silently written there)
_S3_LOOKALIKE = re.compile(r"^s3:", re.IGNORECASE)


def is_s3_url(location: str | os.PathLike[str]) -> bool:
    """Whether a location is an S3 URL; one that only looks like one is refused in one line."""
    if not isinstance(location, str):
        return False
    if location.startswith(S3_SCHEME):
        return True
    if _S3_LOOKALIKE.match(location):
        rest = re.sub(r"^s3:/*", "", location, flags=re.IGNORECASE)
        raise ValueError(f"{location}: an S3 store is written s3://BUCKET/PREFIX (did you mean s3://{rest}?)")
    return False


def parse_location(text: str | os.PathLike[str]) -> str | Path:
    """A store location as typed (CLI, environment, API): ``s3://BUCKET/PREFIX`` (checked, kept
    as text) or a local path. The one parser of store locations."""
    if isinstance(text, str) and is_s3_url(text):
        from store.s3 import parse_s3_url

        bucket, prefix = parse_s3_url(text)
        return f"{S3_SCHEME}{bucket}/{prefix}" if prefix else f"{S3_SCHEME}{bucket}"
    return Path(text)


_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:\d+(/|$)")  # 127.0.0.1:8000, myserver:8000/


def no_store_message(location: object) -> str:
    """One line for a location without a store's ``zarr.json``; a ``host:port`` typed without its
    scheme was meant as a server URL."""
    hint = "; a server's URL starts with http://" if _HOST_PORT.match(str(location)) else ""
    return f"{location}: not a scancache store (no zarr.json){hint}"


class Storage(ABC):
    """One store's storage. Keys are ``/``-separated, relative to the store's root."""

    url: str  # what the user typed, normalised: a path or s3://bucket/prefix (for messages)
    versions_dir: str = VERSIONS_DIR  # where versions of published names live
    # How often a reader lists a version it keeps reading, to find files lost since (None: once).
    # Object storage: once; a listing is a billed request, and objects do not go missing there.
    intact_recheck_s: float | None = None

    def version_key(self, name: str, version: str) -> str:
        """The key prefix (no trailing slash) of one version of a published name."""
        return f"{self.versions_dir}/{name}/{version}"

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return False

    # -- documents ----------------------------------------------------------------------
    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The whole object, or None if there is none."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of an object, or None if there is none."""

    @abstractmethod
    def read_size(self, key: str) -> int | None:
        """The size of an object (a regular file), or None if there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace an object durably and atomically (readers see the old or the new bytes)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object if it exists."""

    @abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix/`` (recursively): key relative to the prefix -> bytes."""

    def sizes_of(self, prefix: str, keys: Iterable[str]) -> dict[str, int]:
        """``sizes(prefix)`` for these keys only (those present): one listing here; a local
        folder stats just them."""
        wanted = set(keys)
        return {key: size for key, size in self.sizes(prefix).items() if key in wanted}

    def exists(self) -> bool:
        """Whether the store's root document is there (a store, of whatever format)."""
        return self.read("zarr.json") is not None

    @abstractmethod
    def is_empty(self) -> bool:
        """Nothing but hidden entries at the root (a fresh store may be created here)."""

    def read_json(self, key: str) -> Any:
        """A JSON document, or None if absent; ValueError if it is not JSON."""
        data = self.read(key)
        return None if data is None else json.loads(data)

    def write_json(self, key: str, doc: object) -> None:
        self.write(key, json.dumps(doc, indent=2, allow_nan=False).encode())

    # -- versions -----------------------------------------------------------------------
    @abstractmethod
    def current_version(self, name: str) -> str | None:
        """The version ``name`` is published as, or None."""

    @abstractmethod
    def published_names(self) -> list[str]:
        """Every published name, sorted."""

    @abstractmethod
    def publish(self, name: str, staged: Path) -> str:
        """Make a complete local folder the new current version of ``name``; returns it.
        Readers see the old version or the new one, never a mix or a gap."""

    @abstractmethod
    def unpublish(self, name: str) -> bool:
        """Stop publishing ``name`` (its versions go after the grace period)."""

    @abstractmethod
    def remove_old_versions(self, grace_s: float) -> list[str]:
        """Delete versions superseded more than ``grace_s`` ago; returns ``name/version``s."""

    # -- staging and the job's lock -----------------------------------------------------
    @abstractmethod
    def new_staging(self, label: str) -> Path:
        """A fresh local folder owned by this process to write scans into before publishing."""

    def remove_staging(self, path: Path) -> None:
        local_publish.remove_staging(path)

    @abstractmethod
    def clean_stale_staging(self) -> int:
        """Remove what killed writers left behind; returns how many entries."""

    @abstractmethod
    def lock(
        self,
        wait: bool = False,
        warn: Callable[[str], None] | None = None,
        key: str = ".lock",
        writer: str = "job",
        advice: str | None = None,
    ) -> AbstractContextManager[Any]:
        """One writer at a time: the lock ``key``, held for a ``with`` block. A refusal names the
        holder as another ``writer`` and ends with ``advice`` (default: the job's --wait)."""

    # -- reading arrays -----------------------------------------------------------------
    @abstractmethod
    def kvstore(self, key: str) -> dict[str, Any]:
        """A tensorstore kvstore spec for the folder ``key``."""

    def local_path(self, key: str = "") -> Path | None:
        """The file path of a key where the store is a local folder (else None)."""
        return None


class LocalStorage(Storage):
    """A store in a local (or mounted) folder: versions published by symlink switch."""

    intact_recheck_s = 30.0  # a stat of each file of one array (6 of a 160-slice image): µs here, ms on NFS

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(root)

    @property
    def is_local(self) -> bool:
        return True

    def local_path(self, key: str = "") -> Path:
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_range(self, key: str, start: int, end: int) -> bytes | None:
        try:
            with open(self.root / key, "rb") as f:
                f.seek(start)
                return f.read(max(0, end - start))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_size(self, key: str) -> int | None:
        try:
            st = (self.root / key).stat()
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def write(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as err:  # a full disk: no temporary file left behind, the file named
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(target)) from None
        local_publish.fsync_dir(target.parent)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def sizes(self, prefix: str) -> dict[str, int]:
        folder = self.root / prefix
        out: dict[str, int] = {}
        for dirpath, _dirnames, filenames in os.walk(folder, onerror=_raise_refusal):
            for name in filenames:
                full = Path(dirpath) / name
                try:
                    out[full.relative_to(folder).as_posix()] = full.stat().st_size
                except (FileNotFoundError, NotADirectoryError):  # gone meanwhile: absent
                    continue
        return out

    def sizes_of(self, prefix: str, keys: Iterable[str]) -> dict[str, int]:
        folder = os.path.join(self.root, prefix)
        out: dict[str, int] = {}
        for key in keys:
            try:
                out[key] = os.stat(os.path.join(folder, key)).st_size
            except (FileNotFoundError, NotADirectoryError):
                continue  # absent; a file we may not read (PermissionError) is no missing file
        return out

    def is_empty(self) -> bool:
        if not self.root.exists():
            return True
        if not self.root.is_dir():
            return False
        return not any(p for p in self.root.iterdir() if not p.name.startswith("."))

    def current_version(self, name: str) -> str | None:
        return local_publish.current_version(self.root, name)

    def published_names(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if not n.startswith(".") and self.current_version(n))

    def publish(self, name: str, staged: Path) -> str:
        return local_publish.publish_version(self.root, name, staged)

    def unpublish(self, name: str) -> bool:
        return local_publish.unpublish(self.root, name)

    def remove_old_versions(self, grace_s: float) -> list[str]:
        return local_publish.remove_old_versions(self.root, grace_s)

    def new_staging(self, label: str) -> Path:
        # on the store's filesystem, so publishing is a rename
        return local_publish.new_staging(self.root, label)

    def clean_stale_staging(self) -> int:
        return local_publish.clean_stale_staging(self.root)

    def lock(
        self,
        wait: bool = False,
        warn: Callable[[str], None] | None = None,
        key: str = ".lock",
        writer: str = "job",
        advice: str | None = None,
    ) -> AbstractContextManager[Any]:
        from store.lock import JobLock

        return JobLock(self.root, wait=wait, warn=warn, name=key, writer=writer, advice=advice)

    def kvstore(self, key: str) -> dict[str, Any]:
        return {"driver": "file", "path": str(self.root / key)}


def local_staging(label: str) -> Path:
    """A staging folder on this machine's temporary disk, for storages that are not local.

    ``$SCANCACHE_STAGING`` names the parent (default: the system's temporary folder); it holds
    ``owner.json`` like a store's staging folder, so a later job cleans up after a killed one.
    """
    parent = Path(os.environ.get("SCANCACHE_STAGING") or tempfile.gettempdir()) / "scancache-staging"
    parent.mkdir(parents=True, exist_ok=True)
    return local_publish.new_staging(parent.parent, label, folder=parent.name)


def clean_local_staging() -> int:
    parent = Path(os.environ.get("SCANCACHE_STAGING") or tempfile.gettempdir())
    return local_publish.clean_stale_staging(parent, folder="scancache-staging")


_OPENED: dict[str, Storage] = {}
# a forked child opens its own (an S3 client's pooled connections belong to the parent)
os.register_at_fork(after_in_child=_OPENED.clear)


def open_storage(location: str | os.PathLike[str] | Storage) -> Storage:
    """The storage for a store location: ``s3://BUCKET/PREFIX`` or a local path.

    One object per location and process (S3 clients are costly to make and thread-safe).
    """
    if isinstance(location, Storage):
        return location
    text = os.fspath(location)
    if is_s3_url(text):
        cached = _OPENED.get(text)
        if cached is None:
            from store.s3 import S3Storage

            cached = _OPENED[text] = S3Storage.from_url(text)
        return cached
    return LocalStorage(text)


def copy_tree_files(src: Path) -> list[tuple[Path, str]]:
    """(file, relative key) of every file under ``src``, following folder links (object
    storage has no links: a linked folder, as the OME labels of older versions were, is stored
    again under the link; a hard-linked OME view's files are objects of their own)."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(src, followlinks=True):
        for name in filenames:
            full = Path(dirpath) / name
            out.append((full, full.relative_to(src).as_posix()))
    return out


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _raise_refusal(err: OSError) -> None:
    """``os.walk``'s error hook: a folder it may not list is a refused read, never "no files"
    (a scan then called damaged, its files "missing"); a folder gone meanwhile has none."""
    if isinstance(err, PermissionError):
        raise err

"""A store in an S3-compatible bucket: ``s3://BUCKET/PREFIX``.

Keys are the local layout's paths under ``PREFIX/``, except that object storage has no links:
a published name is a small pointer object ``PREFIX/.current/<name>`` holding
``{"version": "<version>"}``; the version's objects live under
``PREFIX/.scan-versions/<name>/<version>/``, uploaded completely before the pointer is written
(one PUT, atomic on S3), so a reader that finds a pointer finds the whole version.
Unpublishing deletes the pointer and leaves ``.scan-versions/<name>/.unpublished`` (the time) so
the grace period counts from then. The job's lock is ``PREFIX/.lock``, created with a
conditional write (``If-None-Match: *``) and kept fresh by a heartbeat (``store.s3_lock``).

Endpoint, region and credentials come from the standard AWS settings (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE`` and the
files under ``~/.aws``), resolved by botocore; tensorstore reads arrays with the same ones.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from store import interrupts
from store.publish import is_version_name, new_version_name, retention_start
from store.s3_errors import (
    NOT_S3_STATUSES,
    StoreUnavailable,
    error_code,
    not_an_s3_api,
    parse_s3_url,
    unavailable,
    without_secrets,
)
from store.storage import S3_SCHEME, Storage, clean_local_staging, copy_tree_files, local_staging

__all__ = ["S3Storage", "StoreUnavailable", "parse_s3_url", "without_secrets"]

CURRENT_DIR = ".current"
# Not ".versions" as in a folder: SeaweedFS keeps S3 object versions in entries named
# "*.versions" and leaves them out of every listing, so versions live under this name instead.
OBJECT_VERSIONS_DIR = ".scan-versions"
UNPUBLISHED = ".unpublished"
SUPERSEDED = ".superseded"  # in a version's prefix: when it stopped being current
POINTER_TTL_S = 1.0  # how long a reader trusts a pointer it read (old versions outlive it by far)
UPLOAD_THREADS = 16
POINTER_READS = 16  # pointers read at once when old versions are looked for


class S3Storage(Storage):
    """A store under ``s3://bucket/prefix``; thread-safe."""

    versions_dir = OBJECT_VERSIONS_DIR

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable(
                f"s3://{bucket}/{prefix}: reading S3 needs boto3: pip install 'scancache[s3]'"
            ) from None

        from botocore.exceptions import BotoCoreError, ProfileNotFound

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"{S3_SCHEME}{bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{bucket}"
        self._config = Config(
            max_pool_connections=64,
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 4, "mode": "standard"},
        )
        try:
            session = boto3.session.Session()
            self._client = client or session.client("s3", config=self._config)
        except ProfileNotFound as err:
            raise StoreUnavailable(
                f"{self.url}: AWS_PROFILE {err.kwargs.get('profile')!r} is not in the AWS config files"
            ) from None
        except ValueError as err:  # botocore: "Invalid endpoint: ..."
            value = os.environ.get("AWS_ENDPOINT_URL", "")
            # shown only when nothing in it can be a secret: without a scheme, "user:pw@host"
            # cannot be told from a host
            shown = f" {value!r}" if not set(value) & set("@?") else ""
            raise StoreUnavailable(
                f"{self.url}: AWS_ENDPOINT_URL{shown} is not a URL (it starts with http:// or https://)"
                if "endpoint" in str(err).lower()
                else f"{self.url}: {without_secrets(str(err))}"
            ) from None
        except BotoCoreError as err:
            raise StoreUnavailable(f"{self.url}: {type(err).__name__}: {without_secrets(str(err))}") from None
        self._client_pid = os.getpid()
        self.endpoint = without_secrets(str(self._client.meta.endpoint_url))
        self.region = session.region_name or self.client.meta.region_name or "us-east-1"
        self._session = session
        self._ts_credentials: dict[str, Any] | None = None
        self._pointers: dict[str, tuple[float, str | None]] = {}
        self._pointer_lock = threading.Lock()
        self.bytes_uploaded = 0  # file bytes sent by publish (a hard-linked file counts once)

    @property
    def client(self) -> Any:
        """This process's boto3 client. A forked child (a torch DataLoader worker) makes its own:
        the parent's pooled connections are shared sockets, on which two processes' requests
        and answers interleave (another request's body, checksum errors)."""
        if self._client_pid != os.getpid():
            import boto3

            self._client = boto3.session.Session().client("s3", config=self._config)
            self._client_pid = os.getpid()
        return self._client

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix)

    def __getstate__(self) -> dict[str, Any]:  # Dask ships storages to workers: re-make the client
        return {"bucket": self.bucket, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["bucket"], state["prefix"])  # type: ignore[misc]

    # -- keys and errors ----------------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, err: BaseException) -> StoreUnavailable:
        return unavailable(self.url, self.bucket, self.endpoint, err)

    def _not_s3(self, status: str) -> StoreUnavailable:
        return not_an_s3_api(self.url, self.endpoint, status)

    def _call(self, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as err:
            if error_code(err) in NOT_S3_STATUSES and method != "head_object":
                raise self._not_s3(error_code(err)) from None  # S3 names its errors (NoSuchKey, ...)
            if error_code(err) in ("NoSuchKey", "404") and method in ("get_object", "head_object"):
                return None
            if error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise
            if error_code(err) in ("NoSuchKey", "404") and method == "put_object":
                raise  # a conditional write (If-Match) on an object gone: its condition failed
            raise self._fail(err) from None
        except BotoCoreError as err:
            raise self._fail(err) from None

    def check_bucket(self) -> None:
        """Fail in one line if the bucket is missing or refused."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if error_code(err) in ("NoSuchBucket", "NotFound", *NOT_S3_STATUSES):
                # a HEAD's answer has no body: a GET tells a missing bucket (NoSuchBucket) from an
                # endpoint that is no S3 API at all (a bare status)
                # NoSuchBucket, or not an S3 API: one line from _call. If the listing answers, the
                # bucket is there (a gateway without HEAD bucket, or one just made)
                self._call("list_objects_v2", MaxKeys=1)
                return
            raise self._fail(err) from None
        except BotoCoreError as err:
            raise self._fail(err) from None

    # -- documents ----------------------------------------------------------------------
    def read(self, key: str) -> bytes | None:
        response = self._call("get_object", Key=self._key(key))
        return None if response is None else bytes(response["Body"].read())

    def read_with_etag(self, key: str) -> tuple[bytes, str, dict[str, Any]] | None:
        response = self._call("get_object", Key=self._key(key))
        if response is None:
            return None
        return bytes(response["Body"].read()), str(response["ETag"]), response

    def read_range(self, key: str, start: int, end: int) -> bytes | None:
        if end <= start:
            return b"" if self.read_size(key) is not None else None
        response = self._call("get_object", Key=self._key(key), Range=f"bytes={start}-{end - 1}")
        return None if response is None else bytes(response["Body"].read())

    def read_size(self, key: str) -> int | None:
        response = self._call("head_object", Key=self._key(key))
        return None if response is None else int(response["ContentLength"])

    def write(self, key: str, data: bytes) -> None:
        self._call("put_object", Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> str | None:
        """Write only if absent (``If-None-Match: *``); returns the ETag, or None if it exists."""
        from botocore.exceptions import ClientError

        try:
            return str(self._call("put_object", Key=self._key(key), Body=data, IfNoneMatch="*")["ETag"])
        except ClientError:
            return None

    def replace(self, key: str, data: bytes, etag: str) -> str | None:
        """Write only if the object still has ``etag`` (``If-Match``); the new ETag or None."""
        from botocore.exceptions import ClientError

        try:
            return str(self._call("put_object", Key=self._key(key), Body=data, IfMatch=etag)["ETag"])
        except ClientError:
            return None

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=self._key(key))

    def _list(self, prefix: str, delimiter: bool = False) -> Iterator[dict[str, Any]]:
        """Pages of ``list_objects_v2`` under a key prefix (which ends with ``/`` or is empty)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = "/"
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        base = self._key(prefix.rstrip("/") + "/") if prefix else (self.prefix + "/" if self.prefix else "")
        for page in self._list(base):
            for item in page.get("Contents", []):
                item = dict(item)
                item["Rel"] = item["Key"][len(base) :]
                yield item

    def sizes(self, prefix: str) -> dict[str, int]:
        return {item["Rel"]: int(item["Size"]) for item in self._objects(prefix)}

    def is_empty(self) -> bool:
        base = self.prefix + "/" if self.prefix else ""
        for page in self._list(base, delimiter=True):
            keys = [c["Key"][len(base) :] for c in page.get("Contents", [])]
            keys += [p["Prefix"][len(base) :] for p in page.get("CommonPrefixes", [])]
            if any(not k.startswith(".") for k in keys):
                return False
        return True

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete_objects", Delete={"Objects": batch, "Quiet": True})

    # -- versions -----------------------------------------------------------------------
    def _pointer_key(self, name: str) -> str:
        return f"{CURRENT_DIR}/{name}"

    def current_version(self, name: str) -> str | None:
        now = time.monotonic()
        with self._pointer_lock:
            cached = self._pointers.get(name)
        if cached is not None and now - cached[0] < POINTER_TTL_S:
            return cached[1]
        version = None
        try:
            doc = self.read_json(self._pointer_key(name))
            named = doc.get("version") if isinstance(doc, dict) else None
            if isinstance(named, str) and is_version_name(named):
                version = named
        except ValueError:
            version = None
        with self._pointer_lock:
            self._pointers[name] = (now, version)
            if len(self._pointers) > 65536:
                self._pointers.clear()
        return version

    def published_names(self) -> list[str]:
        return sorted(rel for rel in self.sizes(CURRENT_DIR) if "/" not in rel and not rel.startswith("."))

    def publish(self, name: str, staged: Path) -> str:
        version = new_version_name()
        base = f"{OBJECT_VERSIONS_DIR}/{name}/{version}"
        files = copy_tree_files(staged)
        last = [f for f in files if f[1] == "zarr.json"]  # the group last: a complete version
        uploads, copies = _hard_link_copies([f for f in files if f[1] != "zarr.json"])

        def upload(item: tuple[Path, str]) -> None:
            self._call("put_object", Key=self._key(f"{base}/{item[1]}"), Body=item[0].read_bytes())

        def copy(item: tuple[str, str]) -> None:
            source = {"Bucket": self.bucket, "Key": self._key(f"{base}/{item[0]}")}
            self._call("copy_object", Key=self._key(f"{base}/{item[1]}"), CopySource=source)

        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            list(pool.map(upload, uploads))
            # after every upload: a copy's source must exist
            list(pool.map(copy, copies))
        sent = sum(path.stat().st_size for path, _ in uploads + last)
        with self._pointer_lock:
            self.bytes_uploaded += sent
        for item in last:
            upload(item)
        with self._pointer_lock:
            self._pointers.pop(name, None)  # the version current until now, read afresh
        previous = self.current_version(name)
        self.write_json(self._pointer_key(name), {"version": version})
        self._mark_superseded(name, previous)
        self.delete(f"{OBJECT_VERSIONS_DIR}/{name}/{UNPUBLISHED}")
        with self._pointer_lock:
            self._pointers[name] = (time.monotonic(), version)
        return version

    def _mark_superseded(self, name: str, version: str | None) -> None:
        """The moment ``version`` stopped being current, as the time of its newest object
        (``retention_start``): an object in its prefix, deleted with it."""
        if version is None:
            return
        try:  # after the switch: a failure here must not fail the publish that happened
            self.write_json(f"{OBJECT_VERSIONS_DIR}/{name}/{version}/{SUPERSEDED}", {"time": time.time()})
        except Exception:  # unmarked, the version's grace counts from the next version's name
            pass

    def unpublish(self, name: str) -> bool:
        last = self.current_version(name)
        if last is None and self.read(self._pointer_key(name)) is None:
            return False
        self.write_json(f"{OBJECT_VERSIONS_DIR}/{name}/{UNPUBLISHED}", {"time": time.time()})
        self.delete(self._pointer_key(name))
        self._mark_superseded(name, last)
        with self._pointer_lock:
            self._pointers.pop(name, None)
        return True

    def remove_old_versions(self, grace_s: float) -> list[str]:
        by_version: dict[tuple[str, str], list[dict[str, Any]]] = {}
        unpublished: dict[str, float] = {}
        for item in self._objects(OBJECT_VERSIONS_DIR):
            parts = item["Rel"].split("/", 2)
            if len(parts) == 2 and parts[1] == UNPUBLISHED:
                try:
                    doc = json.loads(self.read(f"{OBJECT_VERSIONS_DIR}/{item['Rel']}") or b"{}")
                    unpublished[parts[0]] = float(doc.get("time", 0.0))
                except (ValueError, TypeError):
                    unpublished[parts[0]] = item["LastModified"].timestamp()
            elif len(parts) == 3:
                by_version.setdefault((parts[0], parts[1]), []).append(item)
        now = time.time()
        removed = []
        names = sorted({name for name, _ in by_version})
        with self._pointer_lock:
            for name in names:
                self._pointers.pop(name, None)
        # every scan's pointer, a few at once (one GET each: 1300 scans took 13 s one by one)
        currents = list(
            interrupts.map_in_threads(self.current_version, names, POINTER_READS, "scancache-pointers")
        )
        for name, current in zip(names, currents, strict=True):
            versions = sorted(v for n, v in by_version if n == name)
            for i, version in enumerate(versions):
                if version == current:
                    continue
                items = by_version[(name, version)]
                touched = max(item["LastModified"].timestamp() for item in items)
                following = versions[i + 1] if i + 1 < len(versions) else None
                if now - retention_start(touched, following, unpublished.get(name, 0.0)) >= grace_s:
                    # its zarr.json first: a reader pinned to it is told it is gone, not shown
                    # fill values for the chunks already deleted
                    root_doc = [i["Key"] for i in items if i["Rel"].split("/", 2)[2] == "zarr.json"]
                    self._delete_keys(root_doc)
                    self._delete_keys([i["Key"] for i in items if i["Key"] not in root_doc])
                    removed.append(f"{name}/{version}")
            if current is None and len(removed) and all(f"{name}/{v}" in removed for v in versions):
                self.delete(f"{OBJECT_VERSIONS_DIR}/{name}/{UNPUBLISHED}")
        return removed

    # -- staging and the lock ------------------------------------------------------------
    def new_staging(self, label: str) -> Path:
        return local_staging(label)

    def clean_stale_staging(self) -> int:
        return clean_local_staging()

    def lock(
        self,
        wait: bool = False,
        warn: Callable[[str], None] | None = None,
        key: str = ".lock",
        writer: str = "job",
        advice: str | None = None,
    ) -> AbstractContextManager[Any]:
        from store.s3_lock import S3Lock

        return S3Lock(self, key, wait=wait, warn=warn, writer=writer, advice=advice)

    # -- reading arrays -----------------------------------------------------------------
    def kvstore(self, key: str) -> dict[str, Any]:
        return {
            "driver": "s3",
            "bucket": self.bucket,
            "path": self._key(key.rstrip("/") + "/"),
            "endpoint": self.endpoint,
            "aws_region": self.region,
            "aws_credentials": self._tensorstore_credentials(),
        }

    def _tensorstore_credentials(self) -> dict[str, Any]:
        """tensorstore's credentials spec for the ones botocore found (boto3 and tensorstore
        then read with the same). tensorstore's own default chain does not find the shared
        files everywhere botocore does (a profile's keys were refused, or not found, while
        listings worked), so a profile is given with its files named."""
        if self._ts_credentials is None:
            self._ts_credentials = tensorstore_credentials(self._session)
        return self._ts_credentials


def tensorstore_credentials(session: Any) -> dict[str, Any]:
    """tensorstore's ``aws_credentials`` for what botocore's chain resolved (its ``method``):
    the environment, a profile of the shared files (``AWS_SHARED_CREDENTIALS_FILE``,
    ``AWS_CONFIG_FILE``, else ``~/.aws/``), the instance's or the container's role; otherwise
    tensorstore's own default chain."""
    try:
        found = session.get_credentials()
    except Exception:  # resolved again, and said in one line, by the first request
        found = None
    method = getattr(found, "method", None)
    if method in ("shared-credentials-file", "config-file"):
        return {
            "type": "profile",
            "profile": session.profile_name or "default",
            "credentials_file": _aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            "config_file": _aws_file("AWS_CONFIG_FILE", "config"),
        }
    if method == "iam-role":
        return {"type": "imds"}
    if method == "container-role":
        return {"type": "ecs"}
    if method == "env":
        return {"type": "environment"}
    return {"type": "default"}


def _aws_file(variable: str, name: str) -> str:
    return os.path.expanduser(os.environ.get(variable) or os.path.join("~", ".aws", name))


def _hard_link_copies(files: list[tuple[Path, str]]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(files to upload, (source key, key) pairs to copy on the server): a file hard-linked
    under several names (an OME view's shards are the image's, ``store.ome_views``) is sent
    once and copied by the object store, so a scan's bytes cross the network once."""
    first: dict[tuple[int, int], str] = {}
    uploads: list[tuple[Path, str]] = []
    copies: list[tuple[str, str]] = []
    for path, key in files:
        info = path.stat()
        inode = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and inode in first:
            copies.append((first[inode], key))
        else:
            first[inode] = key
            uploads.append((path, key))
    return uploads, copies

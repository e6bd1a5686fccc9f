"""One writer per store on object storage: ``PREFIX/.lock`` by conditional writes.

The lock object is created with ``If-None-Match: *``: of two jobs that try at once, exactly
one PUT succeeds. The holder rewrites it every ``SCANCACHE_LOCK_HEARTBEAT_S`` (15) seconds
with ``If-Match`` on the ETag it last wrote, so a lock whose object has not changed for
``SCANCACHE_LOCK_STALE_S`` (90) seconds (by the object store's own clock: its ``Last-Modified``
against the ``Date`` of the response that read it) belongs to a job that is gone, as does one
naming a dead pid of this host. A stale lock is taken over with ``If-Match`` on the ETag
judged stale, so two jobs cannot both take it over (a holder on this host is judged by its pid
first). A holder whose heartbeat finds the lock taken or gone sets ``lost``: its job stops with
``LockLost`` at its next check, starting no new scan and removing nothing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from store.errors import one_line
from store.lock import HeldElsewhere, describe_owner
from store.publish import owner_alive
from store.units import parse_seconds

if TYPE_CHECKING:
    from store.s3 import S3Storage

HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S = "SCANCACHE_LOCK_HEARTBEAT_S", 15.0
STALE_ENV, DEFAULT_STALE_S = "SCANCACHE_LOCK_STALE_S", 90.0
SAME_HOST_PATIENCE = 10  # a live pid of this host keeps its lock this many stale times


def _env_seconds(name: str, default: float) -> float:
    """``name`` read when a lock needs it (store.units' one parser of seconds): a bad value is
    one line naming the variable where the lock is taken, not a traceback at import."""
    text = os.environ.get(name, "").strip()
    return parse_seconds(text, name) if text else default


def heartbeat_s() -> float:
    """Seconds between two rewrites of a held lock (``SCANCACHE_LOCK_HEARTBEAT_S``, 15)."""
    return _env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def stale_s() -> float:
    """A lock not rewritten for this long is a gone job's (``SCANCACHE_LOCK_STALE_S``, 90)."""
    return _env_seconds(STALE_ENV, DEFAULT_STALE_S)


class S3Lock:
    def __init__(
        self,
        storage: S3Storage,
        key: str = ".lock",
        wait: bool = False,
        warn: Callable[[str], None] | None = None,
        poll_s: float = 1.0,
        writer: str = "job",
        advice: str | None = None,
    ) -> None:
        self.storage, self.key = storage, key
        self.release_error: str | None = None  # why release() left the lock
        self.writer = writer
        self.stale_s, self.heartbeat_s = stale_s(), heartbeat_s()  # their variables, read once a lock
        self.advice = (
            advice or f"wait for it (--wait); a lock not renewed for {self.stale_s:.0f} s is taken over"
        )
        self.wait, self.poll_s = wait, poll_s
        self.warn = warn or (lambda message: None)
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}, allow_nan=False).encode()

    def _stale(self, owner: dict[str, Any] | None, response: dict[str, Any]) -> str | None:
        """Why the lock is a gone job's, or None while its holder may be at work. A holder on
        this host is judged by its pid first: alive, it keeps the lock however late its
        heartbeat (a paused or overloaded job is not gone) up to ``SAME_HOST_PATIENCE`` times
        the stale time (its pid may be another process's now: containers sharing a hostname)."""
        same_host = isinstance(owner, dict) and owner.get("host") == socket.gethostname()
        if same_host and not owner_alive(owner):  # type: ignore[arg-type]
            return "a job that is gone"
        try:
            modified = response["LastModified"].timestamp()
            date = response["ResponseMetadata"]["HTTPHeaders"]["date"]
            now = parsedate_to_datetime(date).timestamp()
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if now - modified > self.stale_s * (SAME_HOST_PATIENCE if same_host else 1):
            return f"a job that has not renewed it for {now - modified:.0f} s"
        return None

    def acquire(self) -> None:
        elsewhere = HeldElsewhere(
            self.storage.url, self.writer, self.advice, self.wait, self.poll_s, self.warn
        )
        while True:
            self.etag = self.storage.create(self.key, self._body())
            if self.etag is not None:
                break
            found = self.storage.read_with_etag(self.key)
            if found is None:
                continue  # released between our attempt and the read
            data, etag, response = found
            try:
                owner = json.loads(data)
            except ValueError:
                owner = None
            stale = self._stale(owner, response)
            if stale is not None:
                self.etag = self.storage.replace(self.key, self._body(), etag)
                if self.etag is not None:
                    self.warn(f"{self.storage.url}: took over the lock of {stale} ({describe_owner(owner)})")
                    break
                continue
            elsewhere.meet(owner)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="scancache-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.etag is None:
                return
            try:
                etag = self.storage.replace(self.key, self._body(), self.etag)
                if etag is None:
                    etag = self._still_ours()
            except Exception:  # the endpoint hiccupped (a body cut short is no OSError): the
                continue  # next beat tries again, well before STALE_S
            if etag is None:  # the job stops at its next check (LockLost), sending no new scans
                self.lost = True
                return
            self.etag = etag

    def _still_ours(self) -> str | None:
        """The lock's ETag if it still names this job, else None. A refused rewrite is not
        always a takeover: a rewrite that succeeded but whose answer was lost is retried by
        botocore with the old ETag (412), and S3 answers a concurrent conditional write 409;
        the object then still holds this job's token."""
        found = self.storage.read_with_etag(self.key)
        if found is None:
            return None
        try:
            owner = json.loads(found[0])
        except ValueError:
            return None
        return found[1] if isinstance(owner, dict) and owner.get("token") == self.owner["token"] else None

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self.etag is not None and not self.lost:
                found = self.storage.read_with_etag(self.key)
                if found is not None and found[1] == self.etag:
                    self.storage.delete(self.key)
        except OSError as err:  # the store unreachable now: the next job finds the lock stale
            self.release_error = one_line(err)
        self.etag = None

    def __enter__(self) -> S3Lock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

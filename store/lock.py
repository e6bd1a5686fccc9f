"""One preprocessing job per store: the lock file ``STORE/.lock``.

The lock holds ``{"host", "pid", "started"}`` of the job. It is written whole under a
temporary name and hard-linked to ``.lock`` (atomic, and refused if ``.lock`` exists, on a
local filesystem and on NFS), so no job killed or out of disk space midway leaves an empty
lock that no one could judge. A second job fails at once with one line
naming the holder, or with ``wait=True`` polls until the lock is free. A lock is stale when it
names this host and a pid that no longer runs (a killed job), or this process's own pid in a
record older than it (a restarted container's job is pid 1 again): it is taken over with a
warning. So is a lock file that does not read as one (left by an older version's job)
once it is ``UNREADABLE_STALE_S`` old.
A lock from another host cannot be checked from here; the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from store.errors import one_line, owner_and_mode
from store.format import LOCK_FILE
from store.publish import fsync_dir, owner_alive

UNREADABLE_STALE_S = 60.0  # a lock written whole is never unreadable; older jobs wrote in place


class StoreLocked(RuntimeError):
    """Another job holds the store's lock."""


def describe_owner(owner: dict[str, Any] | None, lock_file: Path | None = None) -> str:
    if not owner:
        whose = owner_and_mode(lock_file) if lock_file is not None else ""
        return f"an unknown job (unreadable lock file{', ' + whose if whose else ''})"
    started = owner.get("started")
    when = ""
    if isinstance(started, (int, float)):
        when = ", started " + datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {owner.get('pid')} on {owner.get('host')}{when}"


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return _owner_of(path.read_bytes())
    except OSError:
        return None


def _owner_of(content: bytes | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(content) if content is not None else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _stale(content: bytes | None, age_s: float) -> bool:
    """A lock naming a job that is gone, or one read whole that names none (an older version's
    job killed between creating and writing it) and is ``UNREADABLE_STALE_S`` old. A lock that
    cannot be read here (another user's, NFS trouble) is held: its job may well be running."""
    if content is None:
        return False
    owner = _owner_of(content)
    return not owner_alive(owner) if owner is not None else age_s >= UNREADABLE_STALE_S


# no hard links there (FAT, SMB, FUSE object-store mounts): the lock is created in place
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (FileExistsError if it exists) holding ``data``, on disk."""
    with open(path, "xb") as f:
        # readable by every user whatever the umask: it holds only a host and a pid, and a job
        # of another user of a shared store must read it to find it stale (unreadable = held)
        with contextlib.suppress(OSError):  # a filesystem without modes (some network mounts)
            os.fchmod(f.fileno(), 0o644)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class HeldElsewhere:
    """What a lock does while another job holds it, on disk and on S3 alike: refuse at once
    (naming the holder and what to do), or wait, saying so once."""

    def __init__(
        self,
        where: str,
        writer: str,
        advice: str,
        wait: bool,
        poll_s: float,
        warn: Callable[[str], None],
        lock_file: Path | None = None,
    ) -> None:
        self.where, self.writer, self.advice = where, writer, advice
        self.lock_file = lock_file  # a local lock's file: whose it is, where it cannot be read
        self.wait, self.poll_s, self.warn = wait, poll_s, warn
        self.announced = False

    def meet(self, owner: dict[str, Any] | None) -> None:
        """The lock is ``owner``'s: raise ``StoreLocked``, or sleep a poll before the next try."""
        if not self.wait:
            raise StoreLocked(
                f"{self.where}: another {self.writer} is writing this store "
                f"({describe_owner(owner, self.lock_file)}); " + self.advice
            )
        if not self.announced:
            self.warn(
                f"{self.where}: waiting for the job holding the lock ({describe_owner(owner, self.lock_file)})"
            )
            self.announced = True
        time.sleep(self.poll_s)


class JobLock:
    """``with JobLock(store, wait=False, warn=print):`` holds ``STORE/.lock`` for the block."""

    def __init__(
        self,
        store: str | os.PathLike[str],
        wait: bool = False,
        warn: Callable[[str], None] | None = None,
        poll_s: float = 1.0,
        name: str = LOCK_FILE,
        writer: str = "job",
        advice: str | None = None,
    ) -> None:
        self.store = Path(store)
        self.name = name
        self.release_error: str | None = None  # why release() left the lock (see there)
        # what the refusal calls the holder, and what it tells the user to do (other writers
        # than the job, e.g. write_predictions, have no --wait)
        self.writer = writer
        self.path = self.store / name
        self.advice = advice or f"wait for it (--wait), or delete {self.path} if that job is gone"
        self.wait, self.poll_s = wait, poll_s
        self.warn = warn or (lambda message: None)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False

    def _try_create(self) -> bool:
        text = json.dumps(self.owner, allow_nan=False).encode()
        whole = self.store / f"{self.name}.{uuid.uuid4().hex[:12]}.new"
        try:
            try:
                _write_new(whole, text)
                os.link(whole, self.path)
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in _NO_LINKS:
                    raise
                try:  # created then written: a kill in between leaves an empty lock (_stale)
                    _write_new(self.path, text)
                except FileExistsError:
                    return False
                except OSError:
                    with contextlib.suppress(OSError):  # created by us (O_EXCL), never written whole
                        self.path.unlink(missing_ok=True)
                    raise
        except OSError as err:  # out of space, read-only, no permission: the store named, once
            why = err.strerror or type(err).__name__
            failed = OSError(f"{self.store}: cannot write its lock file {self.path} ({why})")
            failed.errno = err.errno
            raise failed from None
        finally:
            with contextlib.suppress(OSError):  # EROFS even for no file: never in place of the why
                whole.unlink(missing_ok=True)
        fsync_dir(self.store)
        return True

    def _identity(self) -> tuple[bytes | None, int, float] | None:
        """The lock's bytes (None: unreadable here), inode and age; None when there is no lock."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        try:
            content: bytes | None = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            content = None
        return content, st.st_ino, time.time() - st.st_mtime

    def _take_over_stale(self, content: bytes, inode: int) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (another
        job took it over first), put it back."""
        aside = self.store / f"{self.name}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            same = aside.stat().st_ino == inode and aside.read_bytes() == content
        except OSError:
            same = False
        owner = _owner_of(content)
        if same:
            aside.unlink(missing_ok=True)
            gone = (
                "a job that is gone"
                if owner
                else f"a job that left it empty {UNREADABLE_STALE_S:.0f} s or more ago"
            )
            self.warn(f"{self.store}: took over the lock of {gone} ({describe_owner(owner)})")
        else:
            try:
                os.link(aside, self.path)  # fails if yet another job holds it now
            except OSError as err:
                if err.errno in _NO_LINKS:  # no links here: written again, only if still free
                    try:
                        _write_new(self.path, aside.read_bytes())
                    except OSError:
                        pass
            aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        elsewhere = HeldElsewhere(
            str(self.store), self.writer, self.advice, self.wait, self.poll_s, self.warn, self.path
        )
        while not self._try_create():
            found = self._identity()
            if found is None:
                continue  # released between our attempt and the read
            content, inode, age_s = found
            if content is not None and _stale(content, age_s):
                self._take_over_stale(content, inode)
                continue
            elsewhere.meet(_owner_of(content))
        self.held = True

    def release(self) -> None:
        """Remove the lock if it is still ours. A lock that cannot be removed (the store made
        read-only meanwhile) is left for the next job to find stale; why is kept in
        ``release_error`` for the job's report, which an exception here would replace."""
        try:
            if self.held and read_lock(self.path) == self.owner:
                self.path.unlink(missing_ok=True)
        except OSError as err:
            self.release_error = one_line(err)
        self.held = False

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

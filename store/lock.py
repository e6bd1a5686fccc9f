"""One preprocessing job per store: the lock file ``STORE/.lock``.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on a local filesystem and on NFSv3+)
and holds ``{"host", "pid", "started"}`` of the job. A second job fails at once with one line
naming the holder, or with ``wait=True`` polls until the lock is free. A lock is stale when it
names this host and a pid that no longer runs (a killed job), or this process's own pid in a
record older than it (a restarted container's job is pid 1 again): it is taken over with a
warning.
A lock from another host cannot be checked from here; the message says how to remove it.
"""

from __future__ import annotations

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

from store.format import LOCK_FILE
from store.publish import fsync_dir, owner_alive


class StoreLocked(RuntimeError):
    """Another job holds the store's lock."""


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown job (unreadable lock file)"
    started = owner.get("started")
    when = ""
    if isinstance(started, (int, float)):
        when = ", started " + datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {owner.get('pid')} on {owner.get('host')}{when}"


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _stale(owner: dict[str, Any] | None) -> bool:
    return owner is not None and not owner_alive(owner)


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
        # what the refusal calls the holder, and what it tells the user to do (other writers
        # than the job, e.g. write_predictions, have no --wait)
        self.writer = writer
        self.advice = advice or f"wait for it (--wait), or delete {name} if that job is gone"
        self.path = self.store / name
        self.wait, self.poll_s = wait, poll_s
        self.warn = warn or (lambda message: None)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.owner, allow_nan=False))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.store)
        return True

    def _take_over_stale(self, owner: dict[str, Any]) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (another
        job took it over first), put it back."""
        aside = self.store / f"{self.name}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if read_lock(aside) == owner:
            aside.unlink(missing_ok=True)
            self.warn(f"{self.store}: took over the lock of a job that is gone ({describe_owner(owner)})")
        else:
            try:
                os.link(aside, self.path)  # fails if yet another job holds it now
            except OSError:
                pass
            aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        announced = False
        while not self._try_create():
            owner = read_lock(self.path)
            if owner is not None and _stale(owner):
                self._take_over_stale(owner)
                continue
            if owner is None and not self.path.exists():
                continue  # released between our attempt and the read
            if not self.wait:
                raise StoreLocked(
                    f"{self.store}: another {self.writer} is writing this store ({describe_owner(owner)}); "
                    + self.advice
                )
            if not announced:
                self.warn(f"{self.store}: waiting for the job holding the lock ({describe_owner(owner)})")
                announced = True
            time.sleep(self.poll_s)
        self.held = True

    def release(self) -> None:
        if self.held and read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

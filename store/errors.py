"""scancache's errors.

Each error also subclasses the matching built-in, so callers can catch either:
``ScanNotFound`` is a ``KeyError``, ``InvalidROI`` a ``ValueError``, and so on.
Messages are one line and never contain filesystem paths of the store.
"""

from __future__ import annotations

import os
from typing import Any

ONE_LINE_LIMIT = 300


def one_line(err_or_text: BaseException | str, limit: int = ONE_LINE_LIMIT) -> str:
    """An error or a message as one line of at most ``limit`` characters.

    Whitespace runs (newlines of tracebacks, tensorstore and h5py messages) become one space; an
    exception with an empty message is named by its class. The one formatter for the project.
    """
    raw = err_or_text
    if type(raw) is KeyError and len(raw.args) == 1 and isinstance(raw.args[0], str):
        raw = raw.args[0]  # str(KeyError) is the repr of its message: quotes and escapes
    elif isinstance(raw, OSError) and raw.strerror and raw.filename is not None:
        raw = _os_error(raw)  # "PATH: Permission denied", not "[Errno 13] Permission denied: 'PATH'"
    text = " ".join(str(raw).split())
    if not text and isinstance(err_or_text, BaseException):
        text = type(err_or_text).__name__
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _os_error(err: OSError) -> str:
    names = [
        str(n) if isinstance(n, int) else os.fsdecode(n)
        for n in (err.filename, err.filename2)
        if n is not None
    ]
    text = f"{' -> '.join(shown_name(n) for n in names)}: {err.strerror}"
    if isinstance(err, PermissionError) and names:
        text += _whose(names[-1])
    return text


def _whose(path: str) -> str:
    """`` (owned by bob:lab, mode 0644; its folder owned by alice:lab, mode 0755)``: on a store
    shared by several users, whose file and folder refused and how (removing, renaming or
    creating a file is the folder's to allow), which says what to ask for; nothing where it
    cannot be told (a bare name: the folder would be a guess)."""
    if not os.path.isabs(path):
        return ""
    parts = [
        label + found
        for where, label in ((path, ""), (os.path.dirname(path), "its folder "))
        if (found := owner_and_mode(where))
    ]
    return f" ({'; '.join(parts)})" if parts else ""


def owner_and_mode(path: str | os.PathLike[str]) -> str:
    """``owned by alice:lab, mode 0640``, or "" where the file cannot be looked at."""
    import grp
    import pwd
    import stat

    try:
        info = os.lstat(path)
    except OSError:
        return ""
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"owned by {user}:{group}, mode {stat.S_IMODE(info.st_mode):04o}"


class ScanCacheError(Exception):
    """Base class of every scancache error."""

    def __str__(self) -> str:  # KeyError would otherwise repr() its message
        return str(self.args[0]) if self.args else self.__class__.__name__

    def __reduce__(self) -> tuple[Any, ...]:
        # an error raised in a worker process (torch DataLoader, Dask) reaches the parent
        # pickled; the default would call cls(*args) with the message alone, which fails (or
        # mislabels) for errors whose __init__ takes other arguments: rebuild it as it was
        return (_rebuilt_error, (type(self), self.args, dict(self.__dict__)))


def _rebuilt_error(cls: type[ScanCacheError], args: tuple[Any, ...], state: dict[str, Any]) -> ScanCacheError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class SourceClosed(ScanCacheError, RuntimeError):
    """A source used after ``close()``."""


class ScanNotFound(ScanCacheError, KeyError):
    """No complete scan with this id in the store."""


class NotRegistered(ScanCacheError, KeyError):
    """A loader ``TAG`` or a dataset name that nothing registered."""


class ArrayNotFound(ScanCacheError, KeyError):
    """The scan exists but has no such array (e.g. ``mask`` of an image-only scan)."""


class InvalidParameter(ScanCacheError, ValueError):
    """A request parameter is malformed; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class InvalidROI(InvalidParameter):
    def __init__(self, message: str, param: str = "roi") -> None:
        super().__init__(param, message)


class InvalidCategories(InvalidParameter):
    def __init__(self, message: str, param: str = "categories") -> None:
        super().__init__(param, message)


class PredictionMismatch(ScanCacheError, ValueError):
    """A stored prediction does not fit its scan (another shape, slices outside the scan)."""


class ScanChanged(ScanCacheError, RuntimeError):
    """A scan is not the version the reader's metadata describes (re-published since), or a
    server now serves another store: reading on would give other voxels than those planned."""


class VersionGone(ScanChanged):
    """A reader pinned to one version of a scan (``/zarr/<scan_id>@<version>/``) asked for it
    after a newer version was published and the grace period removed this one."""

    def __init__(self, scan_id: str, version: str) -> None:
        super().__init__(
            f"scan {scan_id!r}: version {version} is no longer in the store (a newer version was"
            " published and old ones are removed after the grace period); read the scan's current"
            " version (GET /scans/{id} names it)"
        )
        self.scan_id, self.version = scan_id, version


def changed_message(scan_id: str, expected: str, found: str) -> str:
    """The one line a reader refuses a re-published scan with (local and remote alike)."""
    return (
        f"scan {scan_id!r} changed while being read: version {found} was published after the"
        f" metadata this reader planned with (version {expected}); rebuild the loader (or re-read"
        " the scan's metadata) to read the new version"
    )


class LockLost(ScanCacheError, RuntimeError):
    """Another job took over this job's lock on object storage (judged it stale: its heartbeat
    late, a node paused or cut off): this job stops publishing."""

    def __init__(self, store: str) -> None:
        super().__init__(
            f"{store}: another job took over this job's lock (this job's heartbeat came too late); "
            "stopped: the scans published before are whole, a re-run converts the rest"
        )


class InvalidPath(ScanCacheError, ValueError):
    """A scan id or store path that could escape the store or is not well formed."""


class RequestTooLarge(ScanCacheError, ValueError):
    """The response would exceed the configured byte limit."""


class Unauthorized(ScanCacheError, PermissionError):
    """Missing or wrong bearer token."""


class ServerError(ScanCacheError, ConnectionError):
    """The server failed (5xx) or could not be reached, after retries."""


class ScanDamaged(ScanCacheError, RuntimeError):
    """A published scan whose stored files were damaged after it was written (a file missing
    or of another size than its manifest says, or data that does not decode): names the scan
    and how to repair it, never a path. Not retried: reading again gives the same answer."""

    def __init__(self, scan_id: str, why: str, message: str | None = None) -> None:
        super().__init__(
            message
            or f"scan {scan_id!r} is damaged in the store ({why}): scancache verify SOURCE STORE "
            f"checks it, scancache preprocess SOURCE STORE --rebuild {scan_id} converts it again"
        )
        self.scan_id = scan_id


class SourceError(ScanCacheError, ValueError):
    """Bad preprocessing input: names the scan, the file and why."""

    def __init__(self, scan: str, file: str, why: str) -> None:
        super().__init__(f"{shown_name(scan)}: {shown_name(file)}: {why}")
        self.scan, self.file, self.why = scan, file, why


def shown_name(name: str) -> str:
    """A file or scan name as a message shows it: as it is, or quoted with escapes where it holds
    a newline or another character that does not print (the message stays one line)."""
    return name if name.isprintable() else repr(name)


class EmptySource(ScanCacheError, ValueError):
    """The preprocessing source folder is missing or holds no input files."""


class SourceUnreadable(ScanCacheError, OSError):
    """SOURCE itself (or an nnU-Net dataset's images folder) cannot be listed: there is nothing
    to read. (A subfolder that cannot be listed fails its own scans, and holds back --prune.)"""


def warn_skipped(store: str, skipped: list[str]) -> None:
    """One warning for the scans a listing left out (damaged or unreadable), local or from a
    server, so a loader never trains on fewer scans without a word."""
    if not skipped:
        return
    import warnings

    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    noun = "scan" if len(skipped) == 1 else "scans"
    warnings.warn(
        f"{store}: {len(skipped)} {noun} left out, damaged or unreadable: {shown} "
        "(scancache verify SOURCE STORE says more)",
        ScanListWarning,
        stacklevel=3,
    )


class ScanListWarning(UserWarning):
    """Scans a store's listing left out (``warn_skipped``)."""

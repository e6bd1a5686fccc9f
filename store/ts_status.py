"""tensorstore's errors, classified once: damage (stored bytes that do not decode), failures
that pass (storage unavailable for now, a client retries), and refusals (permissions,
credentials). tensorstore raises ``ValueError`` whose message starts with its status code and a
colon; the rest of the message names file paths, so callers turn these into scancache's own
errors, which do not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from store.errors import ScanDamaged
from store.protocol import RegionRequest

# tensorstore's error statuses (the text before the first colon of its ValueError)
DAMAGE = frozenset({"DATA_LOSS", "FAILED_PRECONDITION"})  # bytes that do not decode or parse
# storage that failed for now (S3 503s after tensorstore's own retries, no file descriptors
# left, expired credentials): not the scan's fault, and a client may retry
PASSING = frozenset(
    {"UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED",
     "PERMISSION_DENIED", "UNAUTHENTICATED", "UNKNOWN", "INTERNAL"}
)  # fmt: skip


REFUSED = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED"})  # files or credentials refused


def status_of(err: BaseException) -> str:
    return str(err).split(":", 1)[0].strip()


def refused_read(err: BaseException) -> bool:
    """A file this process may not read, or object storage refusing its credentials (as a
    ``PermissionError``, or tensorstore's status before the first colon of its message)."""
    if isinstance(err, PermissionError):
        return True
    if not isinstance(err, ValueError):
        return False
    # credentials tensorstore could not make (a profile it cannot resolve) come as INTERNAL
    return status_of(err) in REFUSED or (status_of(err) == "INTERNAL" and "credentials" in str(err).lower())


def is_damage(err: BaseException) -> bool:
    """Stored bytes that do not decode or parse: the scan is damaged."""
    return status_of(err) in DAMAGE


def is_passing(err: BaseException) -> bool:
    """Storage that failed for now: raised as it is, so that a caller retries."""
    return status_of(err) in PASSING


def result_or_damage(request: RegionRequest, future: Any) -> np.ndarray:
    """A read's result; stored data that does not decode names the scan, not tensorstore's
    message (which names the file's path). Any other failure is raised as it is."""
    try:
        return future.result()  # type: ignore[no-any-return]
    except ValueError as err:
        if not is_damage(err):
            raise
        raise ScanDamaged(request.scan_id, f"its {request.array} data does not decode") from err

"""What an ``HttpSource`` knows it reads: the store behind its URL and each scan's version.

The server names its store on every response (``X-Scancache-Store``) and, on region responses,
the version each scan was read at (``X-Scancache-Versions``); scan documents carry ``version``
(docs/rest-api.md). ``ServedIdentity`` remembers the first store id seen and each scan's
version (from the metadata handed to the caller, else from its first read) and refuses, in one
line (``ScanChanged``), an answer from another store or a read of another version: a server
back on other data, or a scan re-published mid-epoch, never passes for the data planned with.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from client.wire import STORE_HEADER, VERSIONS_HEADER, parse_versions_header
from store.errors import ScanChanged, changed_message, one_line
from store.protocol import RegionRequest


class ServedIdentity:
    """Thread-safe memory of the served store's id and each scan's version, for one URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.store_id: str | None = None
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def check_store(self, headers: Any) -> None:
        """Refuse answers from another store than the first one seen (a server restarted on
        another store with the same scan ids): its voxels are not the ones planned with."""
        found = headers.get(STORE_HEADER.lower())
        if not found:  # an older server, or a proxy's own error page
            return
        with self._lock:
            known = self.store_id
            if known is None:
                self.store_id = found
                return
        if found != known:
            raise ScanChanged(
                one_line(
                    f"{self.url} now serves another store (store id {found}, was {known}): the same scan"
                    " ids name other data there; open a new HttpSource (loaders: call"
                    " loaders.close_shared_sources() and build the loaders again)",
                    500,
                )
            )

    def remember(self, scan_id: str, version: str | None) -> None:
        """The version of the metadata a caller now holds: later reads are checked against it."""
        if version:
            with self._lock:
                self._versions[scan_id] = version

    def version_of(self, scan_id: str) -> str | None:
        with self._lock:
            return self._versions.get(scan_id)

    def expected(self, requests: Sequence[RegionRequest]) -> dict[str, str]:
        """Per scan, the version a read must find: the request's own, else the one remembered."""
        out: dict[str, str] = {}
        with self._lock:
            for r in requests:
                version = r.version or self._versions.get(r.scan_id)
                if version and r.scan_id not in out:
                    out[r.scan_id] = version
        return out

    def check_versions(self, headers: Any, expected: dict[str, str]) -> None:
        """The versions the server read against the expected ones; a scan read for the first
        time is remembered."""
        read = parse_versions_header(headers.get(VERSIONS_HEADER.lower()))
        with self._lock:
            for scan_id, version in read.items():
                want = expected.get(scan_id) or self._versions.get(scan_id)
                if want is None:
                    self._versions[scan_id] = version
                elif version != want:
                    raise ScanChanged(changed_message(scan_id, want, version))

"""HTTP caching and content negotiation: ETags, If-None-Match, Cache-Control, gzip.

A scan can be re-published under the same id, so no response is "immutable" by URL alone. Data
responses therefore carry a strong ETag derived from the scan's published version and the
normalized request, and ``Cache-Control: private, no-cache``: clients and private caches may
keep a copy but revalidate it on each use (a cheap 304), and shared caches never store
medical data.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence

# Revalidate on every use; never in shared caches.
REVALIDATE = "private, no-cache"
# A file of a version named in its path (``/zarr/<id>@<version>/``) never changes: a cache
# may keep it without asking again.
PINNED = "private, max-age=86400, immutable"
GZIP_SUFFIX = "-gz"  # a gzip representation has its own strong ETag (RFC 9110 8.8.3)
JSON_GZIP_MIN_BYTES = 1024
MASK_GZIP_MIN_BYTES = 4096


def make_etag(*parts: object) -> str:
    """A strong, quoted entity tag hashing ``parts`` (bytes as they are, the rest as text)."""
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\x1f")
    return f'"{digest.hexdigest()}"'


def gzip_etag(etag: str) -> str:
    return etag[:-1] + GZIP_SUFFIX + '"'


def _opaque(tag: str) -> str:
    """The comparable part of an entity tag: weak prefix and our gzip suffix stripped."""
    tag = tag.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    if tag.endswith(GZIP_SUFFIX + '"'):
        tag = tag[: -len(GZIP_SUFFIX) - 1] + '"'
    return tag


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2), treating our gzip variant as the same content."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    want = _opaque(etag)
    return any(_opaque(tag) == want for tag in if_none_match.split(",") if tag.strip())


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (a ``q=0`` refuses it)."""
    if not accept_encoding:
        return False
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def gzip_parts(parts: Iterable[bytes | memoryview], level: int) -> bytes:
    """gzip several buffers as one stream without joining them first."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
    out = [compressor.compress(p) for p in parts]
    out.append(compressor.flush())
    return b"".join(out)


def total_length(parts: Sequence[bytes | memoryview]) -> int:
    return sum(memoryview(p).nbytes for p in parts)

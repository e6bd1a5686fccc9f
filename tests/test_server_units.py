"""The server's pure pieces: Range parsing, store paths, ETags, negotiation, settings."""

from __future__ import annotations

import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.server.auth import bearer_token, token_ok
from service.server.errors import NotInStore, _location
from service.server.guards import raw_path_problem
from service.server.http_cache import accepts_gzip, etag_matches, gzip_etag, gzip_parts, make_etag
from service.server.settings import Settings
from service.server.zarr_files import RangeNotSatisfiable, parse_range, split_store_path
from store.errors import InvalidPath


@given(size=st.integers(1, 5000), a=st.integers(0, 6000), b=st.integers(0, 6000))
def test_parse_range_matches_python_slicing(size, a, b):
    data = bytes(range(256)) * 20
    data = data[:size]
    lo, hi = min(a, b), max(a, b)
    header = f"bytes={lo}-{hi}"
    if lo >= size:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, size)
        return
    start, end = parse_range(header, size)  # type: ignore[misc]
    assert data[start:end] == data[lo : hi + 1]


@given(size=st.integers(1, 5000), n=st.integers(1, 6000))
def test_suffix_and_open_ranges(size, n):
    start, end = parse_range(f"bytes=-{n}", size)  # type: ignore[misc]
    assert (start, end) == (max(size - n, 0), size)
    if n < size:
        assert parse_range(f"bytes={n}-", size) == (n, size)


@pytest.mark.parametrize(
    "header",
    [None, "", "items=0-1", "bytes=0-1,4-5", "bytes=abc", "bytes=5-2", "bytes=-", "bytes=1-x", "bytes 0-1"],
)
def test_unusable_range_headers_mean_the_whole_file(header):
    assert parse_range(header, 100) is None


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../zarr.json",
        "scan/../../etc",
        "a//b",
        "/etc/passwd",
        "scan/./image",
        "scan\\..\\x",
        "sc\x00an/x",
    ],
)
def test_store_paths_that_try_to_escape_are_invalid(path):
    with pytest.raises(InvalidPath):
        split_store_path(path)


@pytest.mark.parametrize(
    "path", ["", ".staging/x/zarr.json", "scan/.hidden", "other.json", "not a scan!/zarr.json"]
)
def test_hidden_or_unknown_store_paths_do_not_exist(path):
    with pytest.raises(NotInStore):
        split_store_path(path)


def test_store_paths_inside_scans_are_components():
    assert split_store_path("zarr.json") == ("zarr.json",)
    assert split_store_path("0000001_V00-Aug00/image/c/0/0/1") == (
        "0000001_V00-Aug00",
        "image",
        "c",
        "0",
        "0",
        "1",
    )


def test_etags_match_weakly_and_across_gzip():
    tag = make_etag("a", b"b", 3)
    assert tag.startswith('"') and tag.endswith('"') and tag != make_etag("a", b"b", 4)
    assert etag_matches(tag, tag)
    assert etag_matches(f'"zzz", W/{tag}', tag)
    assert etag_matches(gzip_etag(tag), tag) and etag_matches(tag, gzip_etag(tag))
    assert etag_matches("*", tag)
    assert not etag_matches(None, tag) and not etag_matches('"other"', tag)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("*", True),
        (None, False),
    ],
)
def test_accepts_gzip(header, ok):
    assert accepts_gzip(header) is ok


def test_gzip_parts_is_one_gzip_stream():
    parts = [b"header", memoryview(b"x" * 5000)]
    assert gzip.decompress(gzip_parts(parts, 1)) == b"header" + b"x" * 5000


def test_raw_path_guard():
    assert raw_path_problem(b"/zarr/0000001_V00-Aug00/image/c/0/0/0") is None
    assert raw_path_problem(b"/scans/x/mask?categories=%5B0%2F1%5D") is None  # the query is not the path
    for bad in (b"/zarr/a%2Fb", b"/zarr/a%2fb", b"/scans/a%5Cb", b"/zarr/a\\b", b"/zarr/a%00"):
        assert raw_path_problem(bad)


def test_bearer_tokens():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None
    assert token_ok("s3cret", "Bearer s3cret")
    assert (
        not token_ok("s3cret", "Bearer s3cre") and not token_ok("s3cret", None) and not token_ok("s3cret", "")
    )


def test_validation_locations_name_parameters():
    assert _location(("query", "has_class")) == "has_class"
    assert _location(("body", "regions", 3, "roi")) == "regions[3].roi"
    assert _location(("body",)) == "body"


def test_settings_round_trip_through_environment(tmp_path):
    s = Settings(
        store=tmp_path,
        cache_bytes=123,
        max_bytes=456,
        token="s3cret-token",
        compress_masks=False,
        cors_origins=("x",),
    )
    assert Settings.from_env(s.to_env()) == s
    assert "s3cret-token" not in repr(s)
    assert Settings.from_env({"SCANCACHE_STORE": str(tmp_path)}).token is None
    with pytest.raises(ValueError, match="SCANCACHE_MAX_BYTES"):
        Settings.from_env({"SCANCACHE_STORE": str(tmp_path), "SCANCACHE_MAX_BYTES": "lots"})
    with pytest.raises(ValueError, match="SCANCACHE_STORE"):
        Settings.from_env({})
    with pytest.raises(ValueError, match="max_bytes"):
        Settings(store=tmp_path, max_bytes=0)

"""The project's one size parser and one one-line formatter, and where they are used."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.server.settings import ENV_CACHE_BYTES, ENV_MAX_BYTES, ENV_STORE, Settings
from store.errors import one_line
from store.reader_share import LOCAL_CACHE_ENV, default_cache_bytes
from store.units import parse_bytes


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("10MB", 10 * 2**20),
        (" 64k ", 64 * 1024),
        (7, 7),
    ],
)
def test_parse_bytes_accepts(text, value):
    assert parse_bytes(text, "--cache-bytes") == value


@given(st.integers(0, 2**40), st.sampled_from(["", "K", "M", "G", "T", "KiB", "MB"]))
def test_parse_bytes_exact_for_whole_numbers(n, unit):
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "KiB": 2**10, "MB": 2**20}[unit]
    assert parse_bytes(f"{n}{unit}", "x") == n * scale


@pytest.mark.parametrize("bad", ["", "M", "12Q", "-5", "1e9", "two", "²", "1_0M", "9" * 5000, -1])
def test_parse_bytes_refuses_in_one_line_naming_the_setting(bad):
    with pytest.raises(ValueError) as info:
        parse_bytes(bad, "SCANCACHE_CACHE_BYTES")
    message = str(info.value)
    assert message.startswith("SCANCACHE_CACHE_BYTES: ") and "\n" not in message and len(message) < 120


def test_env_settings_take_sizes_with_units(tmp_path):
    env = {ENV_STORE: str(tmp_path), ENV_CACHE_BYTES: "512M", ENV_MAX_BYTES: "2G"}
    settings = Settings.from_env(env)
    assert (settings.cache_bytes, settings.max_bytes) == (512 * 2**20, 2 * 2**30)
    with pytest.raises(ValueError, match=f"^{ENV_CACHE_BYTES}: 'lots' is not a byte size"):
        Settings.from_env({**env, ENV_CACHE_BYTES: "lots"})


def test_local_cache_env_takes_units(monkeypatch):
    monkeypatch.setenv(LOCAL_CACHE_ENV, "768M")
    assert default_cache_bytes() == 768 * 2**20
    monkeypatch.setenv(LOCAL_CACHE_ENV, "much")
    with pytest.raises(ValueError, match=LOCAL_CACHE_ENV):
        default_cache_bytes()


def test_one_line():
    assert one_line("a\n  b\tc\n") == "a b c"
    assert one_line(RuntimeError()) == "RuntimeError"
    assert one_line(OSError("disk\nfull")) == "disk full"
    # an OS error names its file first, as command-line tools do, not "[Errno 13] ...: 'x'"
    gone = "/nonexistent-scancache/st"
    assert one_line(PermissionError(13, "Permission denied", gone)) == f"{gone}: Permission denied"
    assert (
        one_line(OSError(18, "Invalid cross-device link", "a", None, "b"))
        == "a -> b: Invalid cross-device link"
    )
    assert (
        one_line(FileNotFoundError(2, "No such file or directory")) == "[Errno 2] No such file or directory"
    )
    assert one_line(OSError(9, "Bad file descriptor", 987)) == "987: Bad file descriptor"  # os.stat(987)
    long = one_line("x" * 1000, 50)
    assert len(long) == 50 and long.endswith("...")


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("http://127.0.0.1:8765/zarr/", "http://127.0.0.1:8765"),
        ("https://h/x/predictions/zarr", "https://h/x"),
    ],
)
def test_the_zarr_tree_given_as_a_server_url_names_the_url_to_give(url, server):
    from client.http import HttpSource

    with pytest.raises(ValueError) as err:
        HttpSource(url)
    assert str(err.value) == (
        f"{url!r} is the server's Zarr tree (for zarr-python, tensorstore); give the server's own URL, "
        f"{server}, to read scans"
    )


def test_a_refusal_says_whose_file_or_folder_refused(tmp_path):
    """On a store shared by several users, a permission error names the owner and mode of the
    file (or of its folder, where the file is not there), which says whom to ask."""
    import grp
    import pwd

    me = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    folder = tmp_path / "versions"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "shard").write_bytes(b"x")
    (folder / "shard").chmod(0o640)
    there = one_line(PermissionError(13, "Permission denied", str(folder / "shard")))
    assert (
        there
        == f"{folder / 'shard'}: Permission denied (owned by {me}, mode 0640; its folder owned by {me}, mode 0755)"
    )
    assert (
        one_line(PermissionError(13, "Permission denied", "zarr.json")) == "zarr.json: Permission denied"
    )  # whose: a guess
    missing = one_line(PermissionError(13, "Permission denied", str(folder / "new")))
    assert missing == f"{folder / 'new'}: Permission denied (its folder owned by {me}, mode 0755)"

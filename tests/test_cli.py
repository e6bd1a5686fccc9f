"""The `scancache` command line: help, argument parsing, scans, sample-data, serve wiring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from h5_sources import run_cli
from hypothesis import given
from hypothesis import strategies as st

from service import cli

SUBCOMMANDS = ("preprocess", "verify", "scans", "sample-data", "serve")


def test_console_script_help_lists_every_command():
    # The script installed beside this interpreter (a venv's bin/ need not be on PATH).
    beside = Path(sys.executable).parent / "scancache"
    exe = str(beside) if beside.exists() else shutil.which("scancache")
    assert exe is not None, "the scancache console script is not installed"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: scancache {command}")
    assert len(out.splitlines()) > 4


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("64k", 64 * 1024),
        ("1.5GiB", 3 * 2**29),
        ("10MB", 10 * 2**20),
    ],
)
def test_parse_bytes(text, value):
    assert cli.parse_bytes(text) == value


@given(st.integers(1, 2**40), st.sampled_from(["", "K", "M", "G"]))
def test_parse_bytes_roundtrip(n, unit):
    assert cli.parse_bytes(f"{n}{unit}") == n * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit]


def test_a_size_of_zero_is_refused_naming_the_flag():
    with pytest.raises(Exception, match="'0M': must be more than 0 bytes"):
        cli.parse_bytes("0M")


@pytest.mark.parametrize("bad", ["", "M", "12Q", "-5", "1e9", "two"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(Exception, match="byte size"):
        cli.parse_bytes(bad)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["preprocess", "s", "t", "--workers", "0"], "must be at least 1"),
        (["preprocess", "s", "t", "--codec", "gzip"], "invalid choice"),
        (["serve", "st", "--max-bytes", "lots"], "not a byte size"),
        (["serve", "st", "--port", "99999"], "'99999' is not a port number (0 to 65535)"),
        (["serve", "st", "--port", "-5"], "'-5' is not a port number (0 to 65535)"),
        (["sample-data", "d", "--shape", "8,8"], "three positive integers"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_message(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_bad_chunks_is_one_line(tmp_path):
    result = run_cli("preprocess", tmp_path, tmp_path / "store", "--chunks", "96,96")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "scancache preprocess: error: --chunks: '96,96' is not three comma-separated integers"
    )


def test_scans_table_and_json(small_store, capsys):
    root, truth = small_store
    assert cli.main(["scans", str(root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["scans"]
    assert [r["scan_id"] for r in rows] == sorted(truth)
    by_id = {r["scan_id"]: r for r in rows}
    image, mask = truth["0000002_V00-Aug00"]
    row = by_id["0000002_V00-Aug00"]
    assert row["shape"] == list(image.shape) and row["dtype"] == "int16" and row["split"] == "valid"
    assert row["num_classes"] == mask.shape[3] and row["subject_id"] == 2 and row["bytes"] > 0
    assert by_id["0000003_V00-Aug01"]["num_classes"] == 0
    # the size is the scan's files on disk with a hard-linked file (an OME view's shard) once
    version = (root / "0000002_V00-Aug00").resolve()
    inodes = {
        (f.stat().st_dev, f.stat().st_ino): f.stat().st_size
        for f in version.rglob("*")
        if f.is_file() and f != version / "zarr.json"
    }
    assert row["bytes"] == sum(inodes.values())
    assert cli.main(["scans", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SCAN",
        "SPLIT",
        "SUBJECT",
        "VISIT",
        "AUG",
        "SHAPE",
        "DTYPE",
        "CLASSES",
        "SIZE",
    ]
    assert lines[1].split()[:8] == ["0000001_V00-Aug00", "train", "1", "0", "0", "40x36x12", "float32", "4"]
    assert lines[-1].startswith(f"{len(truth)} scans, ")


def test_scans_of_a_folder_that_is_not_a_store(tmp_path, capsys):
    assert cli.main(["scans", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scancache scans: error: ") and "not a scancache store" in err
    # host:port without its scheme was meant as a server
    assert cli.main(["scans", "127.0.0.1:8000"]) == 1
    assert capsys.readouterr().err == (
        "scancache scans: error: 127.0.0.1:8000: not a scancache store (no zarr.json); "
        "a server's URL starts with http://\n"
    )


def test_sample_data_command(tmp_path, capsys):
    code = cli.main(
        [
            "sample-data",
            str(tmp_path / "d"),
            "--subjects",
            "2",
            "--visits",
            "1",
            "--shape",
            "8x8x3",
            "--format",
            "both",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"wrote 1 2D, 1 3D scans of 8x8x3 to {tmp_path / 'd'}" in out
    assert f"scancache preprocess {tmp_path / 'd'} STORE" in out
    assert len(list((tmp_path / "d").rglob("*.im"))) == 3
    assert len(list((tmp_path / "d").rglob("*.h5"))) == 1
    assert cli.main(["sample-data", str(tmp_path / "e"), "--subjects", "1", "--format", "both"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scancache sample-data: error: ") and "at least 2 subjects" in err
    assert err.count("\n") == 1
    # the same command again finds its data; other data in the folder is refused, not mixed in
    again = ["sample-data", str(tmp_path / "d"), "--subjects", "2", "--visits", "1", "--shape", "8x8x3"]
    assert cli.main([*again, "--format", "both"]) == 0
    assert "already holds this sample data: nothing written" in capsys.readouterr().out
    before = sorted(p.name for p in (tmp_path / "d").rglob("*"))
    assert cli.main([*again[:-1], "16x16x4", "--format", "both"]) == 1
    err = capsys.readouterr().err
    assert err == f"scancache sample-data: error: {tmp_path / 'd'} is not empty: give a new or empty folder\n"
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == before


def test_debug_shows_the_traceback(tmp_path):
    quiet = run_cli("verify", tmp_path / "nowhere", tmp_path / "store")
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    loud = run_cli("--debug", "verify", tmp_path / "nowhere", tmp_path / "store")
    assert loud.returncode == 1 and "Traceback" in loud.stderr


def test_serve_starts_the_server_with_the_pinned_options(small_store, tmp_path):
    """`scancache serve` for real on loopback: --token-file, --max-bytes and --cache-bytes reach the server."""
    pytest.importorskip("service.server")
    import os
    import socket
    import sys
    import time

    import httpx

    root, truth = small_store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "SCANCACHE_TOKEN"}
    argv = [sys.executable, "-m", "service.cli", "serve", str(root), "--port", str(port)]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    argv += ["--token-file", str(token_file), "--max-bytes", "1K", "--cache-bytes", "8M"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute on a busy machine; not a timing assertion
            if proc.poll() is not None:
                pytest.fail(f"serve exited {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code < 500:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/scans", timeout=10).status_code == 401
        listing = httpx.get(f"{url}/scans", headers=auth, timeout=10)
        assert listing.status_code == 200
        assert sorted(s["scan_id"] for s in listing.json()["scans"]) == sorted(truth)
        too_big = httpx.get(f"{url}/scans/0000001_V00-Aug00/image", headers=auth, timeout=10)
        assert too_big.status_code == 413  # 40*36*12 float32 > 1 KiB
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # quiet in normal operation: no line per request (--access-log asks for them)
    logged = proc.stderr.read()
    assert "GET /scans" not in logged and "HTTP/1.1" not in logged, logged


def test_preprocess_then_verify_through_the_console_script(tmp_path):
    source, store = tmp_path / "source", tmp_path / "store"
    # one subject as slice files, the other as a volume: one run converts both
    wrote = run_cli(
        "sample-data", source, "--subjects", "2", "--visits", "1", "--shape", "16,16,4", "--format", "both"
    )
    assert wrote.returncode == 0, wrote.stderr
    result = run_cli("preprocess", source, store, "--workers", "1", "--chunks", "8,8,2", "--shard-depth", "4")
    assert result.returncode == 0, result.stderr
    assert "scans: 2 converted, 0 skipped, 0 failed" in result.stdout
    assert "read" in result.stdout and "written" in result.stdout
    # not a terminal: plain progress lines on stderr, no tqdm bar
    assert "preprocess: 2/2 scans (converted 2, skipped 0, failed 0)" in result.stderr
    assert "\r" not in result.stderr
    layout = json.loads((store / "0000001_V00-Aug00" / "zarr.json").read_text())["attributes"]["layout"]
    assert layout == {"chunks": [8, 8, 2], "shard_depth": 4, "codec": "blosc-lz4"}
    formats = {
        scan: json.loads((store / scan / "zarr.json").read_text())["attributes"]["source_format"]
        for scan in ("0000001_V00-Aug00", "0000002_V00-Aug00")
    }
    assert formats == {"0000001_V00-Aug00": "2d", "0000002_V00-Aug00": "3d"}
    verify = run_cli("verify", source, store)
    assert verify.returncode == 0 and "verify: 2 ok; store is exact" in verify.stdout
    assert Path(store / "zarr.json").is_file()


def test_serve_refuses_a_token_on_the_command_line(small_store, tmp_path):
    result = run_cli("serve", small_store[0], "--token", "s3cret-value")
    assert result.returncode == 2
    assert "--token is not accepted" in result.stderr and "SCANCACHE_TOKEN" in result.stderr
    assert "s3cret-value" not in result.stderr + result.stdout
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path in (empty, tmp_path / "missing"):
        bad = run_cli("serve", small_store[0], "--token-file", path)
        assert bad.returncode != 0 and "--token-file" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_warns_of_a_token_variable_set_but_empty(small_store):
    """SCANCACHE_TOKEN="" (e.g. `$(cat a-missing-file)`) serves without authentication, as a
    compose file's "${SCANCACHE_TOKEN:-}" must: said in one line, not silently."""
    result = run_cli("serve", small_store[0], "--host", "999.0.0.1", env={"SCANCACHE_TOKEN": " "})
    assert result.returncode == 1
    warning, error = result.stderr.splitlines()
    assert (
        warning
        == "scancache serve: warning: SCANCACHE_TOKEN is set but empty: serving without authentication"
    )
    assert error.startswith("scancache serve: error: --host 999.0.0.1: not an address")


def test_token_file_readable_by_others_is_warned_about(tmp_path, capsys):
    from service.cli import read_token_file

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o644)
    assert read_token_file(str(token_file)) == "s3cret"
    err = capsys.readouterr().err.strip()
    assert err == (
        f"scancache serve: warning: --token-file {token_file} is accessible by other users (mode 0644);"
        f" run: chmod 600 {token_file}"
    )
    assert "s3cret" not in err
    token_file.chmod(0o600)
    assert read_token_file(str(token_file)) == "s3cret"
    assert capsys.readouterr().err == ""


def test_serve_refuses_a_store_of_another_format(tmp_path):
    store = tmp_path / "old-store"
    store.mkdir()
    (store / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"scancache": {"format": 999}}})
    )
    result = run_cli("serve", store, "--port", "1")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "store format 999" in lines[0] and "scancache preprocess" in lines[0]


def test_a_reader_that_goes_away_ends_the_command_quietly(small_store):
    """`scancache scans STORE | head -1`: the pipe's reader closes early; the command stops as a
    Unix tool does (status 141, nothing on stderr), not with an error or a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "scans", str(small_store[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command has written anything: its writes find no reader
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""

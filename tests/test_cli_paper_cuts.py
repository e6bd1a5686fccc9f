"""Command-line paper cuts a new user met: each error is one line naming the flag, the file or
the folder at fault, said by the command whose --help would help; counts read as written."""

from __future__ import annotations

import pytest
from conftest import make_volume

from service import cli
from service.cli_args import layout_from_flags
from service.sample_data import write_sample_data
from store.format import ChunkLayout
from store.writer import write_scan


def usage_error(argv, capsys) -> str:
    """The one line ``scancache ARGV`` prints for a usage error (exit 2)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["preprocess", "src", "store", "--wokers", "2"],
            "scancache preprocess: error: unrecognized arguments: --wokers 2; did you mean --workers?"
            " (see scancache preprocess --help)",
        ),
        (
            ["preprocess", "src", "store", "--wokers=2"],
            "scancache preprocess: error: unrecognized arguments: --wokers=2; did you mean --workers?"
            " (see scancache preprocess --help)",
        ),
        (
            ["scans", "st", "--jsn"],
            "scancache scans: error: unrecognized arguments: --jsn; did you mean --json?"
            " (see scancache scans --help)",
        ),
        (
            ["serve", "st", "--prot", "8000"],
            "scancache serve: error: unrecognized arguments: --prot 8000; did you mean --port?"
            " (see scancache serve --help)",
        ),
        # an extra positional: nothing to suggest
        (
            ["scans", "a", "b"],
            "scancache scans: error: unrecognized arguments: b (see scancache scans --help)",
        ),
        (
            ["verify", "a", "b", "c"],
            "scancache verify: error: unrecognized arguments: c (see scancache verify --help)",
        ),
        # before the command it is the top-level parser's
        (
            ["--bogus", "scans", "a"],
            "scancache: error: unrecognized arguments: --bogus (see scancache --help)",
        ),
    ],
)
def test_unknown_arguments_are_blamed_on_their_command(argv, line, capsys):
    assert usage_error(argv, capsys) == line + "\n"


@pytest.mark.parametrize(
    ("splits", "why"),
    [
        ("../x", "'../x' is not a folder name (no '/', '\\', '.' or '..')"),
        ("train,a/b", "'a/b' is not a folder name (no '/', '\\', '.' or '..')"),
        ("a\\b", "'a\\\\b' is not a folder name (no '/', '\\', '.' or '..')"),
        ("train,..", "'..' is not a folder name (no '/', '\\', '.' or '..')"),
        (".", "'.' is not a folder name (no '/', '\\', '.' or '..')"),
        ("train,,test", "'train,,test' has an empty name; give names like train,valid,test"),
        ("train,", "'train,' has an empty name; give names like train,valid,test"),
        ("train,train", "'train,train' names 'train' twice"),
    ],
)
def test_sample_data_refuses_split_names_that_are_not_folders(splits, why, tmp_path, capsys):
    out = tmp_path / "d"
    err = usage_error(["sample-data", str(out), "--splits", splits], capsys)
    assert (
        err == f"scancache sample-data: error: argument --splits: {why} (see scancache sample-data --help)\n"
    )
    assert sorted(tmp_path.iterdir()) == []  # nothing written, in DIR or beside it


def test_write_sample_data_refuses_a_split_outside_its_folder(tmp_path):
    with pytest.raises(ValueError) as info:
        write_sample_data(tmp_path / "d", subjects=1, visits=1, shape=(4, 4, 2), splits=("../x",))
    assert str(info.value) == "split names must be plain folder names, got '../x'"
    assert sorted(tmp_path.iterdir()) == []


def test_sample_data_into_a_file_names_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    assert cli.main(["sample-data", "afile"]) == 1
    assert capsys.readouterr().err == "scancache sample-data: error: DIR 'afile' is a file, not a folder\n"
    assert cli.main(["sample-data", "afile/sub"]) == 1
    assert capsys.readouterr().err == (
        "scancache sample-data: error: DIR 'afile/sub': 'afile' is a file, not a folder\n"
    )
    assert (tmp_path / "afile").read_text() == "not a folder"


HOST_HINT = "listen on e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("999.1.1.1", "not an address, nor a name that resolves"),
        ("no-such-host.invalid", "not an address, nor a name that resolves"),
        ("192.0.2.1", "not an address of this machine"),  # TEST-NET-1: never a local address
    ],
)
def test_serve_refuses_a_host_it_cannot_listen_on(host, why, small_store, capsys, monkeypatch):
    pytest.importorskip("service.server")
    monkeypatch.delenv("SCANCACHE_HOST", raising=False)
    assert cli.main(["serve", str(small_store[0]), "--host", host, "--port", "8123"]) == 1
    assert capsys.readouterr().err == f"scancache serve: error: --host {host}: {why}; {HOST_HINT}\n"
    # from the environment it names the variable
    monkeypatch.setenv("SCANCACHE_HOST", host)
    assert cli.main(["serve", str(small_store[0]), "--port", "8123"]) == 1
    assert capsys.readouterr().err == f"scancache serve: error: SCANCACHE_HOST={host}: {why}; {HOST_HINT}\n"


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--shard-depth", "3"],
            "--shard-depth: 3 is not a multiple of the chunk depth 8; give e.g. 8 or 16",
        ),
        (
            ["--shard-depth", "12"],
            "--shard-depth: 12 is not a multiple of the chunk depth 8; give e.g. 8 or 16",
        ),
        (
            ["--chunks", "8,8,2", "--shard-depth", "5"],
            "--shard-depth: 5 is not a multiple of the chunk depth 2; give e.g. 4 or 6",
        ),
        (
            ["--layout", "balanced", "--shard-depth", "7"],
            "--shard-depth: 7 is not a multiple of the chunk depth 2; give e.g. 6 or 8",
        ),
        (["--chunks", "0,64,8"], "--chunks: '0,64,8' is not three positive integers"),
        (["--chunks", "64,64,-8"], "--chunks: '64,64,-8' is not three positive integers"),
        (["--chunks", "64,64"], "--chunks: '64,64' is not three comma-separated integers"),
    ],
)
def test_preprocess_layout_flags_are_checked_before_anything_runs(flags, line, tmp_path, capsys):
    # a ValueError main() prints as every error (exit 1; --debug would show its traceback)
    assert cli.main(["preprocess", str(tmp_path / "src"), str(tmp_path / "store"), *flags]) == 1
    assert capsys.readouterr().err == f"scancache preprocess: error: {line}\n"
    assert sorted(tmp_path.iterdir()) == []


def test_the_shard_depth_flag_is_refused_unless_whole_chunks_and_the_default_is_unchanged():
    # a depth given that the writer would round up is refused at the flag (test above)
    assert layout_from_flags(None, "64,64,8", 16, None).shard_for((100, 100, 40)) == (128, 128, 16)
    # no --shard-depth: the default as before (the writer rounds it up to whole chunks), so a
    # store written with --chunks 64,64,5 keeps its fingerprint and is not converted again
    assert layout_from_flags(None, "64,64,5", None, None).to_json() == {
        "chunks": [64, 64, 5],
        "shard_depth": 32,
        "codec": "blosc-lz4",
    }
    assert ChunkLayout.parse("64,64,5").shard_for((100, 100, 40)) == (128, 128, 35)
    assert layout_from_flags(None, None, None, None) == ChunkLayout()
    assert layout_from_flags("slices", None, 3, "zstd") == ChunkLayout((4096, 4096, 1), 3, "zstd")


@pytest.mark.parametrize("command", ["scans", "verify", "preprocess", "serve"])
@pytest.mark.parametrize("url", ["http://localhost:8000", "https://scans.example.org/"])
def test_a_server_url_where_a_store_goes_says_what_to_give(command, url, capsys):
    argv = [command, "src", url] if command in ("verify", "preprocess") else [command, url]
    listing = url.rstrip("/") + "/scans"
    assert usage_error(argv, capsys) == (
        f"scancache {command}: error: argument STORE: {url} is a server's URL; give a store folder or "
        f"s3://BUCKET/PREFIX, or list the server's scans with GET {listing} (see scancache {command} --help)\n"
    )


def test_counts_of_one_are_singular(tmp_path, capsys, monkeypatch):
    # scans: a store of one scan
    image, mask = make_volume((8, 8, 4), 2, seed=0)
    write_scan(tmp_path / "store", "0000001_V00-Aug00", image, mask, {"split": "train"})
    assert cli.main(["scans", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("1 scan, ")
    # sample-data: one scan
    assert (
        cli.main(["sample-data", str(tmp_path / "d"), "--subjects", "1", "--visits", "1", "--shape", "8,8,2"])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == f"wrote 1 2D scan of 8x8x2 to {tmp_path / 'd'}"
    # export: the count is export_nifti's (its own tests export real predictions)
    import loaders.export

    monkeypatch.setattr(loaders.export, "export_nifti", lambda *a, **k: ["case_001"])
    assert cli.main(["export", str(tmp_path / "pred"), str(tmp_path / "out"), "-q"]) == 0
    assert capsys.readouterr().out == (
        f"exported 1 scan (label maps, each with a .json naming its labels) to {tmp_path / 'out'}\n"
    )


@pytest.mark.parametrize(
    ("categories", "why"),
    [
        ("", "'' names no class; leave it out for every class"),
        ("  ", "'  ' names no class; leave it out for every class"),
        ("0,,1", "'0,,1' has an empty item between commas"),
    ],
)
def test_profile_refuses_categories_that_name_no_class(categories, why, capsys):
    # --categories is parsed once, by its argparse type: argparse names the flag as for any other
    argv = ["profile", "store", "--tag", "DefaultDataLoader", f"--categories={categories}"]
    assert (
        usage_error(argv, capsys)
        == f"scancache profile: error: argument --categories: {why} (see scancache profile --help)\n"
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("nonsense", "'nonsense' is not HOST:PORT (e.g. 127.0.0.1:8787)"),
        ("127.0.0.1:", "'127.0.0.1:' is not HOST:PORT (e.g. 127.0.0.1:8787)"),
        ("127.0.0.1:x", "'x' is not a port number"),
        ("127.0.0.1:70000", "'70000' is not a port number (0 to 65535)"),
        (
            "no-such-host.invalid:8787",
            "'no-such-host.invalid:8787': host 'no-such-host.invalid' does not resolve",
        ),
    ],
)
def test_a_dashboard_address_is_checked_before_any_cluster_starts(tmp_path, capsys, value, why):
    line = usage_error(["preprocess", str(tmp_path), str(tmp_path / "store"), "--dashboard", value], capsys)
    assert line.strip() == (
        f"scancache preprocess: error: argument --dashboard: {why} (see scancache preprocess --help)"
    )
    assert not (tmp_path / "store").exists()


def test_a_top_level_flag_after_the_command_says_where_it_goes(capsys):
    line = usage_error(["scans", "store", "--debug"], capsys)
    assert line.strip() == (
        "scancache scans: error: unrecognized arguments: --debug; --debug goes before the command "
        "(scancache --debug COMMAND ...) (see scancache scans --help)"
    )


@pytest.mark.parametrize("address", ["bogus", "tcp://bogus", "tcp://127.0.0.1:99999", "127.0.0.1:x"])
def test_a_scheduler_address_without_a_port_names_the_flag(address, tmp_path, capsys):
    """Dask said "missing port number in address 'bogus'", naming no flag."""
    from service.sample_data import write_sample_data

    write_sample_data(tmp_path / "src", subjects=1, visits=1, shape=(8, 8, 2))
    assert cli.main(["preprocess", str(tmp_path / "src"), str(tmp_path / "st"), "--scheduler", address]) == 1
    assert capsys.readouterr().err == (
        f"scancache preprocess: error: --scheduler {address}: give the scheduler's tcp://HOST:PORT "
        "(it listens on 8786 unless started with another --port)\n"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["preprocess", "src", "st", "--chunks", "-1,64,8"],
            "--chunks: '-1,64,8' is not three positive integers",
        ),
        (
            ["preprocess", "src", "st", "--chunks", "-64x64x8"],
            "--chunks: '-64x64x8' is not three positive integers",
        ),
        (
            ["preprocess", "src", "st", "--chunk", "-1,64,8"],
            "--chunks: '-1,64,8' is not three positive integers",
        ),
        (["sample-data", "d", "--seed", "-3"], "--seed: '-3' must be at least 0"),
    ],
)
def test_a_value_starting_with_a_dash_gets_its_flags_own_message(
    argv, expected, tmp_path, capsys, monkeypatch
):
    """argparse took ``-1,64,8`` for an option ("expected one argument"), hiding the flag's message."""
    monkeypatch.chdir(tmp_path)
    code = None
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code in (1, 2) and expected in err and "expected one argument" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "st").exists() and not (tmp_path / "d").exists()


def test_an_option_after_a_value_flag_is_still_an_option():
    parser = cli.build_parser()
    from service.cli_args import attach_dash_values

    argv = ["preprocess", "s", "t", "--chunks", "--help", "--workers", "-1", "--", "--chunks", "-1"]
    assert attach_dash_values(parser, argv) == [
        "preprocess", "s", "t", "--chunks", "--help", "--workers=-1", "--", "--chunks", "-1"
    ]  # fmt: skip


def test_sample_data_on_a_full_disk_names_the_file_and_leaves_dir_reusable(tmp_path):
    """HDF5 writing straight to a full disk crashed the process (exit 139) and left DIR half
    written, which the same command then refused; a file size limit (EFBIG) stands in for a
    full disk (ENOSPC) here: both are an OSError from the same write."""
    import resource
    import subprocess
    import sys

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "sd"
    argv = [sys.executable, "-m", "service.cli", "sample-data", str(out)]
    failed = subprocess.run(argv, capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "File too large" in failed.stderr and str(out) in failed.stderr
    assert not out.exists()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and any(out.rglob("*.im")), done.stderr


def test_preprocess_without_the_service_extra_says_which_extra(tmp_path, monkeypatch, capsys):
    """A `pip install scancache[torch]` machine has the CLI but not Dask: one line naming the
    extra, before anything is read or made (it was Python's bare "No module named ...")."""
    import importlib.util

    from service.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a)
    )
    assert main(["preprocess", str(tmp_path / "source"), str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "scancache preprocess: error: the preprocessing job needs distributed; install scancache[service]"
    ), err
    assert not (tmp_path / "store").exists()

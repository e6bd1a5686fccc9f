"""The one parser of each kind of value (``store.units``): whole numbers, seconds and integer
tuples as strict as the REST API's integers (ASCII digits, no ``1_0``, finite), every refusal one
line naming the setting and the value; and the same value accepted or refused alike whether it
comes as a flag or as an environment variable."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import cli
from store.units import InvalidValue, format_seconds, parse_int_tuple, parse_seconds, parse_whole

ROOT = Path(__file__).resolve().parents[1]
# Digits int()/float() read that the REST API refuses: Arabic-Indic, fullwidth, superscript,
# Devanagari; and the spellings Python's literals allow.
FOREIGN_DIGITS = ["\u0661\u0662", "\uff11", "\u00b2", "\u0967"]


def refusal(parse, *args, **kwargs) -> str:
    """The one line ``parse`` refuses with (an InvalidValue, a ValueError)."""
    with pytest.raises(InvalidValue) as info:
        parse(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200
    return message


# -- parse_whole ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("7", 7),
        ("+7", 7),
        ("-3", -3),
        (" 42 ", 42),
        ("\t8000\n", 8000),
        ("9" * 18, 10**18 - 1),
        (5, 5),
    ],
)
def test_parse_whole_accepts_plain_integers(text, value):
    assert parse_whole(text, "N") == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "1_0",
        "1_000",
        "1.0",
        "1e3",
        "0x10",
        "abc",
        "9" * 19,
        "1 2",
        "--1",
        *FOREIGN_DIGITS,
        True,
        1.0,
        None,
    ],
)
def test_parse_whole_refuses_anything_else_naming_the_setting_and_the_value(text):
    message = refusal(parse_whole, text, "SCANCACHE_X")
    shown = repr(text[:40]) if isinstance(text, str) else repr(text)
    assert message == f"SCANCACHE_X: {shown} is not an integer"


@given(st.integers(-(10**18) + 1, 10**18 - 1))
def test_parse_whole_reads_back_every_integer_it_writes(n):
    assert parse_whole(str(n), "N") == n


@given(st.text(min_size=1, max_size=8))
def test_parse_whole_accepts_only_what_the_rest_api_does(text):
    plain = re.fullmatch(r"[+-]?[0-9]{1,18}", text.strip(" \t\r\n"), re.ASCII) is not None
    try:
        parse_whole(text, "N")
    except InvalidValue as err:
        assert not plain and str(err).startswith("N: ")
    else:
        assert plain


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("0", "--workers", 1), "--workers: '0' must be at least 1"),
        (("-1", "--workers", 0), "--workers: '-1' must be at least 0"),
        (("11", "N", None, 10), "N: '11' must be at most 10"),
        (("70000", "--port", 0, 65535, "a port number"), "--port: '70000' is not a port number (0 to 65535)"),
        (("-5", "--port", 0, 65535, "a port number"), "--port: '-5' is not a port number (0 to 65535)"),
        (("8_000", "--port", 0, 65535, "a port number"), "--port: '8_000' is not a port number"),
        ((0, "max_batch_regions", 1), "max_batch_regions: 0 must be at least 1"),
    ],
)
def test_parse_whole_bounds(args, line):
    assert refusal(parse_whole, *args) == line


def test_parse_whole_bounds_are_inclusive():
    assert parse_whole("0", "--port", 0, 65535) == 0 and parse_whole("65535", "--port", 0, 65535) == 65535


# -- parse_seconds ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10", 10.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("5.", 5.0),
        (" 0.001 ", 0.001),
        ("+3", 3.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_parse_seconds_accepts_plain_decimals(text, value):
    assert parse_seconds(text, "S") == value


@pytest.mark.parametrize(
    "text", ["", " ", "soon", "1e3", "1E-2", "1_0", "1.5.2", "0x1", ".", "1,5", *FOREIGN_DIGITS, True, None]
)
def test_parse_seconds_refuses_what_is_no_plain_number(text):
    shown = repr(text[:40]) if isinstance(text, str) else repr(text)
    assert refusal(parse_seconds, text, "--send-timeout") == (
        f"--send-timeout: {shown} is not a number of seconds like 10 or 2.5"
    )


@pytest.mark.parametrize(
    "text", ["inf", "-inf", "+Infinity", "nan", "NaN", " inf ", math.inf, math.nan, -math.inf]
)
@pytest.mark.parametrize("zero_ok", [False, True])
def test_parse_seconds_refuses_what_never_ends(text, zero_ok):
    bound = ">= 0" if zero_ok else "more than 0"
    assert refusal(parse_seconds, text, "SCANCACHE_HEADER_TIMEOUT", zero_ok=zero_ok) == (
        f"SCANCACHE_HEADER_TIMEOUT: {text!r} must be a finite number {bound}"
    )


def test_parse_seconds_bounds():
    assert refusal(parse_seconds, "0", "--seconds") == "--seconds: '0' must be a finite number more than 0"
    assert (
        refusal(parse_seconds, "-1", "--grace", zero_ok=True) == "--grace: '-1' must be a finite number >= 0"
    )
    assert parse_seconds("0", "--grace", zero_ok=True) == 0.0
    assert refusal(parse_seconds, -0.5, "timeout") == "timeout: -0.5 must be a finite number more than 0"


@given(st.floats(min_value=1e-3, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_seconds_written_read_back(seconds):
    assert math.isclose(parse_seconds(format_seconds(seconds), "S"), seconds, rel_tol=1e-9, abs_tol=1e-9)


# -- parse_int_tuple --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text", ["64,64,8", "64x64x8", "64X64X8", " 64 , 64 , 8 ", "64x64,8", (64, 64, 8), [64, 64, 8]]
)
def test_parse_int_tuple_spellings_are_one_shape(text):
    assert parse_int_tuple(text, "--chunks") == (64, 64, 8)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("64,64", "is not three comma-separated integers"),
        ("64,64,8,1", "is not three comma-separated integers"),
        ("64,,8", "is not three comma-separated integers"),
        ("64;64;8", "is not three comma-separated integers"),
        ("", "is not three comma-separated integers"),
        ("1_0,1,1", "is not three comma-separated integers"),
        ("\u0661,1,1", "is not three comma-separated integers"),
        ("64.0,64,8", "is not three comma-separated integers"),
        ("0,64,8", "is not three positive integers"),
        ("64,64,-8", "is not three positive integers"),
        ((64, 64, True), "is not three comma-separated integers"),
    ],
)
def test_parse_int_tuple_refuses_naming_the_setting(text, why):
    shown = repr(text) if not isinstance(text, str) else repr(text[:40])
    assert refusal(parse_int_tuple, text, "--chunks") == f"--chunks: {shown} {why}"


def test_parse_int_tuple_lengths_minimum_and_usage():
    assert parse_int_tuple("16x16x4x1", "--img-size", lengths=(3, 4)) == (16, 16, 4, 1)
    assert parse_int_tuple("0,0,0", "N", minimum=0) == (0, 0, 0)
    assert (
        refusal(parse_int_tuple, "1,2", "N", lengths=(3, 4))
        == "N: '1,2' is not three or four comma-separated integers"
    )
    assert (
        refusal(parse_int_tuple, "-1,0,0", "N", minimum=0) == "N: '-1,0,0' is not three non-negative integers"
    )
    assert (
        refusal(parse_int_tuple, "1,1,1", "N", minimum=2) == "N: '1,1,1' is not three integers of at least 2"
    )
    # with a usage, one message for every refusal
    for text in ("8,8", "0,8,8"):
        assert refusal(parse_int_tuple, text, "--shape", usage="H,W,D") == (
            f"--shape: {text!r}: give three positive integers, H,W,D"
        )


@given(st.lists(st.integers(1, 10**6), min_size=3, max_size=3), st.sampled_from([",", "x", "X", " , "]))
def test_parse_int_tuple_reads_back_every_shape(values, separator):
    assert parse_int_tuple(separator.join(map(str, values)), "N") == tuple(values)


# -- the three tuple flags accept the same spellings ----------------------------------------
def test_shape_chunks_and_img_size_take_both_spellings():
    from service.cli_args import layout_from_flags, shape3
    from service.profile_cli import img_size_arg

    assert shape3("96x96x24") == shape3("96,96,24") == (96, 96, 24)
    assert layout_from_flags(None, "64x64x8", None, None).chunks == (64, 64, 8)
    assert layout_from_flags(None, "64,64,8", None, None).chunks == (64, 64, 8)
    assert img_size_arg("16x16x4x1") == img_size_arg("16,16,4,1") == (16, 16, 4, 1)


def test_layout_presets_are_shapes():
    from service.layouts import LAYOUTS
    from store.format import ChunkLayout

    for name, shape in LAYOUTS.items():
        assert isinstance(shape, tuple) and len(shape) == 3, name
        assert ChunkLayout.parse(shape).chunks == shape


# -- the command line: each value parsed once, where it enters ------------------------------
def test_categories_are_parsed_once_by_their_flag_type():
    parser = cli.build_parser()
    args = parser.parse_args(["profile", "store", "--tag", "DefaultDataLoader", "--categories", "0,1+tibia"])
    assert args.categories == ((0,), (1, "tibia"))
    args = parser.parse_args(["profile", "store", "--tag", "DefaultDataLoader", "--categories", "[0,[1,2]]"])
    assert args.categories == ((0,), (1, 2))


def test_export_scans_are_checked_as_preprocess_rebuild_does(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "pred"), str(out), "--scans", "case_001", "../x"]) == 1
    assert capsys.readouterr().err == "scancache export: error: --scans: invalid scan id '../x'\n"
    # empty parts (a trailing comma, as pasted) are no scan ids: the list parses, the store is next
    assert cli.main(["export", str(tmp_path / "pred"), str(out), "--scans", "case_001,,case_002,"]) == 1
    assert "not a predictions store" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "pred"), str(out), "--scans", " , "]) == 1
    assert capsys.readouterr().err.startswith("scancache export: error: --scans: ' , ' names no scan")
    assert not out.exists()


def test_a_token_file_error_is_main_s_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert cli.main(["serve", str(tmp_path), "--token-file", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"scancache serve: error: --token-file {missing}: cannot read it (FileNotFoundError)\n"
    )
    assert cli.main(["--debug", "serve", str(tmp_path), "--token-file", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(
        f"scancache serve: error: --token-file {missing}: cannot read it (FileNotFoundError)\n"
    )


def test_a_layout_error_is_main_s_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["preprocess", str(tmp_path / "src"), str(tmp_path / "store"), "--chunks", "64,64"]
    line = "scancache preprocess: error: --chunks: '64,64' is not three comma-separated integers\n"
    assert cli.main(argv) == 1 and capsys.readouterr().err == line
    assert cli.main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(line)


# -- the same value through a flag and through its environment variable ----------------------
FLAG_AND_VARIABLE = [
    # (flag, variable, value, accepted)
    ("--port", "SCANCACHE_PORT", "8_000", False),
    ("--port", "SCANCACHE_PORT", "\u0661\u0662", False),
    ("--port", "SCANCACHE_PORT", "99999", False),
    ("--port", "SCANCACHE_PORT", "8001", True),
    ("--header-timeout", "SCANCACHE_HEADER_TIMEOUT", "inf", False),
    ("--header-timeout", "SCANCACHE_HEADER_TIMEOUT", "nan", False),
    ("--send-timeout", "SCANCACHE_SEND_TIMEOUT", "1e3", False),
    ("--send-timeout", "SCANCACHE_SEND_TIMEOUT", "0", False),
    ("--send-timeout", "SCANCACHE_SEND_TIMEOUT", "2.5", True),
    ("--max-bytes", "SCANCACHE_MAX_BYTES", "1_0M", False),
    ("--max-bytes", "SCANCACHE_MAX_BYTES", "0", False),
    ("--max-bytes", "SCANCACHE_MAX_BYTES", "64M", True),
]


def serve_cli(store, *flags, **variables) -> subprocess.CompletedProcess[str]:
    """``scancache serve STORE FLAGS`` in a subprocess (as h5_sources.run_cli), with no
    ``SCANCACHE_*`` variable but ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCANCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", str(store), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **variables},
    )


@pytest.mark.parametrize(("flag", "variable", "value", "accepted"), FLAG_AND_VARIABLE)
def test_serve_accepts_and_refuses_a_value_alike_as_flag_and_variable(
    tmp_path, flag, variable, value, accepted
):
    """A store that is not there: a value accepted gets as far as opening it (and no server
    starts); a value refused is one line naming the flag, or the variable, with the same reason."""
    store = tmp_path / "missing"
    by_flag = serve_cli(store, f"{flag}={value}")
    by_variable = serve_cli(store, **{variable: value})
    for result in (by_flag, by_variable):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if accepted:
        for result in (by_flag, by_variable):
            assert result.returncode == 1 and "not a scancache store" in result.stderr, result.stderr
        return
    flag_line = re.fullmatch(
        rf"scancache serve: error: argument {flag}: (.*) \(see scancache serve --help\)",
        by_flag.stderr.strip(),
    )
    variable_line = re.fullmatch(rf"scancache serve: error: {variable}: (.*)", by_variable.stderr.strip())
    assert by_flag.returncode == 2 and flag_line, by_flag.stderr
    assert by_variable.returncode == 1 and variable_line, by_variable.stderr
    assert flag_line[1] == variable_line[1]  # the same reason, from the one parser


@pytest.mark.parametrize("value", ["inf", "nan", "1_0", "\u0661", "1e3"])
def test_client_timeouts_from_the_environment_are_finite_plain_numbers(monkeypatch, value):
    from client.retries import TIMEOUT_ENV, RetryPolicy

    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=rf"^{TIMEOUT_ENV}: ") as info:
        RetryPolicy.from_settings(None, None, None, 0.1)
    assert "\n" not in str(info.value)


def test_client_settings_from_the_environment(monkeypatch):
    from client.retries import RETRIES_ENV, RETRY_SECONDS_ENV, TIMEOUT_ENV, RetryPolicy

    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(RETRY_SECONDS_ENV, "0")  # no retries at all
    monkeypatch.setenv(RETRIES_ENV, "3")
    policy = RetryPolicy.from_settings(None, None, None, 0.1)
    assert (policy.timeout, policy.retry_seconds, policy.retries) == (2.5, 0.0, 3)
    monkeypatch.setenv(TIMEOUT_ENV, "0")  # as timeout=0: an attempt that ends at once
    with pytest.raises(ValueError, match=rf"^{TIMEOUT_ENV}: '0' must be a finite number more than 0$"):
        RetryPolicy.from_settings(None, None, None, 0.1)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    monkeypatch.setenv(RETRIES_ENV, "1_0")
    with pytest.raises(ValueError, match=rf"^{RETRIES_ENV}: '1_0' is not an integer$"):
        RetryPolicy.from_settings(None, None, None, 0.1)


def test_lock_timings_are_read_when_a_lock_needs_them(monkeypatch):
    from store import s3_lock

    monkeypatch.setenv("SCANCACHE_LOCK_STALE_S", "soon")
    monkeypatch.setenv("SCANCACHE_LOCK_HEARTBEAT_S", "inf")
    with pytest.raises(ValueError, match=r"^SCANCACHE_LOCK_STALE_S: 'soon' is not a number of seconds"):
        s3_lock.stale_s()
    with pytest.raises(ValueError, match=r"^SCANCACHE_LOCK_HEARTBEAT_S: 'inf' must be a finite number"):
        s3_lock.heartbeat_s()
    monkeypatch.setenv("SCANCACHE_LOCK_STALE_S", "1.5")
    monkeypatch.delenv("SCANCACHE_LOCK_HEARTBEAT_S")
    assert (s3_lock.stale_s(), s3_lock.heartbeat_s()) == (1.5, 15.0)


# -- the server's settings: one merge of flags, environment and defaults ---------------------
def test_settings_resolve_flags_over_variables_over_defaults(tmp_path):
    from service.server.settings import Settings

    env = {"SCANCACHE_STORE": str(tmp_path), "SCANCACHE_PORT": "9001", "SCANCACHE_HOST": "0.0.0.0",
           "SCANCACHE_MAX_BYTES": "2M", "SCANCACHE_HEADER_TIMEOUT": "3", "SCANCACHE_TOKEN": "tok"}  # fmt: skip
    s = Settings.resolve({}, env)
    assert (s.host, s.port, s.max_bytes, s.header_timeout, s.token) == (
        "0.0.0.0",
        9001,
        2 * 2**20,
        3.0,
        "tok",
    )
    assert Settings.from_env(s.to_env()) == s
    # a flag given wins, and its variable is not read at all (a bad one does not stop it)
    bad = {**env, "SCANCACHE_PORT": "8_000", "SCANCACHE_MAX_BYTES": "lots", "SCANCACHE_HEADER_TIMEOUT": "inf"}
    s = Settings.resolve({"port": 8002, "max_bytes": 1024, "header_timeout": 1.5, "host": None}, bad)
    assert (s.host, s.port, s.max_bytes, s.header_timeout) == ("0.0.0.0", 8002, 1024, 1.5)
    with pytest.raises(ValueError, match=r"^SCANCACHE_PORT: '8_000' is not a port number$"):
        Settings.resolve({}, bad)
    with pytest.raises(
        ValueError, match=r"^SCANCACHE_HEADER_TIMEOUT: 'inf' must be a finite number more than 0$"
    ):
        Settings.resolve({"port": 1, "max_bytes": 1}, bad)
    with pytest.raises(ValueError, match=r"^give the STORE to serve, or set SCANCACHE_STORE$"):
        Settings.resolve({}, {})
    defaults = Settings.resolve({"store": tmp_path}, {})
    assert (defaults.host, defaults.port, defaults.token) == ("127.0.0.1", 8000, None)


def test_a_token_an_http_header_cannot_carry_is_refused_where_it_enters(tmp_path, monkeypatch):
    """Server (environment, Python) and client refuse, in one line naming where it came from and
    never showing it, a token that is not printable ASCII: the server accepted one that no
    client could send, and the client failed at its first request with a UnicodeEncodeError."""
    from client.http import HttpSource
    from service.cli_args import read_token_file
    from service.server.settings import Settings

    why = "a bearer token must be printable ASCII without spaces (an HTTP header carries it)"
    for bad in ("tok\u00e9", "two words", "tab\tbed"):
        with pytest.raises(ValueError, match=rf"^SCANCACHE_TOKEN: {re.escape(why)}$"):
            Settings.resolve({"store": tmp_path}, {"SCANCACHE_TOKEN": bad})
        with pytest.raises(ValueError, match=rf"^token: {re.escape(why)}$"):
            Settings(store=tmp_path, token=bad)
        monkeypatch.setenv("SCANCACHE_TOKEN", bad)
        with pytest.raises(ValueError, match=rf"^SCANCACHE_TOKEN: {re.escape(why)}$"):
            HttpSource("http://127.0.0.1:9")
        with pytest.raises(ValueError, match=rf"^token: {re.escape(why)}$"):
            HttpSource("http://127.0.0.1:9", token=bad)
    token_file = tmp_path / "token"
    token_file.write_text("tok\u00e9\n", encoding="utf-8")
    token_file.chmod(0o600)
    with pytest.raises(ValueError, match=rf"^--token-file {re.escape(str(token_file))}: {re.escape(why)}$"):
        read_token_file(str(token_file))
    # blank: not set (a compose file passes "${SCANCACHE_TOKEN:-}"); `serve` warns of it
    assert Settings.resolve({"store": tmp_path}, {"SCANCACHE_TOKEN": "  "}).token is None
    assert Settings.resolve({"store": tmp_path}, {"SCANCACHE_TOKEN": " t0k "}).token == "t0k"


def test_the_protocol_reads_its_deadlines_once_a_process(monkeypatch):
    from service.server import http_protocol

    http_protocol.deadlines_from_env.cache_clear()
    monkeypatch.setenv("SCANCACHE_HEADER_TIMEOUT", "4")
    monkeypatch.setenv("SCANCACHE_SEND_TIMEOUT", "6.5")
    try:
        assert http_protocol.deadlines_from_env() == (4.0, 6.5)
        monkeypatch.setenv("SCANCACHE_HEADER_TIMEOUT", "inf")  # not read again
        assert http_protocol.deadlines_from_env() == (4.0, 6.5)
    finally:
        http_protocol.deadlines_from_env.cache_clear()


def test_a_kubernetes_service_link_is_not_a_port(tmp_path):
    """A Service named "scancache" gives every pod SCANCACHE_PORT=tcp://IP:PORT (Kubernetes'
    docker-link variables): not a setting of ours, so the default port stays."""
    from service.server.settings import DEFAULT_PORT, Settings

    env = {"SCANCACHE_PORT": "tcp://10.0.0.7:8000"}
    assert Settings.resolve({"store": str(tmp_path)}, env).port == DEFAULT_PORT
    assert Settings.resolve({"store": str(tmp_path)}, {"SCANCACHE_PORT": "8001"}).port == 8001


def test_a_class_index_out_of_range_says_integers_are_indices_not_label_values():
    """An nnU-Net user writes a dataset.json label value (15 = prostate) where CATEGORIES takes
    the mask's class index (0..14): the refusal says which index is which class."""
    from store.categories import parse_categories, resolve_categories
    from store.errors import InvalidCategories

    names = [f"organ{k}" for k in range(1, 16)]
    with pytest.raises(InvalidCategories) as info:
        resolve_categories(parse_categories([0, 15]), 15, names)
    message = str(info.value)
    assert "class 15 is out of range for 15 classes: integers are the mask's class indices 0..14" in message
    assert "(0 'organ1', 1 'organ2', 2 'organ3', ..., 14 'organ15'), not a dataset's label values" in message

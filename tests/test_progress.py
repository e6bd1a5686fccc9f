"""store.progress: the one progress reporter (preprocess, write_predictions, export)."""

from __future__ import annotations

import io
import sys

import pytest

from store.progress import Progress, interactive


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_off_a_terminal_every_few_seconds_and_at_the_end():
    stream = io.StringIO()
    with Progress(3, label="preprocess", done=1, enabled=True, stream=stream, every=3600) as bar:
        bar.advance("converted 1, skipped 1, failed 0")  # 2 of 3: too soon for a line
        bar.advance("converted 2, skipped 1, failed 0")
    assert stream.getvalue() == "preprocess: 3/3 scans (converted 2, skipped 1, failed 0)\n"

    stream = io.StringIO()
    with Progress(2, label="scancache export", enabled=True, stream=stream, every=0) as bar:
        bar.advance("case_001")
        bar.advance()
    assert stream.getvalue() == "scancache export: 1/2 scans (case_001)\nscancache export: 2/2 scans\n"

    stream = io.StringIO()
    with Progress(1, label="write_predictions", enabled=True, stream=stream) as bar:
        bar.advance("case_001")
    assert stream.getvalue() == "write_predictions: 1/1 scan (case_001)\n"


@pytest.mark.parametrize(("total", "done", "enabled"), [(3, 0, False), (2, 2, True), (0, 0, True)])
def test_quiet_when_disabled_or_nothing_to_do(total, done, enabled):
    stream = _Terminal()
    with Progress(total, label="preprocess", done=done, enabled=enabled, stream=stream, every=0) as bar:
        for _ in range(total - done):
            bar.advance("x")
        assert bar.bar is None
    assert stream.getvalue() == ""


def test_a_bar_on_a_terminal():
    stream = _Terminal()
    with Progress(4, label="preprocess", done=1, stream=stream) as bar:
        assert bar.bar is not None  # enabled=None: a person watches a terminal
        for k in range(3):
            bar.advance(f"converted {k + 1}")
    shown = stream.getvalue()
    assert "\r" in shown and "4/4" in shown and "converted 3" in shown and "preprocess:" not in shown


def test_a_notebook_is_watched_a_log_file_is_not(monkeypatch):
    assert not interactive(io.StringIO())
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # what a Jupyter kernel has imported
    assert interactive(io.StringIO())
    assert Progress(2, label="write_predictions", stream=io.StringIO()).enabled

"""The benchmark report's arithmetic (ratios, targets) and markdown; no timing is asserted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.report import Report, Row
from benchmarks.run import parse_args
from benchmarks.timing import percentile

MACHINE = {
    "date": "d",
    "cpu": "c",
    "cores": "2",
    "memory": "1 GiB",
    "os": "o",
    "python": "3",
    "packages": "p",
}


def test_ratio_is_oriented_so_that_larger_is_better():
    rate = Row("s", "rate", 300.0, "slices/s", 100.0, "base", ">= 2x", 2.0)
    assert rate.ratio == pytest.approx(3.0) and rate.met is True
    time = Row("s", "time", 4.0, "s", 2.0, "floor", "<= 1.5x", 1 / 1.5, higher_is_better=False)
    assert time.ratio == pytest.approx(0.5) and time.met is False
    assert Row("s", "info", 1.0, "x").met is None and Row("s", "no base", 1.0, "x", None).ratio is None


def test_markdown_lists_targets_and_sections():
    report = Report(MACHINE, {"Mode": "quick"})
    report.add(
        [Row("2D", "ours", 300.0, "slices/s", 100.0, "base", ">= 2x", 2.0), Row("2D", "info", 5.0, "s")]
    )
    report.notes.append("a note")
    text = report.markdown()
    assert "| 2D: ours | 300 slices/s | 3.00x | >= 2x | yes |" in text
    assert "## 2D" in text and "- a note" in text and "- Mode: quick" in text


def test_missed_targets_say_by_how_much_and_why():
    report = Report(MACHINE, {})
    measured = "16 ms a batch; source read 0.25 s, copy 0.57 s"
    report.add(
        [
            Row("3D random patches (x)", "64x64x32: scancache local, cold", 50.0, "p/s", 10.0, "gather",
                ">= 20x", 20.0, why=measured),
            Row("3D random patches (x)", "64x64x32: scancache local, warm", 300.0, "p/s", 10.0, "gather",
                ">= 20x", 20.0),
            Row("Inference stitching (x)", "inference with stitching", 4.0, "s", 3.0, "predict",
                "<= 10% over predict", 1.0, higher_is_better=False),
        ]
    )  # fmt: skip
    text = report.markdown()
    assert "### Not met in this run" in text
    assert f"ratio 5.00x where >= 20x needs 20.00x (75% short). Why: {measured}." in text  # this run's
    assert "compete with the model's own 2 threads" in text  # a section without a measured why
    assert "warm**" not in text  # the met target is not listed


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_is_an_element_within_bounds(samples, q):
    p = percentile(samples, q)
    assert p in samples and min(samples) <= p <= max(samples)
    assert percentile(samples, 0) == min(samples) and percentile(samples, 100) == max(samples)


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--only", "loaders,nope"])
    assert "nope" in capsys.readouterr().err


def test_trainfeed_tables_give_ranges_over_runs_and_the_training_process_own_cpu():
    from benchmarks.trainfeed_report import markdown

    def run(local: float, base: float, own: float) -> list[dict]:
        return [
            {"kind": "machine", "cores": 16, "gpu": "X", "scans": 16, "shape": [384, 384, 160]},
            {"kind": "2d", "feed": "medsegpy", "workers": 2, "rate": base, "cpu_ms_per_example": 8.0},
            {"kind": "2d", "feed": "local", "workers": 2, "rate": local, "cpu_ms_per_example": 2.0,
             "own_cpu_ms_per_batch": own, "worker_pss_mib": [500, 600]},
            {"kind": "2d", "feed": "local", "workers": 4, "error": "RuntimeError: broken"},
        ]  # fmt: skip

    text = markdown([run(1000, 250, 0.7), run(1200, 200, 1.4)])
    assert text.startswith("2 run(s) on 16 cores, device X;")
    assert "| 2 | 200-250 | 1000-1200 | 4.0x-6.0x |" in text  # ranges over the runs, ratio per run
    assert "2d local k=2 0.7-1.4" in text and "2d local k=2 600" in text
    assert "| 4 |" not in text  # a configuration that failed gives no row


def test_trainfeed_says_why_training_was_not_measured():
    from benchmarks.trainfeed_report import markdown

    why = "a training step takes 17.4 s on cpu: the 10 s window holds fewer than 3 steps"
    run = [
        {"kind": "machine", "cores": 2, "gpu": "none", "scans": 2, "shape": [384, 384, 160]},
        {"kind": "train", "feed": "local", "workers": 2, "skipped": why},
    ]
    text = markdown([run])
    assert f"**Training the reference 2D U-Net**: not measured ({why})." in text
    assert "share of time the device waited" not in text  # no table of zeros

"""The training-feed benchmark's report: its JSON lines as Markdown tables, ranges over runs
(``python -m benchmarks.trainfeed --render RUN.jsonl ...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    lo, hi = fmt.format(values[0]), fmt.format(values[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def markdown(runs: list[list[dict[str, Any]]]) -> str:
    """The tables of one or more runs (ranges over the runs): loader alone per k, training."""
    machine = next((r for r in runs[0] if r.get("kind") == "machine"), {})
    ok = [r for run in runs for r in run if "rate" in r]

    def rates(kind: str, feed: str, k: int, key: str = "rate") -> list[float]:
        return [r[key] for r in ok if r["kind"] == kind and r["feed"] == feed and r["workers"] == k]

    def ratio(kind: str, feed: str, base: str, k: int) -> list[float]:
        pairs = zip(rates(kind, feed, k), rates(kind, base, k), strict=False)
        return [a / b for a, b in pairs if b]

    out = [
        f"{len(runs)} run(s) on {machine.get('cores')} cores, device {machine.get('gpu')}; "
        f"{machine.get('scans')} scans of {'x'.join(map(str, machine.get('shape', [])))}, batch 16 (2D) / 2 (64^3).",
        "",
    ]
    for kind, unit in (("2d", "slices/s"), ("patches", "patches/s")):
        ks = sorted({r["workers"] for r in ok if r["kind"] == kind})
        if not ks:
            continue
        out += [f"**Loader alone, {kind}** ({unit}; ratio to MedSegPy-style; HTTP over local)", "",
                "| k | MedSegPy-style | local | ratio | local, class-index y | ratio | HTTP | HTTP/local |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in ks:
            out.append(
                f"| {k} | {_span(rates(kind, 'medsegpy', k))} | {_span(rates(kind, 'local', k))} "
                f"| {_span(ratio(kind, 'local', 'medsegpy', k), '{:.1f}x')} "
                f"| {_span(rates(kind, 'local-index', k))} | {_span(ratio(kind, 'local-index', 'medsegpy', k), '{:.1f}x')} "
                f"| {_span(rates(kind, 'http', k))} | {_span(ratio(kind, 'http', 'local', k), '{:.2f}')} |"
            )
        out.append("")
    skipped = sorted(
        {r["skipped"] for run in runs for r in run if r.get("kind") == "train" and "skipped" in r}
    )
    if skipped:
        out += [f"**Training the reference 2D U-Net**: not measured ({skipped[0]}).", ""]
    ks = sorted({r["workers"] for r in ok if r["kind"] == "train"})
    if ks:
        out += ["**Training the reference 2D U-Net** (slices/s, share of time the device waited)", "",
                "| k | MedSegPy-style | local | local, class-index y | HTTP |", "|---|---|---|---|---|"]  # fmt: skip
        for k in ks:
            cells = [
                f"{_span(rates('train', f, k))} ({_span([100 * v for v in rates('train', f, k, 'wait_share')], '{:.1f}')} %)"
                for f in ("medsegpy", "local", "local-index", "http")
            ]
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        out.append("")
    cpu = [
        (r["feed"], r["workers"], r["cpu_ms_per_example"])
        for r in ok
        if r["kind"] == "2d" and "cpu_ms_per_example" in r
    ]
    peaks = [
        (r["kind"], r["feed"], r["workers"], max(r["worker_pss_mib"]))
        for r in ok
        if r.get("worker_pss_mib") and r["workers"] > 0
    ]
    if peaks:
        out.append("Memory of a worker at the end of its window (MiB, PSS, the largest of the k): " + "; ".join(
            f"{kind} {feed} k={k} {_span([m for kd, f, kk, m in peaks if (kd, f, kk) == (kind, feed, k)])}"
            for kind, feed, k in sorted({(kd, f, kk) for kd, f, kk, _ in peaks})
        ) + ".")  # fmt: skip
    own = [(r["kind"], r["feed"], r["workers"], r["own_cpu_ms_per_batch"])
           for r in ok if r["workers"] > 0 and "own_cpu_ms_per_batch" in r and r["kind"] != "patches"]  # fmt: skip
    if own:
        out.append("CPU of the training process itself per batch, its workers' not counted (ms): " + "; ".join(
            f"{kind} {feed} k={k} {_span([c for kd, f, kk, c in own if (kd, f, kk) == (kind, feed, k)], '{:.1f}')}"
            for kind, feed, k in sorted({(kd, f, kk) for kd, f, kk, _ in own})
        ) + ".")  # fmt: skip
    if cpu:
        out.append("CPU per 2D example (ms, all processes): " + "; ".join(
            f"{feed} {_span([c for f, k, c in cpu if f == feed], '{:.1f}')}" for feed in ("medsegpy", "local", "local-index", "http")
        ) + ".")  # fmt: skip
    return "\n".join(out)


def render(paths: list[str]) -> str:
    runs = [[json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()] for p in paths]
    return markdown(runs)

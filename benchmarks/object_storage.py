"""Object storage: the job and the loaders on ``s3://`` against the same on a local folder.

A real S3-compatible server (SeaweedFS's ``weed``) on loopback, on the same cores as the job and
the loaders. The job converts the same slice files into a fresh local store and a fresh S3
prefix (two workers each); the loaders read the local store and the S3 store directly (no
scancache server), each in a fresh process with its chunk cache capped at a quarter of the
decoded data, as in the real-scale section, so every epoch goes back to the storage.
Outside quick mode all of it runs a second time with the server pinned to a core of its own
(``os.sched_setaffinity``), which shows the job's and the loaders' own cost of object storage
apart from the server's, as with an S3 service on other machines.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.child import run_child
from benchmarks.data import BenchData
from benchmarks.realscale import _spec, cases, decoded_bytes, measured_batches
from benchmarks.report import Row
from benchmarks.s3_server import running_s3_server
from store.reader_share import LOCAL_CACHE_ENV

SECTION = "Object storage: S3 on loopback (SeaweedFS) against a local folder"
TARGET = 0.7
SERVER_ARGS_ENV = "SCANCACHE_BENCH_WEED_ARGS"


def _cpu(process: Any) -> float:
    """User + system CPU seconds of a process and its children so far."""
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except Exception:  # gone meanwhile
            pass
    return float(total)


def _convert(source: Path, store: str | Path, server: Any) -> tuple[float, float, float]:
    """(scans per second, S3 server CPU s, wall s) of one job (two local workers) into a fresh store."""
    from service.preprocess import run_preprocess

    before = _cpu(server)
    t0 = time.perf_counter()
    summary = run_preprocess(source, store, workers=2, progress=False)
    seconds = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"conversion to {store} failed: {summary.failures()[:2]}")
    return summary.converted / seconds, _cpu(server) - before, seconds


def _rates(runs: list[dict]) -> str:
    return ", ".join(f"{r['rate']:.0f}" for r in runs)


def _why(local: dict, remote: dict, where: str) -> str:
    """The measured split: wall, read time and CPU per batch both ways, and the S3 server's CPU
    per batch; ``where`` says which cores the server shared."""
    out = []
    for name, r in (("local", local), ("S3", remote)):
        batches = max(1, int(r["batches"]))
        cpu = r.get("cpu", {})
        cpu_s = float(cpu.get("user_s", 0.0)) + float(cpu.get("sys_s", 0.0)) if isinstance(cpu, dict) else 0.0
        text = (
            f"{name}: {1000 * r['wall_s'] / batches:.0f} ms a batch, read {1000 * r['read_s'] / batches:.0f} ms, "
            f"loader CPU {1000 * cpu_s / batches:.0f} ms"
        )
        if "server_cpu_s" in r:
            text += f", S3 server CPU {1000 * r['server_cpu_s'] / batches:.0f} ms"
        out.append(text)
    return "; ".join(out) + f" ({where})"


@contextmanager
def _server_on_its_own_core(server_pid: int) -> Iterator[str]:
    """The S3 server on the last core, this process (and the job's and loaders' processes it
    starts, which inherit it) on the others: as if the S3 service ran on other machines, so
    that the loader's and the job's own cost of object storage shows apart from the server's."""
    cores = sorted(os.sched_getaffinity(0))
    mine, theirs = cores[:-1], cores[-1:]
    os.sched_setaffinity(0, mine)
    try:
        os.sched_setaffinity(server_pid, theirs)
        yield f"{len(mine)} core(s) for the job and the loaders, {len(theirs)} for the S3 server"
    finally:
        os.sched_setaffinity(0, cores)
        os.sched_setaffinity(server_pid, cores)


def _measure(
    data: BenchData, work: Path, quick: bool, repeats: int, server: Any, weed: Any, cores: str
) -> list[Row]:
    """Conversion and the 2D and patch loaders, S3 against local, ``repeats`` times each."""
    rows: list[Row] = []
    suffix = "" if cores == "shared" else " (S3 server on its own core)"
    local_rates, s3_rates, s3_server_cpu, s3_wall = [], [], [], []
    s3_store = ""
    for _ in range(repeats):
        local_store = work / f"s3bench-local-{uuid.uuid4().hex[:8]}"
        try:
            local_rates.append(_convert(data.source_2d, local_store, weed)[0])
        finally:
            shutil.rmtree(local_store, ignore_errors=True)
        s3_store = server.new_url("bench")
        rate, server_cpu, wall = _convert(data.source_2d, s3_store, weed)
        s3_rates.append(rate)
        s3_server_cpu.append(server_cpu)
        s3_wall.append(wall)
    where = f"{os.cpu_count()} cores shared with the job's two workers" if cores == "shared" else cores
    if os.environ.get(SERVER_ARGS_ENV):
        where += f"; weed {os.environ[SERVER_ARGS_ENV]}"
    rows.append(
        Row(SECTION, f"conversion, scans/s (best of runs){suffix}", max(s3_rates), "scans/s", max(local_rates),
            "the job into a local folder", f">= {TARGET:g}x local", TARGET,
            note=f"runs: S3 {', '.join(f'{r:.2f}' for r in s3_rates)}; local "
            f"{', '.join(f'{r:.2f}' for r in local_rates)}",
            why=f"the S3 server used {max(s3_server_cpu):.1f} s of CPU in a {max(s3_wall):.1f} s job ({where})")
    )  # fmt: skip
    cap = max(1, decoded_bytes(data) // 4)
    env = {LOCAL_CACHE_ENV: str(cap)}
    wanted = ("2D", "64x64x32 patches")
    for case in [c for c in cases(data.shape) if c.label in wanted]:
        batches = measured_batches(case, quick)
        local_runs, s3_runs = [], []
        for _ in range(repeats):
            local_runs.append(run_child(_spec(str(data.store), case, batches, len(data.scan_ids)), env=env))
            before = _cpu(weed)
            s3_runs.append(run_child(_spec(s3_store, case, batches, len(data.scan_ids)), env=env))
            s3_runs[-1]["server_cpu_s"] = _cpu(weed) - before
        best_local = max(local_runs, key=lambda r: r["rate"])
        best_s3 = max(s3_runs, key=lambda r: r["rate"])
        unit = "slices/s" if case.tag != "RandomPatchDataLoader" else "patches/s"
        rows.append(
            Row(SECTION, f"{case.label}: loader reading S3 directly (best of runs){suffix}", best_s3["rate"], unit,
                best_local["rate"], "the same loader on the local store", f">= {TARGET:g}x local", TARGET,
                note=f"runs: S3 {_rates(s3_runs)}; local {_rates(local_runs)}; "
                f"caches capped at {cap / 1e6:.0f} MB",
                why=_why(best_local, best_s3, where))
        )  # fmt: skip
    return rows


def run(data: BenchData, work: Path, quick: bool, repeats: int | None = None) -> list[Row]:
    """With all cores shared by the S3 server, the job and the loaders (the target's setting);
    then, outside quick mode, with the server on a core of its own."""
    repeats = repeats or (1 if quick else 2)
    rows: list[Row] = []
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}  # fmt: skip
    server_dir = work / "s3-server"
    shutil.rmtree(server_dir, ignore_errors=True)
    try:
        # weed's own settings, for trying the server's (e.g. "-s3.cacheCapacityMB=1024"): never secrets
        extra = os.environ.get(SERVER_ARGS_ENV, "").split()
        with running_s3_server(server_dir, extra) as server:
            os.environ.update(server.env())
            import psutil

            weed = psutil.Process(server.process.pid)
            rows += _measure(data, work, quick, repeats, server, weed, "shared")
            if not quick and len(os.sched_getaffinity(0)) >= 2:
                with _server_on_its_own_core(server.process.pid) as cores:
                    rows += _measure(data, work, quick, repeats, server, weed, cores)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return rows

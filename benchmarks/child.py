"""Measurements that must start in a fresh process (cold caches): ``python -m benchmarks.child JSON``.

Prints one JSON object: ``{"cold": per-second rate of the first pass, "warm": of the second}``.
The first pass runs in a process that has never opened the store or server; the second repeats
the same batches in the same process, so the decoded-chunk cache and connections are warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")


def loader_rates(spec: dict[str, Any]) -> dict[str, Any]:
    from loaders import Config, DatasetCatalog, build_loader

    cfg = Config(
        TAG=spec["tag"],
        CATEGORIES=[c if isinstance(c, int) else tuple(c) for c in spec["categories"]],
        INCLUDE_BACKGROUND=True,
        IMG_SIZE=tuple(spec["img_size"]),
        SEED=0,
        NUM_WORKERS=int(spec.get("num_workers", 2)),
        PREFETCH_BATCHES=int(spec.get("prefetch", 4)),
        PATCHES_PER_SCAN=int(spec.get("patches_per_scan", 8)),
    )
    DatasetCatalog.remove("bench")
    DatasetCatalog.register("bench", spec["source"])
    t_open = time.perf_counter()
    loader = build_loader(
        cfg, "bench", batch_size=int(spec["batch_size"]), is_test=False, shuffle=True, drop_last=True
    )
    opened = time.perf_counter() - t_open
    n = min(int(spec["batches"]), len(loader))
    per_batch = int(spec["batch_size"])

    shapes: list[list[int]] = []

    def one_pass() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            x, y = loader[i]
            assert x.shape[0] == per_batch and y.shape[0] == per_batch
            shapes[:] = [list(x.shape), list(y.shape)]
        return n * per_batch / (time.perf_counter() - t0)

    from benchmarks.timing import cpu_usage

    result: dict[str, Any] = {"open_s": opened, "items": n * per_batch}
    for temp in ("cold", "warm"):  # each pass's rate, the loader's time split and the CPU it took
        loader.reset_stats()
        before = cpu_usage()
        result[temp] = one_pass()
        result[f"{temp}_cpu"] = {k: v - before[k] for k, v in cpu_usage().items()}
        result[f"{temp}_stats"] = {k: v for k, v in loader.stats().items() if isinstance(v, (int, float))}
    loader.close()
    result["batch_shapes"] = shapes
    return result


def run_child(spec: dict[str, Any], timeout: float = 900, env: dict[str, str] | None = None) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measurement process failed ({spec['task']}): {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec["task"] == "many":  # several measurements in one process (quick smoke runs only)
        result: Any = [loader_rates(s) for s in spec["specs"]]
    else:
        from benchmarks.realscale_child import realscale_measure

        result = {"loader": loader_rates, "realscale": realscale_measure}[spec["task"]](spec)
    print(json.dumps(result))

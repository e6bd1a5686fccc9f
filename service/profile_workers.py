"""``scancache profile --workers K``: the loader read the way a torch training script reads it,
``DataLoader(loader.as_torch_dataset(), batch_size=None, num_workers=K,
persistent_workers=True)``, epoch after epoch, and what each reader process did.

The window starts at the first batch, so the workers' start-up (reported apart) does not count
against the rate, and ends at the batch that crosses ``seconds``. Worker figures come from the
loader's shared counters (``loader.stats()["workers"]``); they include the batches each worker
had read ahead when the window closed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from service.profile import window_figures
from store.reader_share import tensorstore_used_here, usable_cores


def _torch_loader_class() -> Any:
    try:
        from torch.utils.data import DataLoader
    except ImportError:
        raise RuntimeError(
            "scancache profile --workers reads through torch DataLoader workers: "
            "pip install 'scancache[torch]' (or leave out --workers to profile in one process)"
        ) from None
    return DataLoader


def measure_with_workers(loader: Any, seconds: float, workers: int) -> dict[str, Any]:
    """Figures for ``run_profile``: rates in the training process, and ``stats["workers"]``."""
    torch_loader = _torch_loader_class()
    dataset = loader.as_torch_dataset()
    # a forked worker cannot use tensorstore once this process has (building some loaders reads
    # the store): then workers start from a fresh interpreter, as a user's script would have to
    context = "forkserver" if tensorstore_used_here() else None
    feed = torch_loader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=True,
        multiprocessing_context=context,
    )
    batches = examples = epochs = 0
    waited = 0.0
    asked = time.perf_counter()
    started: float | None = None
    cpu_at_start = 0.0
    start_s = 0.0
    try:
        while True:
            dataset.set_epoch(epochs)
            for x, *_ in feed:
                now = time.perf_counter()
                if started is None:  # the first batch: the workers have started
                    start_s, started, cpu_at_start = now - asked, now, time.process_time()
                    loader.reset_stats()  # the window's figures only (not building, not start-up)
                else:
                    waited += now - asked
                    batches += 1
                    examples += len(x)
                if now - started >= seconds and batches:
                    break
                asked = time.perf_counter()
            else:
                epochs += 1
                continue
            break
        wall = time.perf_counter() - (started or asked)
        main_cpu = time.process_time() - cpu_at_start
    finally:
        del feed  # persistent workers end with their DataLoader
    stats = dict(loader.stats())
    stats["wait_s"] = waited  # the training process's wait (the workers' own is worker_wait_s)
    figures = window_figures(loader, batches, examples, epochs, wall, waited, stats)
    figures.update(
        main_cpu_s=main_cpu,
        workers=workers,
        worker_start_s=start_s,
        start_method=context or "default",
        cores=usable_cores(),
    )
    return figures


def explain_workers(result: dict[str, Any]) -> list[str]:
    """Lines on the reader processes, from what this run measured."""
    k = int(result.get("workers") or 0)
    if not k:
        return []
    rows = result["stats"].get("workers") or []
    wall = float(result["seconds"]) or 1e-9
    lines = [
        f"{k} worker process(es) on {result['cores']} core(s), started once in "
        f"{result['worker_start_s']:.1f} s ({result['start_method']} start method); the training "
        f"process used {result['main_cpu_s'] / wall:.2f} cores receiving batches"
    ]
    for row in rows:
        lines.append(
            f"  worker {row['worker']}: {row['batches']} batches, "
            f"{row.get('batches_per_s') or 0.0:.2f} batches/s, {_busy(row):.2f} cores busy, "
            f"read {row['read_s']:.2f} s, copy {row['copy_s']:.2f} s"
        )
    if len(rows) < k:
        lines.append(f"  {k - len(rows)} worker(s) delivered nothing in the window")
    return lines


def _busy(row: dict[str, Any]) -> float:
    """Cores a worker kept busy while in its passes (its CPU time over its wall time)."""
    return float(row["cpu_s"]) / float(row["seconds"]) if row["seconds"] else 0.0


def why_workers(result: dict[str, Any]) -> str | None:
    """What bounds a run with workers, and which setting to change (None: no workers)."""
    k = int(result.get("workers") or 0)
    rows = result["stats"].get("workers") or []
    if not k or not rows:
        return None
    cores = int(result["cores"])
    wall = float(result["seconds"]) or 1e-9
    workers_busy = sum(_busy(r) for r in rows)
    main_busy = float(result["main_cpu_s"]) / wall
    used = workers_busy + main_busy
    if used >= 0.8 * cores:
        return (
            f"the workers ({workers_busy:.1f} cores) and the training process ({main_busy:.1f}) keep "
            f"{used:.1f} of the {cores} cores busy: more workers cannot help on this machine; cut "
            "the work per example (Config.Y_FORMAT = 'class_index', chunks shaped for the access, "
            "docs/tuning.md) or read on a machine with more cores"
        )
    more = min(cores, 2 * k)
    if min(_busy(r) for r in rows) >= 0.7 and more > k:
        return (
            f"each worker keeps about a core busy and {cores - used:.1f} of {cores} cores are "
            f"idle: try --workers {more} (DataLoader(num_workers={more}))"
        )
    if main_busy >= 0.7:
        return (
            f"the training process is the bound: it spends {main_busy:.2f} cores receiving batches "
            "from the workers; bigger batches or Config.Y_FORMAT = 'class_index' (fewer bytes) cut it"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        return (
            f"the workers ({workers_busy:.1f} cores) and the training process ({main_busy:.1f}) got "
            f"little CPU: other processes compete for the cores (load average {load:.1f} on "
            f"{cores}); profile again on a quiet machine"
        )
    idle = (
        f"neither the workers ({workers_busy:.1f} cores) nor the training process ({main_busy:.1f}) is busy"
    )
    if result.get("over_http"):
        return (
            f"{idle}: the workers wait on the server; give it more processes and cores "
            "(scancache serve --workers N, on a machine of its own) or read the store directly"
        )
    if result.get("object_storage"):
        return f"{idle}: the workers wait on object storage (requests in flight, its latency)"
    return f"{idle}: the workers wait on their reads (the disk); the time split within the workers says which"

"""The training-feed benchmark: does the GPU wait for data? ``python -m benchmarks.trainfeed``.

OAI-size phantoms (default 16 scans of 384x384x160 float32, 6 classes) as MedSegPy slice files
and as a scancache store. A torch ``DataLoader`` with k worker processes reads them three ways:

* **MedSegPy-style**: a map ``Dataset`` opening one ``.im`` and one ``.seg`` per item
  (``shuffle=True``, persistent workers), the baseline;
* **scancache local**: ``build_loader(...).as_torch_dataset(channels_first=True)``, persistent
  workers, ``set_epoch`` each epoch;
* **scancache HTTP**: the same over ``scancache serve`` on loopback (on the same machine).

Measured: the loader alone (2D slices/s for k = 0, 1, 2, 4, ... up to the cores; 64^3 patches/s
for a few k), then training a reference 2D U-Net (5 levels, 32 filters; CUDA with bf16 when
present, else the CPU) with the share of time the device waits for its next batch. Each
configuration writes one JSON line as soon as it is measured (``--out``), so a run cut short
keeps what it measured. ``--quick`` is a small smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")


from benchmarks.trainfeed_feeds import CATEGORIES, MedSegPyPatches, MedSegPySlices, prepare, scancache_dataset
from benchmarks.trainfeed_report import render
from benchmarks.unet import unet

MIN_STEPS = 3  # training steps a window must hold for its wait share to mean something


# -- measuring ---------------------------------------------------------------------------------------
def _cpu_s() -> float:
    """CPU seconds of this process and its live children (workers, servers started by us)."""
    try:
        import psutil
    except ImportError:
        return time.process_time()
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


def _own_cpu_s() -> float:
    """CPU seconds of this process alone (every thread: torch's pin-memory thread included),
    not its workers: what receiving the batches costs the training process."""
    t = os.times()
    return t.user + t.system


def _batches(loader: Any, dataset: Any) -> Iterable[Any]:
    """Endless batches, a new epoch (``set_epoch``) whenever one ends."""
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def torch_loader(dataset: Any, workers: int, batch: int | None, cuda: bool) -> Any:
    import torch

    kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": cuda}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    if batch is None:  # scancache: the dataset yields whole batches
        return torch.utils.data.DataLoader(dataset, batch_size=None, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **kwargs)


def _child_pids() -> set[int]:
    """This process's direct children (torch's workers are; a server's own workers are not)."""
    try:
        import psutil
    except ImportError:
        return set()
    return {child.pid for child in psutil.Process().children(recursive=False)}


def _pss_mib(pid: int) -> float | None:
    """A process's proportional set size (Linux ``smaps_rollup``): its private pages plus its
    share of pages it shares (copy-on-write pages of the parent it was forked from, batch
    segments the training process maps too). ``VmHWM`` would count the parent's whole resident
    memory at the fork for every forked worker."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def loader_rate(make: Callable[[], tuple[Any, Any]], workers: int, seconds: float) -> dict[str, Any]:
    """Examples/s of a DataLoader over ``seconds`` after its workers have started (warm-up:
    ``max(2, workers)`` batches), with the CPU it cost per example and each worker's memory
    at the end (PSS of the processes started for this loader)."""
    before = _child_pids()
    loader, dataset = make()
    it = iter(_batches(loader, dataset))
    t_start = time.perf_counter()
    for _ in range(max(2, workers)):
        next(it)
    first = time.perf_counter() - t_start
    if hasattr(dataset, "stats"):
        dataset._current().reset_stats()
    cpu0, own0, t0, examples, batches = _cpu_s(), _own_cpu_s(), time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        x, _ = next(it)
        examples += int(x.shape[0])
        batches += 1
    elapsed = time.perf_counter() - t0
    cpu, own = _cpu_s() - cpu0, _own_cpu_s() - own0
    out: dict[str, Any] = {"rate": examples / elapsed, "examples": examples, "seconds": elapsed,
                           "cpu_ms_per_example": 1000 * cpu / max(1, examples), "warmup_s": first,
                           "own_cpu_ms_per_batch": 1000 * own / max(1, batches)}  # fmt: skip
    if hasattr(dataset, "stats"):
        stats = dataset.stats()
        out["read_amplification"] = stats.get("read_amplification")
        out["worker_rates"] = [round(w["batches_per_s"] or 0, 2) for w in stats.get("workers", [])]
    sizes = [_pss_mib(pid) for pid in sorted(_child_pids() - before)]
    out["worker_pss_mib"] = [round(m) for m in sizes if m is not None]
    del it, loader
    gc.collect()
    return out


# -- training ----------------------------------------------------------------------------------------
def train_wait(
    make: Callable[[], tuple[Any, Any]], workers: int, seconds: float, device: str, min_steps: int = MIN_STEPS
) -> dict[str, Any]:
    """Train the reference U-Net for ``seconds``: slices/s and the share of time the device
    waited for a batch (time blocked on the loader over the whole loop; every step is
    synchronised, so the time outside the loader is the device's)."""
    import torch

    loader, dataset = make()
    cuda = device == "cuda"
    model = unet(1, len(CATEGORIES)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if y.dtype == torch.uint8 and y.ndim == 3:  # class indices: one-hot on the device
            y = torch.nn.functional.one_hot(y.long(), len(CATEGORIES) + 1)[..., 1:].permute(0, 3, 1, 2)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    it = iter(_batches(loader, dataset))
    for i in range(max(3, workers)):  # workers started, cuDNN tuned
        s0 = time.perf_counter()
        step(*next(it))
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - s0
        if i > 0 and min_steps and took > seconds / min_steps:  # the first step also waits for the workers
            del it, loader
            gc.collect()
            return {"skipped": f"a training step takes {took:.1f} s on {device}: the {seconds:g} s "
                    f"window holds fewer than {min_steps} steps"}  # fmt: skip
    events: list[tuple[Any, Any]] = []
    waited, examples, batches, t0 = 0.0, 0, 0, time.perf_counter()
    own0 = _own_cpu_s()
    while time.perf_counter() - t0 < seconds:
        w0 = time.perf_counter()
        x, y = next(it)
        waited += time.perf_counter() - w0
        batches += 1
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        step(x, y)
        if cuda:
            events[-1][1].record()
        examples += int(x.shape[0])
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    own = _own_cpu_s() - own0
    host_wait = waited / elapsed
    wait = host_wait
    if events:
        busy = sum(start.elapsed_time(end) for start, end in events)
        span = events[0][0].elapsed_time(events[-1][1])
        wait = max(0.0, 1.0 - busy / span) if span > 0 else 0.0
    del it, loader
    gc.collect()
    return {"rate": examples / elapsed, "wait_share": wait, "host_wait_share": host_wait,
            "own_cpu_ms_per_batch": 1000 * own / max(1, batches),
            "examples": examples, "seconds": elapsed}  # fmt: skip


# -- the run -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ks = sorted({0, 1, 2, *(2**i for i in range(2, 8) if 2**i <= cores), cores})
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainfeed", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 small scans, short windows (a smoke run)")
    p.add_argument("--scans", type=int, default=16)
    p.add_argument("--shape", default="384,384,160")
    p.add_argument("--workers", default=",".join(map(str, ks)), help="k for the loader-alone 2D rows")
    p.add_argument(
        "--patch-workers", default=",".join(map(str, sorted({0, min(4, cores), cores - cores // 4})))
    )
    p.add_argument("--train-workers", default=",".join(map(str, sorted({min(4, cores), cores - cores // 4}))))
    p.add_argument("--seconds", type=float, default=5.0, help="measuring window per configuration")
    p.add_argument("--train-seconds", type=float, default=10.0)
    p.add_argument("--feeds", default="medsegpy,local,local-index,http", help="which readers")
    p.add_argument("--sections", default="2d,train,patches")
    p.add_argument("--server-workers", type=int, default=max(1, cores // 2))
    p.add_argument("--server-cache", default="1G", help="the server's --cache-bytes (default: %(default)s)")
    p.add_argument("--work", default="bench-output/trainfeed")
    p.add_argument("--out", default=None, help="JSON lines (default: WORK/results.jsonl)")
    p.add_argument(
        "--render", nargs="+", default=None, metavar="JSONL", help="print the tables of earlier runs"
    )
    args = p.parse_args(argv)
    args.cores = cores
    if args.quick:
        args.scans, args.shape, args.seconds, args.train_seconds = 4, "96,96,32", 1.5, 2.0
        args.workers, args.patch_workers, args.train_workers = "0,2", "0,2", "2"
    return args


def _ks(text: str) -> list[int]:
    return [int(k) for k in text.split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.servers import scancache_server
    from loaders.catalog import close_shared_sources

    args = parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    shape = tuple(int(n) for n in args.shape.split(","))
    work = Path(args.work)
    out_path = Path(args.out) if args.out else work / "results.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feeds, sections = args.feeds.split(","), args.sections.split(",")

    def emit(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)
        with out_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    t0 = time.perf_counter()
    data = prepare(work, args.scans, shape, args.cores)  # type: ignore[arg-type]
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    emit({"kind": "machine", "cores": args.cores, "device": device, "gpu": gpu, "scans": args.scans,
          "shape": list(shape), "prepare_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
    h, w, _ = shape
    patch = min(64, *shape)
    with scancache_server(data.store, workers=args.server_workers, cache_bytes=args.server_cache) as url:
        sources = {"local": str(data.store), "local-index": str(data.store), "http": url}

        def maker(feed: str, kind: str, k: int, pin: bool) -> Callable[[], tuple[Any, Any]]:
            if feed == "medsegpy":
                ds = MedSegPySlices(data) if kind == "2d" else MedSegPyPatches(data, patch)
                batch = 16 if kind == "2d" else 2
                return lambda: (torch_loader(ds, k, batch, pin), ds)
            y_format = "class_index" if feed == "local-index" else "one_hot"
            if kind == "2d":
                make = lambda: scancache_dataset(sources[feed], "DefaultDataLoader", (h, w, 1), 16, y_format)  # noqa: E731
            else:
                make = lambda: scancache_dataset(  # noqa: E731
                    sources[feed], "RandomPatchDataLoader", (patch, patch, patch, 1), 2, y_format
                )

            def build() -> tuple[Any, Any]:
                ds = make()
                return torch_loader(ds, k, None, pin), ds

            return build

        plan: list[tuple[str, str, int]] = []
        if "2d" in sections:
            plan += [("2d", f, k) for k in _ks(args.workers) for f in feeds]
        if "train" in sections:
            plan += [("train", f, k) for k in _ks(args.train_workers) for f in feeds]
        if "patches" in sections:
            plan += [("patches", f, k) for k in _ks(args.patch_workers) for f in feeds if f != "local-index"]
        # Workers are forked, and tensorstore forbids a fork once the parent has read through it:
        # every configuration with workers runs before those reading in this process (k = 0).
        plan.sort(key=lambda item: item[2] == 0)
        too_slow: str | None = None  # the device's step time does not depend on the feed
        for section, feed, k in plan:
            kind = "patches" if section == "patches" else "2d"
            try:
                if section == "train" and too_slow:
                    result = {"skipped": too_slow}
                elif section == "train":
                    # pinned memory, as for training on a GPU
                    # a smoke run (--quick) always trains, so that every part of the loop runs
                    result = train_wait(maker(feed, kind, k, device == "cuda"), k, args.train_seconds, device,
                                        0 if args.quick else MIN_STEPS)  # fmt: skip
                else:  # the loader alone, as the baseline was measured (no pinning)
                    result = loader_rate(maker(feed, kind, k, False), k, args.seconds)
            except Exception as exc:  # one broken configuration must not hide the others
                result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            too_slow = too_slow or result.get("skipped")
            emit({"kind": section, "feed": feed, "workers": k, **result})
            gc.collect()  # the last DataLoader's iterator must not be inherited by the next workers
        # before the server stops: read-ahead threads still retrying against it end now, not
        # after the client's retry budget (they would hold the process at exit)
        close_shared_sources()
    emit({"kind": "done", "total_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``scancache profile SOURCE --tag TAG``: why is my GPU idle?

Runs a training loader over a store path or a server URL for a bounded time, the way
``model.fit`` consumes it (batch after batch, epoch after epoch, nothing else competing), and
prints batches/s, read amplification (bytes decoded / bytes delivered) and where the time went,
from ``loader.stats()``. The loaders need the ``[loaders]`` extra (Keras): imported only here,
so ``service`` itself never imports them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from store.errors import InvalidCategories, NotRegistered

PROFILE_DATASET = "scancache-profile"
# stats keys that are seconds spent inside the loader (not wall time): their split is the "why"
WORK_KEYS = ("read_s", "merge_s", "copy_s")


PROFILE_RETRY_S = 10.0  # how long a profiling run retries a server that does not answer


def _import_loaders() -> Any:
    try:
        import loaders
    except ImportError as err:
        raise RuntimeError(
            f"scancache profile needs the loaders (Keras) extra: pip install 'scancache[loaders]' ({err})"
        ) from None
    return loaders


def run_profile(
    source: str,
    tag: str,
    batch_size: int = 16,
    categories: Sequence[Any] | None = None,
    img_size: tuple[int, ...] | None = None,
    seconds: float = 10.0,
    split: str | None = None,
    seed: int = 0,
    y_format: str = "one_hot",
    workers: int = 0,
) -> dict[str, Any]:
    """Run the loader for about ``seconds`` (at least one batch); returns its figures. With
    ``workers`` > 0 it is read through torch ``DataLoader`` worker processes
    (``service.profile_workers``), in this process otherwise."""
    loaders = _import_loaders()
    cfg = loaders.Config()
    cfg.TAG = tag
    cfg.SEED = seed
    cfg.Y_FORMAT = y_format
    if categories is not None:
        cfg.CATEGORIES = list(categories)
    if img_size is not None:
        cfg.IMG_SIZE = tuple(img_size)
    filters: dict[str, Any] = {"split": split} if split else {}
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        # a server that is not there: a profiling run says so within seconds, not after the
        # training loaders' two-minute retry window
        filters["retry_seconds"] = PROFILE_RETRY_S
    loaders.DatasetCatalog.register(PROFILE_DATASET, source, **filters)
    try:
        loader = _build(loaders, cfg, tag, batch_size)
    except BaseException:  # nothing to profile: the next run registers the data set again
        loaders.DatasetCatalog.remove(PROFILE_DATASET)
        raise
    try:
        if workers > 0:
            from service.profile_workers import measure_with_workers

            result = measure_with_workers(loader, seconds, workers)
        else:
            result = _measure(loader, seconds)
        result["batches_per_epoch"] = len(loader)
        result["object_storage"] = source.startswith("s3://")
        result["over_http"] = source.startswith(("http://", "https://"))
        result["y_format"] = y_format
        return result
    finally:
        loader.close()
        unregister = getattr(loaders.DatasetCatalog, "remove", None)
        if unregister is not None:
            unregister(PROFILE_DATASET)


def _build(loaders: Any, cfg: Any, tag: str, batch_size: int) -> Any:
    """The loader to profile; its errors in the words of the command line."""
    try:
        return loaders.build_loader(
            cfg, PROFILE_DATASET, batch_size=batch_size, is_test=False, shuffle=True, drop_last=False
        )
    except InvalidCategories as exc:  # a class name the scans lack: name the flag the user typed
        raise InvalidCategories(str(exc)[len(exc.param) + 2 :], "--categories") from None
    except NotRegistered:
        known = ", ".join(sorted(loaders.LOADER_REGISTRY))
        raise ValueError(f"--tag {tag!r} is not a loader; the loaders are: {known}") from None
    except ValueError as exc:  # the catalog names its own data set: the user typed flags
        raise ValueError(_in_flags(str(exc))) from None


def batch_size_note(result: dict[str, Any], batch_size: int) -> str | None:
    """One line when the data set holds fewer examples than ``batch_size``: each batch then
    holds all of them (``drop_last=False``), and the figures are for that smaller batch."""
    if result.get("batches_per_epoch") != 1 or not result["batches"]:
        return None
    held = result["examples"] // result["batches"]
    if held >= batch_size:
        return None
    return (
        f"profile: note: --batch-size {batch_size} is more than the {held} examples of the data set: "
        f"each batch held those {held}"
    )


def _in_flags(message: str) -> str:
    """A catalog error in the words of the command line: ``dataset 'scancache-profile':
    split='x' matches no scan`` -> ``--split 'x' matches no scan``."""
    prefix = f"dataset {PROFILE_DATASET!r}: "
    text = message[len(prefix) :] if message.startswith(prefix) else message
    return re.sub(r"\bsplit=('[^']*')", r"--split \1", text)


def _measure(loader: Any, seconds: float) -> dict[str, Any]:
    fallback = _CounterStats(loader) if not hasattr(loader, "stats") else None
    if fallback is None and hasattr(loader, "reset_stats"):
        loader.reset_stats()
    batches = examples = epochs = 0
    waited = 0.0
    started = time.perf_counter()
    while True:
        for index in range(len(loader)):
            asked = time.perf_counter()
            x, _ = loader[index][:2]
            waited += time.perf_counter() - asked
            batches += 1
            examples += len(x)
            if time.perf_counter() - started >= seconds:
                break
        else:
            loader.on_epoch_end()
            epochs += 1
            continue
        break
    wall = time.perf_counter() - started
    stats = dict(loader.stats()) if fallback is None else fallback.stats(batches, waited, wall)
    return window_figures(loader, batches, examples, epochs, wall, waited, stats)


def window_figures(
    loader: Any, batches: int, examples: int, epochs: int, wall: float, waited: float, stats: dict[str, Any]
) -> dict[str, Any]:
    """What a profiling window measured, as ``run_profile`` returns it."""
    stats.setdefault("seconds", wall)
    return {
        "tag": type(loader).__name__,
        "batches": batches,
        "examples": examples,
        "epochs_completed": epochs,
        "seconds": wall,
        "batches_per_s": batches / wall if wall > 0 else 0.0,
        "examples_per_s": examples / wall if wall > 0 else 0.0,
        "caller_wait_s": waited,
        "stats": stats,
    }


class _CounterStats:
    """``loader.stats()`` for a loader that has none yet: the sources' ``io_counters`` deltas
    and the time the caller waited in ``loader[i]`` (docs: /work NOTICES interface)."""

    def __init__(self, loader: Any) -> None:
        self.sources = list({id(s.source): s.source for s in loader.scans}.values())
        self.start = self._totals()

    def _totals(self) -> dict[str, float] | None:
        totals: dict[str, float] = {}
        for source in self.sources:
            counters = getattr(source, "io_counters", None)
            if counters is None:
                return None
            for key, value in counters().items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def stats(self, batches: int, waited: float, wall: float) -> dict[str, Any]:
        end = self._totals()
        out: dict[str, Any] = {"batches": batches, "wait_s": waited, "seconds": wall}
        if end is None or self.start is None:
            out.update(bytes_read=None, bytes_delivered=None, read_amplification=None, read_s=None)
            return out
        delta = {k: end[k] - self.start.get(k, 0) for k in end}
        read, delivered = int(delta["bytes_decoded"]), int(delta["bytes_returned"])
        out.update(
            bytes_read=read,
            bytes_delivered=delivered,
            read_amplification=read / delivered if delivered else None,
            read_s=delta["read_s"],
        )
        return out


def explain(result: dict[str, Any]) -> list[str]:
    """The figures and the "why", from what this run measured."""
    stats = result["stats"]
    wall = float(result["seconds"]) or 1e-9
    lines = [
        f"{result['tag']}: {result['batches']} batches ({result['examples']} examples) in {wall:.1f} s: "
        f"{result['batches_per_s']:.2f} batches/s, {result['examples_per_s']:.1f} examples/s",
    ]
    amp = stats.get("read_amplification")
    if amp is not None:
        lines.append(
            f"read amplification {amp:.2f}: {_mb(stats.get('bytes_read'))} decoded for "
            f"{_mb(stats.get('bytes_delivered'))} delivered"
        )
    else:
        lines.append("read amplification: unknown (the source has no io_counters)")
    wait = float(stats.get("wait_s") or 0.0)
    work = {k: float(stats[k]) for k in WORK_KEYS if stats.get(k) is not None}
    parts = [f"{k[:-2]} {v:.2f} s" for k, v in work.items()]
    lines.append(
        f"time: the caller waited {wait:.2f} s of {wall:.2f} s ({100 * wait / wall:.0f}%)"
        + (f"; loader threads spent {', '.join(parts)}" if parts else "")
    )
    from service.profile_workers import explain_workers, why_workers

    lines.extend(explain_workers(result))
    step_ms = 1000.0 / result["batches_per_s"] if result["batches_per_s"] else float("inf")
    lines.append(f"a training step shorter than {step_ms:.1f} ms waits for data (the GPU idles)")
    split = _why(
        work,
        amp,
        str(result["tag"]),
        bool(result.get("object_storage")),
        str(result.get("y_format") or "one_hot"),
    )
    lines.append(f"why: {why_workers(result) or split}")
    if why_workers(result):
        lines.append(f"within the workers: {split}")
    return lines


def _why(
    work: dict[str, float],
    amp: float | None,
    tag: str = "",
    object_storage: bool = False,
    y_format: str = "one_hot",
) -> str:
    """What bounds the loader, from this run's time split (not canned per loader)."""
    if not work:
        return "the loader reports no time split (read, merge, copy)"
    biggest = max(work, key=lambda k: work[k])
    total = sum(work.values()) or 1e-9
    text = f"{biggest[:-2]} is {100 * work[biggest] / total:.0f}% of the loader threads' measured time"
    if biggest == "read_s" and amp is not None and amp > 1.5:
        # docs/tuning.md section 12: slice-shaped chunks cut 2D reads and multiply patch reads
        shaped = "--layout balanced, or deeper --chunks" if "Patch" in tag else "--layout slices or balanced"
        text += (
            f"; reads decode {amp:.1f}x the bytes they deliver, so chunks shaped for this access "
            f"(scancache preprocess {shaped}, docs/tuning.md section 12) would cut it"
        )
    elif biggest == "read_s" and object_storage and "Patch" in tag:
        # measured: about two range requests per z-layer of inner chunks a patch crosses, each
        # costing the S3 service CPU; tensorstore merges only reads less than 4 KiB apart
        text += (
            "; on object storage a patch costs range requests, about two per z-layer of inner "
            "chunks it crosses: a store converted with deeper inner chunks (scancache preprocess "
            "--chunks 64,64,32) needs fewer, or read through scancache serve (docs/tuning.md "
            "section 13)"
        )
    elif biggest == "read_s":
        text += (
            "; reads decode little more than they deliver, so decoding itself is the work: more "
            "reader processes divide it (as_torch_dataset with DataLoader(num_workers=k), "
            "which scancache profile --workers k measures, or Config.NUM_WORKERS read-ahead threads), and where the data set is larger than the "
            "chunk cache a larger cache keeps more of it decoded between epochs "
            "(SCANCACHE_LOCAL_CACHE_BYTES for a store read directly, scancache serve --cache-bytes "
            "for a server)"
        )
    elif biggest == "merge_s":
        text += "; merging CATEGORIES dominates: a store with a label map merges by table lookup"
    elif y_format == "one_hot":
        # measured (docs/tuning.md, 2026-12-05): one-hot float32 y is most of a 2D example's copy
        text += (
            "; copying into the batches dominates, mostly one-hot y (a float32 a channel a voxel): "
            "Config.Y_FORMAT = 'class_index' writes one uint8 a voxel for a one-hot on the device "
            "(docs/user-guide.md), or Config.Y_DTYPE = 'uint8' a quarter of y's bytes"
        )
    else:
        text += (
            "; copying x into the batches dominates: more workers (as_torch_dataset with "
            "num_workers) divide it"
        )
    return text


def _mb(value: Any) -> str:
    return "?" if value is None else f"{int(value) / 1e6:.1f} MB"

"""This process's share of the machine for reading stores, and whether it may still fork.

A torch DataLoader worker is one of k reader processes: it decodes with its share of the cores
and keeps a k-th of the default chunk cache (``set_reader_share``). tensorstore cannot be used
in a child forked after its parent used it (the child aborts): ``refuse_forked_reads`` turns that
into one exception, and the loaders check ``tensorstore_used_before_fork`` before they read.
"""

from __future__ import annotations

import os

from store.host_limits import memory_bytes, usable_cores
from store.units import parse_bytes, parse_whole

DEFAULT_CACHE_BYTES = 512 * 2**20  # the server's default (``scancache serve --cache-bytes``)
LOCAL_CACHE_ENV = "SCANCACHE_LOCAL_CACHE_BYTES"
LOCAL_CACHE_MAX = 4 * 2**30
WORKER_CACHE_MIN = 128 * 2**20  # the least default cache of one of k reader processes


def default_cache_bytes() -> int:
    """Chunk cache of a ``LocalSource`` opened without ``cache_bytes`` (training, scripts).

    ``$SCANCACHE_LOCAL_CACHE_BYTES`` if set, else an eighth of the memory this process may use
    (``store.host_limits.memory_bytes``: a container's limit where lower) within
    [512 MiB, 4 GiB]: a training epoch touches every chunk again, and a cache that holds the
    decoded dataset turns later epochs into copies (docs/tuning.md). The cache only grows as
    chunks are read. In one of k reader processes (:func:`set_reader_share`, a torch DataLoader
    worker) the default is a k-th of that, at least 128 MiB: k workers together hold what one
    process would, not k times as much (16 workers of 4 GiB each would fill a 64 GB machine);
    under torchrun the machine's :func:`local_ranks` share it the same way.
    """
    text = os.environ.get(LOCAL_CACHE_ENV, "").strip()
    if text:
        return parse_bytes(text, LOCAL_CACHE_ENV)  # 512M works as on the command line
    memory = memory_bytes() or 8 * DEFAULT_CACHE_BYTES  # not POSIX: keep the server's default
    whole = int(min(max(memory // 8, DEFAULT_CACHE_BYTES), LOCAL_CACHE_MAX))
    readers = _READERS * local_ranks()  # every rank's readers on this machine share it
    return whole if readers == 1 else max(whole // readers, WORKER_CACHE_MIN)


# A reader process that is one of k on a machine (a torch DataLoader worker) takes its share of
# the cores (decode threads of a LocalSource opened later in this process; None: one per core)
# and of the default chunk cache.
_READ_THREADS: int | None = None
_READERS = 1
# The process that first opened an array with tensorstore: a child forked after that cannot use
# tensorstore at all (it aborts), so a forked reader checks this first (loaders.torch_data).
_TENSORSTORE_PID: int | None = None


def set_reader_share(threads: int | None, readers: int = 1) -> None:
    """This process is one of ``readers`` reading at once: every ``LocalSource`` opened from
    now on decodes with ``threads`` (None: one per core) and, unless ``cache_bytes`` or
    ``$SCANCACHE_LOCAL_CACHE_BYTES`` says otherwise, keeps a ``readers``-th of the default
    chunk cache (:func:`default_cache_bytes`)."""
    global _READ_THREADS, _READERS
    _READ_THREADS = None if threads is None else max(1, int(threads))
    _READERS = max(1, int(readers))


LOCAL_RANKS_ENV = "LOCAL_WORLD_SIZE"  # set by torchrun: the training processes on this machine


def local_ranks() -> int:
    """Training processes on this machine that read at once: torchrun's ``LOCAL_WORLD_SIZE``
    (each rank reads its own shard, with its own workers), else 1."""
    text = os.environ.get(LOCAL_RANKS_ENV, "").strip()
    try:
        return parse_whole(text, LOCAL_RANKS_ENV, minimum=1) if text else 1
    except ValueError:  # torchrun's own variable: a wrong one is torchrun's to report
        return 1


def rank_cores() -> int:
    """This training process's share of the cores: :func:`usable_cores` over :func:`local_ranks`
    (8 ranks on a 64-core node read with 8 cores each, not 64 each)."""
    return max(1, usable_cores() // local_ranks())


def reader_cores() -> int:
    """The cores this process may keep busy reading: its share (:func:`set_reader_share`), else
    :func:`rank_cores`."""
    return _READ_THREADS if _READ_THREADS is not None else rank_cores()


def tensorstore_used_before_fork() -> bool:
    """Did the process this one was forked from read through tensorstore before the fork?"""
    return _TENSORSTORE_PID is not None and os.getpid() != _TENSORSTORE_PID


def tensorstore_used_here() -> bool:
    """Has this process read through tensorstore (so a child forked now could not)?"""
    return os.getpid() == _TENSORSTORE_PID


def refuse_forked_reads() -> None:
    """One exception, in a process forked after its parent read a store with tensorstore, where
    tensorstore would abort the process (SIGABRT, no Python error)."""
    if tensorstore_used_before_fork():
        raise RuntimeError(
            "this process was forked after its parent read a store with tensorstore, which "
            "tensorstore forbids (it would abort): start such processes with the 'spawn' or "
            "'forkserver' method, fork them before the first read, or read through a server URL"
        )


def mark_tensorstore_used() -> None:
    global _TENSORSTORE_PID
    if os.getpid() != _TENSORSTORE_PID:
        _TENSORSTORE_PID = os.getpid()


def read_threads() -> int | None:
    """Decode threads of a ``LocalSource`` opened now (None: one per core)."""
    return _READ_THREADS

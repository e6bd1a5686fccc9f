"""How much memory and how many cores this process may really use.

Physical memory and the CPU affinity are what the machine has; a container (docker
``--memory 8g --cpus 4``, a Kubernetes limit, a Slurm job's cgroup) may give a process far
less. Sizing the default chunk cache from a 128 GB host inside an 8 GB container, or starting
16 decode threads under a 4-core quota, gets the process killed or throttled, so both figures
take the tightest limit of the process's control groups (cgroup v2 and v1), walking up its
hierarchy, since a limit set on a parent group binds its children too.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 2**60  # v1 writes "no limit" as a page-rounded 2**63 - 1


def _groups(proc_cgroup: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller: path}; cgroup v2's unified line is under ""."""
    out: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


def _upwards(base: Path, group: str) -> Iterator[Path]:
    """``base/group``, then each parent folder up to ``base`` itself."""
    parts = [p for p in group.split("/") if p]
    for depth in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:depth])


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# The limits are read once per process and kept: a container's limits do not change while a
# process runs, and the loaders ask for the cores once a batch (reading the files costs ~0.1 ms).
@functools.cache
def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest memory limit over this process's cgroups (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None where none is set or none can be read."""
    groups = _groups(proc_cgroup)
    found: list[int] = []
    candidates = []
    if "" in groups:
        candidates += [p / "memory.max" for p in _upwards(root, groups[""])]
    if "memory" in groups:
        candidates += [p / "memory.limit_in_bytes" for p in _upwards(root / "memory", groups["memory"])]
    for path in candidates:
        text = _read(path)
        if text and text.isdigit() and 0 < int(text) < _NO_LIMIT:
            found.append(int(text))
    return min(found) if found else None


@functools.cache
def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest CPU quota over this process's cgroups in whole cores (rounded up: a quota
    of 2.5 cores keeps 3 threads busy part of the time), or None where none is set."""
    groups = _groups(proc_cgroup)
    quotas: list[float] = []
    if "" in groups:
        for path in _upwards(root, groups[""]):
            fields = (_read(path / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
                quotas.append(int(fields[0]) / int(fields[1]))
    if "cpu" in groups:
        for path in _upwards(root / "cpu", groups["cpu"]):
            quota, period = _read(path / "cpu.cfs_quota_us"), _read(path / "cpu.cfs_period_us")
            if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:
                quotas.append(int(quota) / int(period))  # "-1" (no quota) is not digits
    positive = [q for q in quotas if q > 0]
    return max(1, math.ceil(min(positive))) if positive else None


def physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def memory_bytes() -> int | None:
    """The memory this process may use: physical memory, or less where a cgroup limits it;
    None where the platform says neither."""
    limits = [m for m in (physical_memory(), cgroup_memory_limit()) if m]
    return min(limits) if limits else None


def usable_cores() -> int:
    """The cores this process may keep busy: its CPU affinity, or fewer where a cgroup's CPU
    quota says so."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota else cores)

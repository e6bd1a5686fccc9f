"""The memory and cores a process may use honour a container's cgroup limits (v2 and v1), read
from real files laid out as the kernel lays them out."""

from __future__ import annotations

from pathlib import Path

from store import host_limits
from store.host_limits import cgroup_cpu_limit, cgroup_memory_limit


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_limits_of_the_group_and_its_parents(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/kubepods/pod1/ctr")
    root = tmp_path / "cg"
    _write(root / "kubepods/pod1/ctr/memory.max", "max")  # the container itself: no limit
    _write(root / "kubepods/pod1/memory.max", str(8 * 2**30))  # the pod's limit binds it
    _write(root / "kubepods/memory.max", str(64 * 2**30))
    _write(root / "kubepods/pod1/ctr/cpu.max", "250000 100000")  # 2.5 cores
    _write(root / "kubepods/cpu.max", "max 100000")
    assert cgroup_memory_limit(root, proc) == 8 * 2**30
    assert cgroup_cpu_limit(root, proc) == 3


def test_cgroup_v1_limits(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/")
    root = tmp_path / "cg"
    _write(root / "memory/docker/abc/memory.limit_in_bytes", str(4 * 2**30))
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    _write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1")  # the name under cpu is what counts
    _write(root / "cpu/docker/abc/cpu.cfs_quota_us", "200000")
    _write(root / "cpu/docker/abc/cpu.cfs_period_us", "100000")
    assert cgroup_memory_limit(root, proc) == 4 * 2**30
    assert cgroup_cpu_limit(root, proc) == 2


def test_no_limits_or_unreadable_files_mean_none(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/\n1:cpu:/\n0::/")
    root = tmp_path / "cg"
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712")
    _write(root / "cpu/cpu.cfs_quota_us", "-1")
    _write(root / "cpu/cpu.cfs_period_us", "100000")
    _write(root / "memory.max", "max")
    _write(root / "cpu.max", "garbage")
    assert cgroup_memory_limit(root, proc) is None
    assert cgroup_cpu_limit(root, proc) is None
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path / "missing_proc") is None
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_this_process_gets_the_tighter_of_machine_and_container(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    physical = host_limits.physical_memory()
    assert physical and host_limits.memory_bytes() and host_limits.memory_bytes() <= physical  # type: ignore[operator]
    monkeypatch.setattr(host_limits, "cgroup_memory_limit", lambda: 3 * 2**30)
    monkeypatch.setattr(host_limits, "cgroup_cpu_limit", lambda: 1)
    assert host_limits.memory_bytes() == min(physical, 3 * 2**30)
    assert host_limits.usable_cores() == 1

"""Container resource figures from the cgroup filesystem, and cleanup of cgroup directories.

A container's cgroup is the absolute `linux.cgroupsPath` of its config.json (runc's cgroupfs
driver puts it at that path below each hierarchy's mount point). This host is cgroup v1 (one
hierarchy per controller, plus an empty v2 "unified" mount): figures come from v1 when its memory
controller is mounted, else from a pure v2 tree.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from berthd.common.errors import FailedPrecondition, InvalidArgument

MOUNTINFO = Path("/proc/self/mountinfo")
# The kernel reports "no limit" as PAGE_COUNTER_MAX pages (2^63 rounded to pages) on v1.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupStats:
    cpu_nanos: int  # total CPU time of all tasks, user + system
    memory_bytes: int  # usage minus inactive file cache, as `docker stats` shows it
    memory_limit_bytes: int  # 0: no limit
    pids: int
    oom_kills: int  # processes the kernel's OOM killer killed in this cgroup


@dataclass(frozen=True)
class CpuReading:
    """A cgroup's CPU counter and when it was read (monotonic clock: wall time can jump)."""

    at_nanos: int
    cpu_nanos: int


def cpu_percent(before: CpuReading, after: CpuReading) -> float:
    """CPU use between two readings in percent of one CPU (200.0: two CPUs busy), as `docker
    stats` computes it from its previous and current sample. A counter that went back (the
    cgroup was made anew) or no time between the readings reads as 0."""
    elapsed = after.at_nanos - before.at_nanos
    used = after.cpu_nanos - before.cpu_nanos
    if elapsed <= 0 or used <= 0:
        return 0.0
    return round(used / elapsed * 100, 2)


@dataclass(frozen=True)
class _Mount:
    point: Path
    root: str  # the hierarchy's path mounted there ("/" unless a cgroup namespace narrows it)


@dataclass(frozen=True)
class _Hierarchies:
    v1: dict[str, _Mount]  # controller (or "name=systemd") -> mount
    v2: _Mount | None


@functools.cache
def _hierarchies() -> _Hierarchies:
    """The cgroup mounts of this process, read once: mounts do not move under a running agent."""
    v1: dict[str, _Mount] = {}
    v2: _Mount | None = None
    for line in MOUNTINFO.read_text().splitlines():
        # "<id> <parent> <dev> <root> <mount point> <opts> [optional...] - <fstype> <src> <super>"
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount = _Mount(Path(_unescape(fields[4])), _unescape(fields[3]))
        if tail[0] == "cgroup2":
            v2 = v2 or mount
        elif tail[0] == "cgroup":
            # Super options name the controllers ("rw,cpu,cpuacct"); the others are harmless keys.
            for option in tail[2].split(","):
                v1.setdefault(option, mount)
    return _Hierarchies(v1, v2)


def _unescape(field: str) -> str:
    """mountinfo escapes spaces, tabs, newlines and backslashes as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _dir(mount: _Mount, cgroups_path: str) -> Path:
    path = PurePosixPath(cgroups_path)
    if not path.is_absolute():
        raise InvalidArgument(f"cgroupsPath {cgroups_path!r} must be absolute")
    # Below a mount of a sub-hierarchy, the path is relative to that sub-hierarchy (as in runc).
    if mount.root != "/" and path.is_relative_to(mount.root):
        path = PurePosixPath("/") / path.relative_to(mount.root)
    return mount.point / str(path).lstrip("/")


def _read_int(path: Path) -> int:
    """One number from a control file; 0 when the file is absent (controller not enabled)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    return 0 if text == "max" else int(text)


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed file such as memory.stat or memory.oom_control ("key value" lines)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    pairs = (line.split() for line in lines)
    return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].lstrip("-").isdigit()}


def read_stats(cgroups_path: str) -> CgroupStats | None:
    """CPU, memory, pids and OOM-kill figures of a container's cgroup; None once it is gone
    (runc delete removes it) or if no cgroup filesystem is mounted."""
    hierarchies = _hierarchies()
    memory = hierarchies.v1.get("memory")
    if memory is not None:
        return _read_v1(hierarchies.v1, cgroups_path)
    if hierarchies.v2 is not None:
        return _read_v2(_dir(hierarchies.v2, cgroups_path))
    return None


def read_cpu(cgroups_path: str) -> int | None:
    """Only the CPU counter (CgroupStats.cpu_nanos): one small file where read_stats reads six.
    None once the cgroup is gone, or if no cgroup filesystem with a CPU counter is mounted."""
    hierarchies = _hierarchies()
    if hierarchies.v1.get("memory") is not None:
        cpuacct = hierarchies.v1.get("cpuacct")
        if cpuacct is None:
            return None
        try:
            return int((_dir(cpuacct, cgroups_path) / "cpuacct.usage").read_text())
        except FileNotFoundError:
            return None
    if hierarchies.v2 is not None:
        usec = _read_keyed(_dir(hierarchies.v2, cgroups_path) / "cpu.stat").get("usage_usec")
        return None if usec is None else usec * 1000
    return None


def _read_v1(mounts: dict[str, _Mount], cgroups_path: str) -> CgroupStats | None:
    def controller_dir(name: str) -> Path | None:
        mount = mounts.get(name)
        return _dir(mount, cgroups_path) if mount else None

    memory = controller_dir("memory")
    assert memory is not None  # the caller checked
    if not memory.is_dir():
        return None
    cpuacct, pids = controller_dir("cpuacct"), controller_dir("pids")
    stat = _read_keyed(memory / "memory.stat")
    usage = _read_int(memory / "memory.usage_in_bytes")
    limit = _read_int(memory / "memory.limit_in_bytes")
    return CgroupStats(
        cpu_nanos=_read_int(cpuacct / "cpuacct.usage") if cpuacct else 0,
        memory_bytes=max(0, usage - stat.get("total_inactive_file", 0)),
        memory_limit_bytes=0 if limit >= _UNLIMITED else limit,
        pids=_read_int(pids / "pids.current") if pids else 0,
        # oom_kill is in memory.oom_control since Linux 4.13.
        oom_kills=_read_keyed(memory / "memory.oom_control").get("oom_kill", 0),
    )


def _read_v2(directory: Path) -> CgroupStats | None:
    if not directory.is_dir():
        return None
    stat = _read_keyed(directory / "memory.stat")
    usage = _read_int(directory / "memory.current")
    return CgroupStats(
        cpu_nanos=_read_keyed(directory / "cpu.stat").get("usage_usec", 0) * 1000,
        memory_bytes=max(0, usage - stat.get("inactive_file", 0)),
        memory_limit_bytes=_read_int(directory / "memory.max"),
        pids=_read_int(directory / "pids.current"),
        oom_kills=_read_keyed(directory / "memory.events").get("oom_kill", 0),
    )


def oom_kills(cgroups_path: str) -> int | None:
    """The cgroup's OOM-kill counter, or None if the cgroup is gone."""
    stats = read_stats(cgroups_path)
    return stats.oom_kills if stats else None


def remove_cgroup(cgroups_path: str, *, parents: bool = False) -> None:
    """Remove the cgroup's directory in every hierarchy (v1 controllers and v2).

    runc delete removes the container's own directories; this cleans what is left, e.g. after a
    failed create, and with `parents` also the ancestors that are now empty (a directory that
    still holds other cgroups is kept: the kernel refuses to remove it). Raises
    FailedPrecondition if processes still live in the cgroup.
    """
    hierarchies = _hierarchies()
    mounts = {*hierarchies.v1.values(), *([hierarchies.v2] if hierarchies.v2 else [])}
    busy: list[str] = []
    for mount in mounts:
        directory = _dir(mount, cgroups_path)
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            busy.append(str(directory))
            continue
        if parents:
            _remove_empty_parents(directory, mount.point)
    if busy:
        raise FailedPrecondition(f"cgroup still in use: {', '.join(sorted(busy))}")


def _remove_empty_parents(directory: Path, top: Path) -> None:
    for parent in directory.parents:
        if parent == top or not parent.is_relative_to(top):
            return
        try:
            os.rmdir(parent)
        except FileNotFoundError:
            continue
        except OSError:
            return  # other cgroups (or processes) below it

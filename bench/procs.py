"""Small /proc readers (Linux only): process trees, resident memory, threads, CPU time."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PROC = Path("/proc")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def _comm(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def _all_pids() -> list[int]:
    return [int(p.name) for p in _PROC.iterdir() if p.name.isdigit()]


def tree_pids(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pids_by_comm(prefix: str) -> list[int]:
    """Processes whose command name starts with prefix (e.g. every postgres backend)."""
    return [pid for pid in _all_pids() if _comm(pid).startswith(prefix)]


def _status_value(pid: int, key: str) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size of one process, KiB (0 once it has exited)."""
    return _status_value(pid, "VmRSS")


def threads(pid: int) -> int:
    return _status_value(pid, "Threads")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (its live threads included)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop().

    Each group is a function listing its pids, asked again at stop() so that processes
    started in between (a connection pool opening PostgreSQL backends) count from 0.
    Processes that exit in between lose what they used since start().
    """

    groups: dict[str, Callable[[], list[int]]]
    _before: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self._before = {
            pid: cpu_seconds(pid) for list_pids in self.groups.values() for pid in list_pids()
        }

    def pids(self) -> set[int]:
        return {pid for list_pids in self.groups.values() for pid in list_pids()}

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for name, list_pids in self.groups.items():
            used[name] = sum(
                max(0.0, cpu_seconds(pid) - self._before.get(pid, 0.0)) for pid in list_pids()
            )
        return used


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds) of every process on the machine."""
    return {pid: (_comm(pid), cpu_seconds(pid)) for pid in _all_pids()}


def cpu_top(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    seconds: float,
    exclude: set[int],
    limit: int = 5,
) -> list[tuple[str, float]]:
    """The busiest processes between two snapshots outside `exclude`, as (name, cores),
    summed by command name: what else competed for the CPU."""
    by_name: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        if pid in exclude:
            continue
        used = cpu - before.get(pid, (name, 0.0))[1]
        if used > 0:
            by_name[name] = by_name.get(name, 0.0) + used
    top = sorted(by_name.items(), key=lambda item: -item[1])[:limit]
    return [(name, round(used / seconds, 3)) for name, used in top if used / seconds >= 0.01]


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is already in user
    return (total - idle) / _CLOCK_TICKS, total / _CLOCK_TICKS

"""What the kernel says a process used: CPU time from /proc/PID/stat, memory from status.

utime and stime in /proc/PID/stat count every thread of the process (the
audit writer and the span exporter included), in clock ticks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, all its threads, in seconds."""
    stat = (PROC / str(pid) / "stat").read_text()
    # The command name (field 2) may hold spaces; the fields after it are plain.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) * TICK_S


def total_cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS since start) of `pid`, in MiB."""
    found: dict[str, float] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024  # kB
    return found


def children(pid: int) -> list[int]:
    """The direct children of `pid` (nginx's workers under its master)."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def core_seconds(core: int) -> dict[str, float]:
    """Time core `core` spent busy (any process, kernel included) and stolen, in seconds."""
    for line in (PROC / "stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{core}":
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            return {"busy": (user + nice + system + irq + softirq) * TICK_S,
                    "steal": steal * TICK_S}
    raise ValueError(f"no cpu{core} in /proc/stat")

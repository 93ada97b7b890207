"""Memory and CPU of processes and their trees, read from /proc (Linux).

The worker's memory counts its children: everything in its process group (supervisord makes each
program a group leader) plus any descendant that left the group.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    pgrp: int
    cpu_ticks: int
    rss_bytes: int


def read_stat(pid: int) -> ProcStat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        if fields[0] == b"Z":
            return None
        return ProcStat(pid, int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]),
                        int(fields[21]) * PAGE_SIZE)
    except (IndexError, ValueError):
        return None


def all_stats() -> dict[int, ProcStat]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(root: int, stats: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """`root`, its process group and all its descendants."""
    stats = all_stats() if stats is None else stats
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found = {root} | {s.pid for s in stats.values() if s.pgrp == root}
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return [stats[pid] for pid in sorted(found)]


def rss(pid: int, with_children: bool = False) -> int | None:
    """Resident memory in bytes (of the tree when `with_children`), or None if the process is gone."""
    if not with_children:
        stat = read_stat(pid)
        return stat.rss_bytes if stat else None
    members = tree(pid)
    return sum(s.rss_bytes for s in members) if members else None


def cpu_percent(pids: dict[str, tuple[int, bool]], interval: float = 0.5) -> dict[str, float]:
    """CPU use over `interval` seconds for each named (pid, with_children), in percent of one core."""

    def sample() -> dict[str, int]:
        stats = all_stats()
        result = {}
        for name, (pid, with_children) in pids.items():
            members = tree(pid, stats) if with_children else ([stats[pid]] if pid in stats else [])
            result[name] = sum(s.cpu_ticks for s in members)
        return result

    before, started = sample(), time.monotonic()
    time.sleep(interval)
    after, elapsed = sample(), time.monotonic() - started
    return {name: max(0.0, (after.get(name, 0) - ticks) / CLOCK_TICKS / elapsed * 100)
            for name, ticks in before.items()}

"""Who a process is, in a form no later process shares: `<pid>-<start time>`.

A pid alone comes back once the process is gone; with its start time (clock ticks since boot, the
22nd field of /proc/<pid>/stat) it names one process for the life of the machine. Files a process
leaves behind (metrics, the incoming-message spool) are named by it, so whoever finds them can tell
for certain whether their writer is still alive. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ProcessId:
    pid: int
    start_ticks: int | None  # None: a name without it (the library's default naming)

    def __str__(self) -> str:
        return str(self.pid) if self.start_ticks is None else f"{self.pid}-{self.start_ticks}"

    def is_dead(self) -> bool:
        """Gone, a zombie, or its pid now another process's (a different start time)."""
        state, ticks = state_and_start(self.pid)
        return state is None or state == "Z" or (self.start_ticks is not None and ticks != self.start_ticks)


def state_and_start(pid: int) -> tuple[str | None, int | None]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None, None
    # The command name may hold spaces and parentheses; after the last ')' come the fields from
    # the third (state) on, so starttime, the 22nd, is at index 19.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[19])
    except (IndexError, ValueError):
        return None, None


class ProcessIdentity:
    """prometheus_client's `process_identifier`: called on every metric write, so it reads /proc
    once per pid (a fork gets its own)."""

    def __init__(self) -> None:
        self._pid = 0
        self._id = ""

    def __call__(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            _, ticks = state_and_start(pid)
            self._pid, self._id = pid, str(ProcessId(pid, ticks))
        return self._id


def this_process() -> ProcessId:
    pid = os.getpid()
    return ProcessId(pid, state_and_start(pid)[1])


def parse(text: str) -> ProcessId | None:
    """The ProcessId `str()` gave, or None for anything else."""
    pid, _, ticks = text.partition("-")
    if not pid.isdigit() or not (ticks.isdigit() or ticks == ""):
        return None
    return ProcessId(int(pid), int(ticks) if ticks else None)

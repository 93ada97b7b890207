"""One view of every supervised process: supervisord's state joined with the listener's book
(restarts), memory from /proc and, for API members, readiness. `tp status`, `/api/processes` and
`/api/health/detailed` all show this. Synchronous: call it from a thread in async code."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..settings import LISTENER_PROGRAM, SupervisionSettings
from . import procfs, readiness
from .restarts import REASONS, book_path, read_book
from .supervisor import SupervisorClient

HEARTBEAT_STALE = 15.0  # the listener writes its book at least every 5 s (TICK_5)


@dataclass(frozen=True, slots=True)
class ProcessView:
    name: str
    group: str
    state: str
    pid: int | None
    uptime_seconds: float
    restarts: int
    restarts_by_reason: dict[str, int]
    starts: int
    crashes: int
    start_failures: int
    memory_bytes: int | None
    memory_includes_children: bool
    processes_counted: int
    memory_limit_bytes: int | None
    ready: bool | None  # API members only: answers its health route on its own socket
    restart_in_seconds: float | None  # a crashed program waiting out its back-off
    fatal_reason: str | None
    description: str
    stdout_logfile: str
    stderr_logfile: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    supervisor: str  # "ok" or "unavailable"
    processes: list[ProcessView] = field(default_factory=list)
    listener: dict[str, Any] = field(default_factory=dict)
    reload: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def snapshot(config: SupervisionSettings, *, probe_ready: bool = True) -> Snapshot:
    try:
        processes = SupervisorClient(config.supervisor_socket).processes()
    except OSError as exc:
        return Snapshot("unavailable", error=f"supervisord not reachable at {config.supervisor_socket} "
                                             f"({type(exc).__name__})")
    book = read_book(book_path(config.supervisor_socket))
    stats = procfs.all_stats()
    now = time.time()
    views = []
    for p in processes:
        record = book.processes.get(p.name) if book else None
        limit = config.memory_limit(p.group)
        with_children = bool(limit and limit[1])
        members = []
        if p.pid:
            members = procfs.tree(p.pid, stats) if with_children else ([stats[p.pid]] if p.pid in stats else [])
        due = record.restart_due if record and p.state == "EXITED" else None
        views.append(ProcessView(
            name=p.name, group=p.group, state=p.state, pid=p.pid or None, uptime_seconds=round(p.uptime, 1),
            restarts=record.restarts if record else 0,
            restarts_by_reason=dict(record.by_reason) if record else dict.fromkeys(REASONS, 0),
            starts=record.starts if record else 0,
            crashes=record.crashes if record else 0,
            start_failures=record.start_failures if record else 0,
            memory_bytes=sum(m.rss_bytes for m in members) if members else None,
            memory_includes_children=with_children,
            processes_counted=len(members),
            memory_limit_bytes=limit[0] if limit else None,
            ready=(readiness.probe(readiness.member_socket(config.var_dir, p.member), timeout=1.0)
                   if p.state == "RUNNING" else False)
            if probe_ready and p.group == config.api_group else None,
            restart_in_seconds=round(max(0.0, due - now), 2) if due else None,
            fatal_reason=record.fatal_reason if record and p.state == "FATAL" else None,
            description=p.description, stdout_logfile=p.stdout_logfile, stderr_logfile=p.stderr_logfile,
        ))
    listener_state = next((p.state for p in processes if p.group == LISTENER_PROGRAM), "absent")
    heartbeat_age = round(now - book.heartbeat, 1) if book and book.heartbeat else None
    listener = {"state": listener_state, "heartbeat_age_seconds": heartbeat_age,
                "stale": listener_state != "RUNNING" or heartbeat_age is None or heartbeat_age > HEARTBEAT_STALE}
    return Snapshot("ok", views, listener, dict(book.reload) if book else {})


def health_summary(config: SupervisionSettings) -> tuple[dict[str, Any], bool]:
    """What /api/health/detailed shows about processes, and whether they are healthy: no program
    given up on (FATAL) and the listener alive. Without supervisord (development), not unhealthy."""
    snap = snapshot(config, probe_ready=False)
    if snap.supervisor != "ok":
        return {"supervisor": "unavailable"}, True
    summary = {p.name: {"state": p.state, "pid": p.pid, "restarts": p.restarts, "uptime_seconds": p.uptime_seconds}
               for p in snap.processes}
    healthy = not any(p.state == "FATAL" for p in snap.processes) and not snap.listener["stale"]
    return {"supervisor": "ok", "listener": snap.listener, "processes": summary}, healthy


def format_size(size: float) -> str:
    """Bytes as operators read them (binary units, one decimal)."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"

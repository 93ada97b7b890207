"""The book of starts, crashes and restarts per process, kept by the tp-events listener.

supervisord keeps no restart counter (getProcessInfo has none: http://supervisord.org/api.html): the
listener counts every PROCESS_STATE event into this book and writes it to a JSON file next to
supervisord's socket (one writer; readers get a consistent file through an atomic rename).
`tp status`, `/api/processes`, `/api/health/detailed` and the metrics read it with `read_book` /
`read_counters`.

A restart is a return to RUNNING after the first start, attributed to why the process went down:
`crash` (it exited while RUNNING), `memory` (the watchdog), `reload` (a rolling reload), `manual`
(`tp restart`, the API, supervisorctl).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

BOOK_FILE = "tp-processes.json"


REASONS = ("crash", "memory", "reload", "manual")
INTENT_TTL = 300.0  # an intent not followed by a stop within this long is forgotten


class ReloadStatus(StrEnum):
    """The last rolling reload, as the book's `reload` record holds it (the listener writes it,
    `tp status` reports it)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class ProcessRecord:
    name: str
    state: str = "UNKNOWN"
    pid: int = 0
    starts: int = 0
    restarts: int = 0
    crashes: int = 0  # exits while RUNNING
    start_failures: int = 0  # exits before startsecs (supervisord's BACKOFF)
    fatal: int = 0  # times supervisord gave up (FATAL)
    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    last_start: float | None = None
    last_exit: float | None = None
    last_exit_expected: bool | None = None
    consecutive_crashes: int = 0
    backoff_delay: float = 0.0  # the delay applied after the last crash
    restart_due: float | None = None  # epoch seconds of a scheduled start (back-off)
    fatal_reason: str | None = None
    memory_restart_rss: int | None = None  # RSS that triggered the last memory restart
    held: bool = False  # stopped by an operator while down: not restarted by the listener
    restarting: bool = False  # the listener stopped it to restart it (finish if the listener dies)
    down_reason: str | None = None
    intent: str | None = None
    intent_at: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.by_reason = {**dict.fromkeys(REASONS, 0), **record.by_reason}
        return record


@dataclass(slots=True)
class Book:
    supervisord_pid: int = 0
    listener_pid: int = 0
    heartbeat: float = 0.0
    # A crash after this long up starts the back-off afresh (PM2: 30 s); the listener sets it.
    reset_after: float = 30.0
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    reload: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str) -> ProcessRecord:
        if name not in self.processes:
            self.processes[name] = ProcessRecord(name)
        return self.processes[name]

    def note_intent(self, name: str, reason: str, now: float) -> None:
        record = self.record(name)
        record.intent, record.intent_at = reason, now
        if reason == "stop":
            record.held = True
            record.restart_due = None

    def transition(self, name: str, state: str, from_state: str, now: float, *, pid: int = 0,
                   expected: bool | None = None) -> ProcessRecord:
        """Apply one PROCESS_STATE event; returns the record (its fields say what happened)."""
        record = self.record(name)
        record.state = state
        if record.intent_at is not None and now - record.intent_at > INTENT_TTL:
            record.intent = record.intent_at = None
        if state == "RUNNING":
            if pid and pid == record.pid and record.starts:
                return record  # already counted: the listener's catch-up saw this start first
            record.starts += 1
            if record.starts > 1:
                reason = record.down_reason or "manual"
                record.restarts += 1
                record.by_reason[reason] = record.by_reason.get(reason, 0) + 1
            record.pid, record.last_start = pid, now
            record.down_reason = record.intent = record.intent_at = None
            record.fatal_reason = record.restart_due = None
            record.held = False
        elif state == "EXITED":
            record.pid = 0
            record.last_exit, record.last_exit_expected = now, expected
            if from_state == "RUNNING":
                record.crashes += 1
                record.down_reason = "crash"
                uptime = now - record.last_start if record.last_start is not None else 0.0
                record.consecutive_crashes = 1 if uptime >= self.reset_after else record.consecutive_crashes + 1
        elif state == "BACKOFF":
            record.start_failures += 1
        elif state == "FATAL":
            record.fatal += 1
            record.pid = 0
        elif state in ("STOPPING", "STOPPED"):
            if state == "STOPPED":
                record.pid = 0
            if record.down_reason is None and from_state in ("RUNNING", "STARTING", "STOPPING", "BACKOFF"):
                intent = record.intent if record.intent in REASONS else None
                record.down_reason = intent or "manual"
        return record

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = {name: asdict(record) for name, record in sorted(self.processes.items())}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Book:
        return cls(
            supervisord_pid=int(data.get("supervisord_pid", 0)),
            listener_pid=int(data.get("listener_pid", 0)),
            heartbeat=float(data.get("heartbeat", 0.0)),
            reset_after=float(data.get("reset_after", 30.0)),
            processes={name: ProcessRecord.from_json(rec) for name, rec in data.get("processes", {}).items()},
            reload=dict(data.get("reload", {})),
        )


def write_book(path: Path, book: Book) -> None:
    """Atomically replace the file (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tp-processes-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(book.to_json(), handle, indent=1)
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_book(path: Path) -> Book | None:
    try:
        return Book.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@dataclass(frozen=True, slots=True)
class Counters:
    """What the metrics export per process (counters only grow while supervisord runs)."""

    starts: int
    restarts: int
    crashes: int
    start_failures: int
    fatal: int
    by_reason: dict[str, int]


def book_path(supervisor_socket: Path) -> Path:
    """The listener's book, next to supervisord's socket: every party finds it."""
    return supervisor_socket.parent / BOOK_FILE


def read_counters(supervisor_socket: Path) -> dict[str, Counters]:
    """Restart counters per process (`group:name`), from the listener's book next to the socket;
    empty when there is no book (no listener, or supervisord not running)."""
    book = read_book(book_path(supervisor_socket))
    if book is None:
        return {}
    return {
        name: Counters(r.starts, r.restarts, r.crashes, r.start_failures, r.fatal, dict(r.by_reason))
        for name, r in book.processes.items()
    }

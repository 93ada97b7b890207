"""The worker pool: the `tp-worker` process supervisord runs, parent of the worker children.

It never loads TDLib and never forks a process that has: children are fresh interpreters
(fork+exec). It respawns a child that dies with PM2's back-off, the listener's values from settings
(x1.5 from TP_RESTART_DELAY, capped at TP_RESTART_DELAY_MAX, reset after TP_RESTART_RESET_AFTER
up), forwards SIGTERM for a warm shutdown (the children then hand their accounts off to the other
live hosts: TP_DRAIN_ON_STOP), and SIGKILLs what is left after the drain deadline.
Children die with the pool even when it is SIGKILLed (PR_SET_PDEATHSIG).

Recycling: a child whose resident memory passes its share of `TP_WORKER_MEMORY_LIMIT` (settings.py's
WORKER_CHILD_MEMORY_SHARE, split between the children) is stopped warm (RECYCLE_SIGNAL, so its
accounts stay on this host; SIGKILL after the drain deadline) and replaced, before the listener
restarts the whole worker at the limit itself; one that stops itself after
`TP_WORKER_MAX_JOBS` jobs (exit 0) is replaced at once. A replacement is told which identity its
predecessor had (`--reaped`), so the dead one's jobs are given back at once, not after its heartbeat
expires.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

import structlog

from ..metrics.definitions import create_metrics
from ..ops.procfs import read_stat
from ..outages import POSTGRES_DOWN
from ..settings import WORKER_CHILD_MEMORY_SHARE, Settings
from ..storage.db import open_pool
from ..storage.files import open_blob_store
from ..storage.migrations import ensure_schema

log = structlog.get_logger(__name__)

MEMORY_CHECK_SECONDS = 5.0
# The signal that stops one child warm to replace it (recycling): its accounts stay on this host.
# SIGTERM instead means the whole worker stops, and the children hand their accounts off
# (worker/child.py).
RECYCLE_SIGNAL = signal.SIGUSR1
SCHEMA_CHECK_WAIT = 10.0


async def check_schema(settings: Settings, *, wait_seconds: float = SCHEMA_CHECK_WAIT) -> None:
    """Before any child starts: migrate (TP_AUTO_MIGRATE) once, or raise ConfigError for a schema
    behind the code, so `tp-worker` stops with one line (supervisord shows it FATAL) instead of
    restarting children that fail alike. A database that does not answer yet is not a
    misconfiguration: the children wait for it, with back-off."""
    try:
        async with open_pool(settings, wait_seconds=wait_seconds, min_size=1, max_size=1,
                             connect_timeout=wait_seconds) as pool, pool.acquire() as conn:
            await ensure_schema(conn, auto_migrate=settings.database.auto_migrate)
    except POSTGRES_DOWN as exc:  # not there (yet); OSError covers TimeoutError
        log.warning("database not reachable at start; the children will wait for it", error=type(exc).__name__)


async def check_file_store(settings: Settings) -> None:
    """Before any child starts: an S3 file store that refuses the credentials, lacks the bucket or
    cannot be reached raises ConfigError, for the same reason as `check_schema` (every child would
    fail alike). The pool then keeps botocore loaded (docs/performance.md): the price of one line."""
    if settings.files.s3 is not None:
        async with open_blob_store(settings.files):
            pass


@dataclass
class ChildSlot:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_delay: float = 0.0
    next_start: float = 0.0
    restarts: int = 0
    # Crashes in a row, each after less than TP_RESTART_RESET_AFTER up: the back-off's exponent.
    consecutive_crashes: int = 0
    exits: list[int] = field(default_factory=list)
    # The identity of the last child that ran in this slot (name-pid), once it is reaped.
    reaped: str | None = None
    # Set when the pool stopped the child to recycle it: SIGKILL after this monotonic time.
    recycle_deadline: float | None = None

    def record_exit(self, code: int, pid: int, now: float, settings: Settings) -> bool:
        """Note the child's exit and when to start the next; True when it was recycled (asked to
        stop, or stopped itself with 0). A recycled child, or one up long enough, resets the back-off."""
        uptime = now - self.started_at
        self.exits.append(code)
        self.reaped = f"{self.name}-{pid}"
        self.process = None
        recycled = self.recycle_deadline is not None or code == 0
        self.recycle_deadline = None
        if uptime >= settings.supervision.backoff_reset_after or recycled:
            self.consecutive_crashes = 0
        self.consecutive_crashes += 1
        self.restart_delay = settings.supervision.backoff_delay(self.consecutive_crashes)
        self.next_start = now + self.restart_delay
        return recycled


class WorkerPool:
    def __init__(self, settings: Settings, *, children: int = 1) -> None:
        self._settings = settings
        self._stop_requested = False
        self._metrics = create_metrics(settings.metrics_dir)
        self.child_memory_limit = int(settings.supervision.worker_memory_limit * WORKER_CHILD_MEMORY_SHARE / children)
        # A slot's name, so its children's identities (name-pid), start with the host's id: two hosts'
        # children must never share an identity (a lease owner, a liveness lock), whatever their pids.
        base = f"{settings.host.id}/{settings.instance.replace(':', '-')}"
        self.slots = [
            ChildSlot(name=f"{base}-w{i}",
                      argv=[sys.executable, "-m", "telegram_platform.worker.child",
                            "--name", f"{base}-w{i}", "--parent-pid", str(os.getpid())])
            for i in range(children)
        ]

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        # Only record intent: the main loop does the work.
        self._stop_requested = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        log.info("worker pool starting", children=len(self.slots))
        last_memory_check = time.monotonic()
        while not self._stop_requested:
            now = time.monotonic()
            for slot in self.slots:
                self._tend(slot, now)
            if now - last_memory_check >= MEMORY_CHECK_SECONDS:
                last_memory_check = now
                for slot in self.slots:
                    self._check_memory(slot, now)
            time.sleep(0.1)
        return self._shutdown()

    def _check_memory(self, slot: ChildSlot, now: float) -> None:
        if slot.process is None or slot.recycle_deadline is not None:
            return
        stat = read_stat(slot.process.pid)
        if stat is None or stat.rss_bytes <= self.child_memory_limit:
            return
        log.warning("worker child over its memory ceiling, recycling", child=slot.name, pid=slot.process.pid,
                    rss_mb=round(stat.rss_bytes / 1048576, 1), limit_mb=round(self.child_memory_limit / 1048576, 1))
        # Not SIGTERM, which would hand the host's accounts off: this child's accounts stay here.
        slot.process.send_signal(RECYCLE_SIGNAL)
        slot.recycle_deadline = now + self._settings.worker.drain_seconds + 15.0

    def _tend(self, slot: ChildSlot, now: float) -> None:
        if slot.process is not None:
            code = slot.process.poll()
            if code is None:
                if slot.recycle_deadline is not None and now >= slot.recycle_deadline:
                    log.error("worker child did not stop in time, killing", child=slot.name, pid=slot.process.pid)
                    slot.process.kill()
                return
            uptime = now - slot.started_at
            self._metrics.worker_child_exited(slot.process.pid, code)
            recycled = slot.record_exit(code, slot.process.pid, now, self._settings)
            if recycled:
                log.info("worker child recycled, replacing it", child=slot.name, exit_code=code,
                         uptime_s=round(uptime, 1))
            else:
                log.error("worker child exited, restarting", child=slot.name, exit_code=code,
                          uptime_s=round(uptime, 1), restart_in_s=round(slot.restart_delay, 2))
            return
        if now >= slot.next_start:
            if slot.started_at:
                slot.restarts += 1
            argv = [*slot.argv, "--reaped", slot.reaped] if slot.reaped else slot.argv
            slot.process = subprocess.Popen(argv)
            slot.started_at = now
            log.info("worker child started", child=slot.name, pid=slot.process.pid)

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self._settings.worker.drain_seconds + 15.0
        live = [s.process for s in self.slots if s.process is not None]
        log.info("worker pool stopping", children=len(live))
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker child did not stop in time, killing", pid=process.pid)
                process.kill()
                process.wait()
        log.info("worker pool stopped")
        return 0

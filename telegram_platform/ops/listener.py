"""tp-events: supervisord's event listener for the platform (the `tp-events` console script).

It closes the gaps between supervisord (http://supervisord.org/events.html) and PM2's restart strategies
(https://pm2.keymetrics.io/docs/usage/restart-strategies/):

- counts every start, crash and restart per process (PROCESS_STATE events) into the book that
  `tp status`, `/api/processes`, `/api/health/detailed` and the metrics read (ops/restarts.py);
- restarts a managed program (autorestart=false in supervisord.conf) that crashed after a good
  start, with PM2's exponential back-off: x1.5 from TP_RESTART_DELAY, capped at 15 s, reset after
  30 s up. Crashes before `startsecs` stay supervisord's business (startretries, then FATAL); the
  listener records why it gave up;
- memory watchdogs, checked every TP_WATCHDOG_INTERVAL (default 2 s): an API member above
  TP_API_MEMORY_LIMIT (its own RSS), the worker above TP_WORKER_MEMORY_LIMIT (with its children),
  is restarted gracefully (SIGTERM drain; API members one at a time, only while the others serve);
- carries out restart and reload requests from the API (REMOTE_COMMUNICATION events), since an
  API member cannot restart its own group from inside it.

The event protocol is answered at once on the main thread; anything that waits (XML-RPC stops and
starts, readiness probes, log tails) runs on a thread pool, so one slow stop delays nothing else.
superlance's memmon is not used: it blocks the protocol while it stops a process, cannot count a
group's children per program, and `-p group:proc` crashes (superlance #79).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import structlog

from ..settings import EXIT_CONFIG, ConfigError, SupervisionSettings
from ..version import add_version_option
from . import procfs
from .actions import ActionError, Operator
from .restarts import Book, ReloadStatus, book_path, read_book, write_book
from .supervisor import REMOTE_TYPE, Fault, Faults, SupervisorClient, full_name

log = structlog.get_logger(__name__)

ClientFactory = Callable[[], SupervisorClient]


def parse_tokens(line: str) -> dict[str, str]:
    """'ver:3.0 server:supervisor len:54' -> {'ver': '3.0', ...}"""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


class Supervision:
    """What the listener knows and does; `on_event` is fast, everything slow goes to the pool."""

    def __init__(self, config: SupervisionSettings, client_factory: ClientFactory, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._client = client_factory
        self._clock = clock
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tp-events")
        self._busy: set[str] = set()
        self._timers: dict[str, threading.Timer] = {}
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.book = Book(reset_after=config.backoff_reset_after)
        self.book_path = book_path(config.supervisor_socket)

    # -- life cycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Load the book if it belongs to this supervisord (the listener itself was restarted)."""
        supervisord_pid = os.getppid()
        with contextlib.suppress(OSError, Fault):
            supervisord_pid = self._client().pid()
        previous = read_book(self.book_path)
        if previous is not None and previous.supervisord_pid == supervisord_pid:
            self.book = previous
        self.book.supervisord_pid = supervisord_pid
        self.book.listener_pid = os.getpid()
        self.book.reset_after = self.config.backoff_reset_after
        self.book.heartbeat = self._clock()
        self._save()
        self._watchdog = threading.Thread(target=self._watch_memory, name="tp-events-watchdog", daemon=True)
        self._watchdog.start()
        self._pool.submit(self._reconcile)
        log.info("listener started", book=str(self.book_path), managed=list(self.config.managed),
                 api_memory_limit=self.config.api_memory_limit, worker_memory_limit=self.config.worker_memory_limit,
                 watchdog_interval=self.config.watchdog_interval)

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            self._save()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- events (main thread: must not block) ---------------------------------------------------

    def on_event(self, header: dict[str, str], payload: str) -> None:
        event = header.get("eventname", "")
        if event.startswith("PROCESS_STATE_"):
            first, _, _ = payload.partition("\n")
            self._on_state(event.removeprefix("PROCESS_STATE_"), parse_tokens(first))
        elif event.startswith("TICK_"):
            with self._lock:
                self.book.heartbeat = self._clock()
                self._save()
            self._submit("reconcile", self._reconcile)
        elif event == "REMOTE_COMMUNICATION":
            first, _, data = payload.partition("\n")
            if parse_tokens(first).get("type") == REMOTE_TYPE:
                self._on_request(data)

    def _on_state(self, state: str, fields: dict[str, str]) -> None:
        name = full_name(fields.get("groupname", ""), fields.get("processname", ""))
        group = fields.get("groupname", "")
        now = self._clock()
        expected = fields.get("expected")
        with self._lock:
            record = self.book.transition(name, state, fields.get("from_state", ""), now,
                                          pid=int(fields.get("pid", 0) or 0),
                                          expected=None if expected is None else expected == "1")
            if state == "EXITED" and fields.get("from_state") == "RUNNING":
                log.warning("process crashed", process=name, consecutive=record.consecutive_crashes,
                            expected_exit=record.last_exit_expected)
                if group in self.config.managed and not record.held:
                    self._schedule_start(name, record.consecutive_crashes)
            elif state == "RUNNING":
                self._cancel_timer(name)
            elif state == "FATAL":
                self._submit(f"explain:{name}", lambda: self._explain_fatal(name))
            self._save()

    def _on_request(self, data: str) -> None:
        try:
            message = json.loads(data)
            action, name = str(message["action"]), str(message.get("name", ""))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed request", data=data[:200])
            return
        if action == "intent":
            with self._lock:
                self.book.note_intent(name, str(message.get("reason", "manual")), self._clock())
                if message.get("reason") == "stop":
                    self._cancel_timer(name)
                self._save()
        elif action == "restart" and name:
            self._submit(name, lambda: self._restart_request(name, str(message.get("reason", "manual"))))
        elif action == "reload":
            self._submit("reload", lambda: self._reload(str(message.get("requested_by", "api")),
                                                        bool(message.get("worker", False))))
        else:
            log.warning("ignored an unknown request", action=action)

    # -- back-off -------------------------------------------------------------------------------

    def _schedule_start(self, name: str, consecutive: int) -> None:
        delay = self.config.backoff_delay(max(1, consecutive))
        record = self.book.record(name)
        record.backoff_delay = delay
        record.restart_due = self._clock() + delay
        self._cancel_timer(name)
        timer = threading.Timer(delay, lambda: self._submit(f"start:{name}", lambda: self._start_after_backoff(name)))
        timer.daemon = True
        self._timers[name] = timer
        timer.start()
        log.info("restart scheduled", process=name, delay_s=round(delay, 3), consecutive_crashes=consecutive)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _start_after_backoff(self, name: str) -> None:
        with self._lock:
            self._timers.pop(name, None)
            record = self.book.record(name)
            if record.held or record.state != "EXITED":
                return
        try:
            self._client().start(name, wait=False)
        except Fault as fault:
            if fault.faultCode not in (Faults.ALREADY_STARTED, Faults.SHUTDOWN_STATE):
                log.error("restart after back-off failed", process=name, fault=fault.faultString)
        except OSError as exc:
            log.error("supervisord unreachable", process=name, error=str(exc))

    # -- slow work (pool threads) ---------------------------------------------------------------

    def _submit(self, key: str, work: Callable[[], None]) -> None:
        """Run `work` on the pool unless work under the same key is still in flight."""
        if self._stopping.is_set():
            return
        with self._lock:
            if key in self._busy:
                return
            self._busy.add(key)

        def run() -> None:
            try:
                work()
            except Exception:
                log.exception("listener task failed", task=key)
            finally:
                with self._lock:
                    self._busy.discard(key)

        try:
            self._pool.submit(run)
        except RuntimeError:  # the pool is shut down: we are stopping
            with self._lock:
                self._busy.discard(key)

    def _intent(self, name: str, reason: str) -> None:
        with self._lock:
            self.book.note_intent(name, reason, self._clock())
            self.book.record(name).restarting = True
            self._save()

    def _operator(self) -> Operator:
        return Operator(self._client(), self.config, intent=self._intent,
                        progress=lambda line: log.info("progress", detail=line))

    @contextlib.contextmanager
    def _restarting(self, names: list[str]) -> Iterator[None]:
        try:
            yield
        finally:
            with self._lock:
                for name in names:
                    self.book.record(name).restarting = False
                self._save()

    def _restart(self, name: str, reason: str) -> None:
        operator = self._operator()
        with self._restarting([name]):
            try:
                operator.restart_one(operator.client.info(name), reason)
            except (ActionError, Fault, OSError) as exc:
                log.error("restart failed", process=name, reason=reason, error=str(exc))
                return
        log.info("restarted", process=name, reason=reason)

    def _restart_request(self, name: str, reason: str) -> None:
        operator = self._operator()
        try:
            targets = operator.client.resolve(name)
        except KeyError:
            log.warning("restart requested for an unknown process", process=name)
            return
        except (Fault, OSError) as exc:
            log.error("supervisord unreachable", error=str(exc))
            return
        if targets[0].group == self.config.api_group and len(targets) > 1:
            self._reload("api", worker=False)
            return
        for target in targets:
            self._restart(target.name, reason)

    def _reload(self, requested_by: str, worker: bool) -> None:
        with self._lock:
            self.book.reload = {"status": ReloadStatus.RUNNING, "requested_by": requested_by,
                                "started_at": self._clock()}
            self._save()
        operator = self._operator()
        done: list[str] = []
        error = None
        try:
            members = [m.name for m in operator.client.group_members(self.config.api_group)]
            with self._restarting(members):
                done = operator.reload(self.config.api_group)
            if worker:
                with self._restarting([self.config.worker_program]):
                    operator.restart_one(operator.client.info(self.config.worker_program), "reload")
                done.append(self.config.worker_program)
        except (ActionError, Fault, OSError) as exc:
            error = str(exc)
            log.error("reload failed", error=error)
        with self._lock:
            self.book.reload.update(status=ReloadStatus.FAILED if error else ReloadStatus.DONE,
                                    finished_at=self._clock(), replaced=done, error=error)
            self._save()

    def _explain_fatal(self, name: str) -> None:
        try:
            tail = self._client().tail_stderr(name)
        except (Fault, OSError):
            tail = ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        with self._lock:
            record = self.book.record(name)
            record.fatal_reason = (f"gave up after {record.start_failures} starts that exited before startsecs"
                                   + (f"; last output: {lines[-1][:300]}" if lines else ""))
            self._save()
        log.error("process given up (FATAL)", process=name, reason=record.fatal_reason)

    def _reconcile(self) -> None:
        """Catch up with what happened while no event told us (listener restarted, buffer overflow)."""
        try:
            processes = self._client().processes()
        except (Fault, OSError):
            return
        with self._lock:
            for process in processes:
                record = self.book.record(process.name)
                if process.state == "RUNNING" and record.starts == 0:
                    record.starts, record.pid, record.last_start = 1, process.pid, process.started_at
                record.state = process.state
                managed = process.group in self.config.managed
                if (process.state == "EXITED" and managed and not record.held
                        and process.name not in self._timers and process.name not in self._busy):
                    self._schedule_start(process.name, max(1, record.consecutive_crashes))
                elif process.state == "STOPPED" and record.restarting and process.name not in self._busy:
                    # The listener died between the stop and the start of a restart of its own.
                    record.restarting = False
                    self._submit(f"start:{process.name}", functools.partial(self._start_stopped, process.name))
            self._save()

    def _start_stopped(self, name: str) -> None:
        with contextlib.suppress(Fault, OSError):
            self._client().start(name, wait=False)

    # -- memory watchdog (its own thread) -------------------------------------------------------

    def _watch_memory(self) -> None:
        client = self._client()
        while not self._stopping.wait(self.config.watchdog_interval):
            try:
                self.check_memory(client)
            except (Fault, OSError) as exc:
                log.debug("watchdog: supervisord unreachable", error=str(exc))
                client = self._client()

    def check_memory(self, client: SupervisorClient) -> list[str]:
        """One round of the watchdog; returns the processes it decided to restart."""
        stats = procfs.all_stats()
        restarted = []
        for process in client.processes():
            limit = self.config.memory_limit(process.group)
            if limit is None or process.state != "RUNNING" or not process.pid:
                continue
            limit_bytes, with_children = limit
            members = procfs.tree(process.pid, stats) if with_children else (
                [stats[process.pid]] if process.pid in stats else [])
            rss = sum(member.rss_bytes for member in members)
            if rss <= limit_bytes:
                continue
            with self._lock:
                if process.name in self._busy:
                    continue
                self.book.record(process.name).memory_restart_rss = rss
            log.warning("memory limit exceeded: restarting gracefully", process=process.name, rss=rss,
                        limit=limit_bytes, processes_counted=len(members))
            self._submit(process.name, functools.partial(self._restart, process.name, "memory"))
            restarted.append(process.name)
        return restarted

    def _save(self) -> None:
        try:
            write_book(self.book_path, self.book)
        except OSError as exc:
            log.error("cannot write the process book", path=str(self.book_path), error=str(exc))


class EventChannel:
    """supervisord's event listener protocol on stdin/stdout."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self._in = stdin
        self._out = stdout

    def ready(self) -> None:
        self._out.write(b"READY\n")
        self._out.flush()

    def ok(self) -> None:
        self._out.write(b"RESULT 2\nOK")
        self._out.flush()

    def wait(self, timeout: float) -> tuple[dict[str, str], str] | None:
        """The next event, or None after `timeout` seconds without one; EOFError when supervisord left."""
        readable, _, _ = select.select([self._in], [], [], timeout)
        if not readable:
            return None
        line = self._in.readline()
        if not line:
            raise EOFError
        header = parse_tokens(line.decode())
        payload = self._in.read(int(header.get("len", "0")))
        return header, payload.decode(errors="replace")


def run(config: SupervisionSettings, channel: EventChannel, supervision: Supervision, stop: threading.Event) -> int:
    supervision.open()
    try:
        channel.ready()
        while not stop.is_set():
            try:
                event = channel.wait(0.5)
            except EOFError:
                break
            if event is None:
                continue
            try:
                supervision.on_event(*event)
            except Exception:
                log.exception("event handling failed", event=event[0].get("eventname"))
            channel.ok()
            channel.ready()
    finally:
        supervision.close()
    log.info("listener stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    """`tp-events` (supervisord runs it with no arguments; `--version` answers and exits)."""
    from ..logs import configure_logging

    parser = argparse.ArgumentParser(prog="tp-events", description="supervisord's event listener for the platform "
                                     "(run by supervisord.conf's [eventlistener:tp-events], not by hand).")
    add_version_option(parser).parse_args(argv)
    # stdout belongs to the protocol: keep it aside, and send everything else printed to stderr.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    configure_logging(level=os.environ.get("TP_LOG_LEVEL", "info"), fmt=os.environ.get("TP_LOG_FORMAT", "auto"),
                      process="tp-events")
    try:
        config = SupervisionSettings.from_env()
    except ConfigError as exc:
        print(f"tp-events: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()  # only record intent

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    supervision = Supervision(config, lambda: SupervisorClient(config.supervisor_socket))
    sys.exit(run(config, EventChannel(sys.stdin.buffer, protocol_out), supervision, stop))


if __name__ == "__main__":
    main()

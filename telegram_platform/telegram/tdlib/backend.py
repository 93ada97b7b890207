"""All of the process's TDLib clients (`TdlibBackend`), fed by the process's one receive thread.

TDLib's JSON interface allows exactly one `td_receive` caller per process (two abort the process), so a
`TdlibBackend` owns the only receive thread and only one backend may exist per process at a time
(`BackendAlreadyRunning` otherwise; `aclose` releases the slot). The thread batches what it receives
and hands each batch to the event loop with one `call_soon_threadsafe`; there each event goes, by its
`@client_id`, to its `TdlibSession`. Requests are matched to answers by `@extra`.

TDLib's own log: `log_verbosity` applies as configured. Without `log_file`, a verbosity above 1 would
flood stderr, so the log then goes to `<data_dir>/tdlib.log` (10 MB, rotated by TDLib) instead of
silently dropping the detail the operator asked for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog
import tdjson

from telegram_platform.logs import detached_context
from telegram_platform.settings import ConfigError, TdlibSettings
from telegram_platform.telegram.base import (
    STALL_THRESHOLD_SECONDS,
    BackendCounters,
    LagWindow,
    PermanentError,
    SessionConfig,
    TransientError,
    Update,
    UpdateSink,
)
from telegram_platform.telegram.keys import account_database_dir
from telegram_platform.telegram.tdlib.peers import PeerCache
from telegram_platform.telegram.tdlib.protocol import HANDLED_UPDATES, Event, encode, event_type, execute
from telegram_platform.telegram.tdlib.session import TdlibSession
from telegram_platform.version import tdlib_version

log = structlog.get_logger(__name__)

LOG_FILE_MAX_BYTES: Final = 10 * 1024 * 1024
# How long one td_receive blocks: bounds how long stopping the thread takes.
RECEIVE_TIMEOUT_SECONDS: Final = 0.5
# Clients opening their database at once (see TdlibSession.start).
MAX_CONCURRENT_OPENS: Final = 32
# Events handed to the loop in one call_soon_threadsafe, at most.
MAX_BATCH: Final = 1000
# Back-pressure: past this many updates waiting for the sink, the receive thread stops taking events
# (TDLib buffers them meanwhile) until the sink catches up.
MAX_UPDATES_QUEUED: Final = 10_000
BACKLOG_PAUSE_SECONDS: Final = 0.05


class BackendAlreadyRunning(RuntimeError):
    """A second TdlibBackend in one process would be a second td_receive caller, which aborts TDLib."""


class TdlibBackend:
    """All TDLib clients of this process. Only one may exist per process (see module docstring)."""

    name = "tdlib"
    # TDLib chooses each message's random_id itself: a new send from the platform is a new message.
    sends_random_id = False
    # The binlog holds the authorization key, the update state, the options and the sends still
    # pending; db.sqlite (chats, users, messages) and files/ are caches TDLib rebuilds from Telegram
    # when they are missing (docs/scaling.md "Portable TDLib state"). td_test.binlog with the test DC.
    state_files: tuple[str, ...] = ("td.binlog", "td_test.binlog")
    # Process-wide by nature: TDLib's receive queue is process-wide. The backend owns the thread; this
    # only records which backend currently holds the one td_receive slot.
    _holder: ClassVar[TdlibBackend | None] = None
    _holder_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, settings: TdlibSettings, *, on_update: UpdateSink,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if settings.api_id is None or settings.api_hash is None:
            raise ConfigError("TDLIB_API_ID",
                              "TDLIB_API_ID and TDLIB_API_HASH are needed for the TDLib backend")
        with TdlibBackend._holder_lock:
            if TdlibBackend._holder is not None:
                raise BackendAlreadyRunning(
                    "a TdlibBackend already runs in this process: TDLib allows one td_receive loop per "
                    "process, so share that backend (or aclose it first)")
            TdlibBackend._holder = self
        try:
            self.log_file = _configure_tdlib_log(settings)
        except BaseException:
            self._release()
            raise
        self.settings = settings
        self.version = _tdlib_version()
        self._on_update = on_update
        self._loop = loop
        self._pid = os.getpid()
        self._clients: dict[int, TdlibSession] = {}
        self._by_account: dict[int, TdlibSession] = {}
        self._extra = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lag = LagWindow()
        self._last_stall_warning = 0.0
        self._updates: asyncio.Queue[Update] | None = None
        self._peer_caches: dict[int, PeerCache] = {}
        self.counters = BackendCounters()
        self._deliverer: asyncio.Task[None] | None = None
        self._closing = False
        self.opening = asyncio.Semaphore(MAX_CONCURRENT_OPENS)

    @property
    def request_timeout(self) -> float:
        return self.settings.request_timeout

    def timeout(self, within: float | None) -> float:
        return self.settings.request_timeout if within is None else max(0.0, within)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def database_dir(self, account_id: int) -> Path:
        return account_database_dir(self.settings.data_dir, account_id)

    async def open_session(self, config: SessionConfig) -> TdlibSession:
        """Create (not start) the account's client, registered for dispatch before anything is sent."""
        if os.getpid() != self._pid:
            raise RuntimeError("TDLib cannot be used in a forked child; create the backend after forking")
        if self._closing:
            raise TransientError(503, "the TDLib backend is closing")
        if config.account_id in self._by_account:
            raise PermanentError(409, f"account {config.account_id} already has a session in this process")
        if len(self._clients) >= self.settings.max_clients:
            raise TransientError(503, f"this process hosts its max of {self.settings.max_clients} clients")
        self._ensure_running()
        client_id = tdjson.td_create_client_id()
        session = TdlibSession(self, client_id, config)
        self._clients[client_id] = session
        self._by_account[config.account_id] = session
        self.counters.sessions_total += 1
        return session

    def session(self, account_id: int) -> TdlibSession | None:
        return self._by_account.get(account_id)

    def peer_cache(self, account_id: int) -> PeerCache:
        """The account's resolved peers; outlives its sessions in this process (see PeerCache)."""
        cache = self._peer_caches.get(account_id)
        if cache is None:
            cache = self._peer_caches[account_id] = PeerCache()
        return cache

    def forget_peers(self, account_id: int) -> None:
        self._peer_caches.pop(account_id, None)

    def stats(self) -> dict[str, Any]:
        """Clients by state, TDLib version, receive-loop lag (max over the last ~60 s), counters."""
        sessions = list(self._clients.values())
        lag = self._lag.value()
        pending = sum(s.pending_requests for s in sessions)
        queued = self._updates.qsize() if self._updates is not None else 0
        return {
            "backend": self.name,
            "version": self.version,
            "client_count": len(sessions),
            "max_clients": self.settings.max_clients,
            "clients": dict(Counter(str(s.auth_state) for s in sessions)),
            "connection": dict(Counter(str(s.connection_state) for s in sessions)),
            **self.counters.as_dict(),
            "pending_requests": pending,
            "updates_queued": queued,
            "queue_depth": pending + queued,
            "peers_cached": sum(len(c) for c in self._peer_caches.values()),
            "receive_loop_lag_seconds": round(lag, 6),
            "stalled": lag > STALL_THRESHOLD_SECONDS,
            "receive_thread_alive": self._thread is not None and self._thread.is_alive(),
        }

    async def aclose(self, deadline: float) -> None:
        """Close every client concurrently by `deadline` (a time.monotonic() value), then stop the thread.

        The process's td_receive slot is released only once the thread has stopped.
        """
        self._closing = True
        sessions = list(self._clients.values())
        results = await asyncio.gather(*(s.close_until(deadline) for s in sessions), return_exceptions=True)
        unclosed = sum(1 for r in results if isinstance(r, BaseException))
        if unclosed:
            log.error("tdlib.clients_not_closed", count=unclosed)
        thread = self._thread
        if thread is not None:
            self._stop.set()
            join_within = max(deadline - time.monotonic(), 2 * RECEIVE_TIMEOUT_SECONDS)
            await asyncio.to_thread(thread.join, join_within)
            if thread.is_alive():
                log.error("tdlib.receive_thread_still_running")
                return
            self._thread = None
        if self._updates is not None and self._deliverer is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._updates.join()
            except TimeoutError:
                log.warning("tdlib.updates_dropped", count=self._updates.qsize())
            self._deliverer.cancel()
            await asyncio.gather(self._deliverer, return_exceptions=True)
            self._deliverer = None
        self._release()

    # -- used by sessions ------------------------------------------------------------------------------

    def next_extra(self) -> int:
        return next(self._extra)

    def send(self, client_id: int, query: Mapping[str, Any]) -> None:
        tdjson.td_send(client_id, encode(query))

    def emit(self, update: Update) -> None:
        if self._updates is not None:
            self._updates.put_nowait(update)

    def unregister(self, session: TdlibSession) -> None:
        if self._clients.get(session.client_id) is session:
            del self._clients[session.client_id]
        if self._by_account.get(session.account_id) is session:
            del self._by_account[session.account_id]

    # -- the receive thread and dispatch -------------------------------------------------------------

    def _ensure_running(self) -> None:
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError("TdlibBackend used from another event loop than its own")
        if self._updates is None:
            self._updates = asyncio.Queue()
            self._deliverer = running.create_task(self._deliver_updates(self._updates), context=detached_context())
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._receive_loop, args=(running,),
                                            name="tdlib-receive", daemon=True)
            self._thread.start()

    def _receive_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The process's only td_receive caller: batch events, hand each batch to the loop once."""
        while not self._stop.is_set():
            if self._backlogged():
                time.sleep(BACKLOG_PAUSE_SECONDS)  # back-pressure: TDLib keeps the events meanwhile
                continue
            try:
                raw = tdjson.td_receive(RECEIVE_TIMEOUT_SECONDS)
                if raw is None:
                    continue
                received_at = time.monotonic()
                events: list[Event] = []
                for _ in range(MAX_BATCH):
                    event = self._decode(raw)
                    if event is not None:
                        events.append(event)
                    raw = tdjson.td_receive(0.0)
                    if raw is None:
                        break
                else:
                    if raw is not None and (event := self._decode(raw)) is not None:
                        events.append(event)
                if events:
                    loop.call_soon_threadsafe(self._dispatch, received_at, events)
            except RuntimeError:  # the loop is closed: nobody is left to serve
                log.exception("tdlib.receive_loop_stopped")
                return
            except Exception:  # never lose the only receive thread to one bad event
                log.exception("tdlib.receive_loop_error")

    def _backlogged(self) -> bool:
        # Read from the receive thread: qsize() is a len() of a deque, atomic under the GIL.
        updates = self._updates
        return updates is not None and updates.qsize() >= MAX_UPDATES_QUEUED

    @staticmethod
    def _decode(raw: bytes) -> Event | None:
        kind = event_type(raw)
        if kind is not None and kind.startswith("update") and kind not in HANDLED_UPDATES:
            return None
        try:
            event: Event = json.loads(raw)
        except ValueError:
            log.error("tdlib.bad_event", size=len(raw))
            return None
        return event

    def _dispatch(self, received_at: float, events: list[Event]) -> None:
        lag = time.monotonic() - received_at
        self._lag.record(lag)
        if lag > STALL_THRESHOLD_SECONDS and received_at - self._last_stall_warning > 10.0:
            self._last_stall_warning = received_at
            log.warning("tdlib.receive_loop_stalled", lag_seconds=round(lag, 3))
        for event in events:
            session = self._clients.get(event.get("@client_id", -1))
            if session is None:
                continue
            try:
                session.handle(event)
            except Exception:
                log.exception("tdlib.event_failed", type=event.get("@type"))

    async def _deliver_updates(self, queue: asyncio.Queue[Update]) -> None:
        """Feed the sink one update at a time, in order; a failing sink loses that update only."""
        while True:
            update = await queue.get()
            try:
                await self._on_update(update)
            except Exception:
                log.exception("tdlib.update_sink_failed", update=type(update).__name__)
            finally:
                queue.task_done()

    def _release(self) -> None:
        with TdlibBackend._holder_lock:
            if TdlibBackend._holder is self:
                TdlibBackend._holder = None


def _configure_tdlib_log(settings: TdlibSettings) -> Path | None:
    """Point TDLib's log at a file when one is set or the verbosity would flood stderr."""
    log_file = settings.log_file
    if log_file is None and settings.log_verbosity > 1:
        log_file = settings.data_dir / "tdlib.log"
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError("TDLIB_LOG_FILE", f"cannot create the log directory: {exc}") from None
        stream: dict[str, Any] = {"@type": "logStreamFile", "path": str(log_file),
                                  "max_file_size": LOG_FILE_MAX_BYTES, "redirect_stderr": False}
    else:
        stream = {"@type": "logStreamDefault"}
    result = execute({"@type": "setLogStream", "log_stream": stream})
    if result is None or result.get("@type") == "error":
        problem = (result or {}).get("message", "no answer")
        raise ConfigError("TDLIB_LOG_FILE", f"TDLib cannot write its log there: {problem}")
    execute({"@type": "setLogVerbosityLevel", "new_verbosity_level": settings.log_verbosity})
    return log_file


def _tdlib_version() -> str:
    """TDLib's own version (works offline through td_execute); else the one the tdjson package
    names (version.tdlib_version, what processes that never load TDLib report)."""
    try:
        result = execute({"@type": "getOption", "name": "version"})
    except (ValueError, RuntimeError):
        return tdlib_version()
    if result is not None and result.get("@type") == "optionValueString":
        return str(result["value"])
    return tdlib_version()

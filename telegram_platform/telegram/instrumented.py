"""The Telegram layer, instrumented from outside (no edits in the backends): each session call timed,
flood waits and confirmed sends counted, and the backends' own counters turned into the tdlib_*
metrics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from ..metrics.definitions import Metrics
from .base import (
    AuthState,
    ConnectionState,
    PeerFlood,
    RateLimited,
    SentMessage,
    Session,
    TelegramBackend,
    TelegramError,
)


class InstrumentedSession:
    """Times each call into a session and counts flood waits and confirmed sends; counts the call as
    a Telegram request too when the backend keeps no counters of its own. Behaves exactly like the
    session it wraps (arguments pass through untouched, so the interface may grow)."""

    def __init__(self, inner: Session, metrics: Metrics, *, count_requests: bool) -> None:
        self._inner = inner
        self._metrics = metrics
        self._count_requests = count_requests

    @property
    def account_id(self) -> int:
        return self._inner.account_id

    @property
    def auth_state(self) -> AuthState:
        return self._inner.auth_state

    @property
    def connection_state(self) -> ConnectionState:
        return self._inner.connection_state

    @contextlib.contextmanager
    def _call(self, method: str) -> Iterator[None]:
        m = self._metrics
        if self._count_requests:
            m.tdlib_requests.inc()
        started = time.perf_counter()
        try:
            yield
        except TelegramError as exc:
            if self._count_requests:
                m.tdlib_errors.labels(exc.error_class).inc()
            if isinstance(exc, RateLimited):
                m.flood_waits.labels("flood_wait").inc()
                m.flood_wait_seconds.inc(exc.retry_after)
            elif isinstance(exc, PeerFlood):
                m.flood_waits.labels("peer_flood").inc()
            raise
        finally:
            m.telegram_call_duration.labels(method).observe(time.perf_counter() - started)

    async def start(self, *args: Any, **kwargs: Any) -> AuthState:
        with self._call("start"):
            return await self._inner.start(*args, **kwargs)

    async def submit_code(self, *args: Any, **kwargs: Any) -> AuthState:
        with self._call("submit_code"):
            return await self._inner.submit_code(*args, **kwargs)

    async def submit_password(self, *args: Any, **kwargs: Any) -> AuthState:
        with self._call("submit_password"):
            return await self._inner.submit_password(*args, **kwargs)

    async def register(self, *args: Any, **kwargs: Any) -> AuthState:
        with self._call("register"):
            return await self._inner.register(*args, **kwargs)

    async def send(self, *args: Any, **kwargs: Any) -> SentMessage:
        with self._call("send"):
            sent = await self._inner.send(*args, **kwargs)
        self._metrics.messages_sent.inc()
        return sent

    async def download_file(self, *args: Any, **kwargs: Any) -> Path:
        with self._call("download_file"):
            return await self._inner.download_file(*args, **kwargs)

    async def forward(self, *args: Any, **kwargs: Any) -> SentMessage:
        with self._call("forward"):
            return await self._inner.forward(*args, **kwargs)

    async def edit(self, *args: Any, **kwargs: Any) -> None:
        with self._call("edit"):
            await self._inner.edit(*args, **kwargs)

    async def delete(self, *args: Any, **kwargs: Any) -> None:
        with self._call("delete"):
            await self._inner.delete(*args, **kwargs)

    async def view(self, *args: Any, **kwargs: Any) -> None:
        with self._call("view"):
            await self._inner.view(*args, **kwargs)

    async def log_out(self, *args: Any, **kwargs: Any) -> None:
        with self._call("log_out"):
            await self._inner.log_out(*args, **kwargs)

    async def close(self, *args: Any, **kwargs: Any) -> None:
        with self._call("close"):
            await self._inner.close(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras pass through uninstrumented.
        return getattr(self._inner, name)


class InstrumentedBackend:
    """A `TelegramBackend` whose sessions are instrumented, and whose own monotonic counters
    (`sessions_total`, `requests_total`, `errors_total` in `stats()`) become the seed's tdlib_*
    counters: each `stats()` call (the host publishes every 5 s, and once more at close) adds what
    grew since the last one. Everything else is delegated."""

    def __init__(self, inner: TelegramBackend, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self.sends_random_id = inner.sends_random_id
        self.state_files = inner.state_files
        self._metrics = metrics
        self._seen: dict[str, float] = {}
        self._backend_counts = "requests_total" in inner.stats()

    async def open_session(self, *args: Any, **kwargs: Any) -> Session:
        session = await self.inner.open_session(*args, **kwargs)
        if not self._backend_counts:
            self._metrics.tdlib_sessions.inc()
        return InstrumentedSession(session, self._metrics, count_requests=not self._backend_counts)

    def database_dir(self, account_id: int) -> Path:
        return self.inner.database_dir(account_id)

    def stats(self) -> dict[str, Any]:
        stats = self.inner.stats()
        if self._backend_counts:
            self._add("sessions", stats.get("sessions_total", 0), self._metrics.tdlib_sessions)
            self._add("requests", stats.get("requests_total", 0), self._metrics.tdlib_requests)
            for error_class, count in dict(stats.get("errors_total", {})).items():
                self._add(f"errors:{error_class}", count, self._metrics.tdlib_errors.labels(str(error_class)))
        return stats

    def _add(self, key: str, total: Any, counter: Counter) -> None:
        value = float(total)
        grown = value - self._seen.get(key, 0.0)
        if grown > 0:
            counter.inc(grown)
        self._seen[key] = value

    async def aclose(self, deadline: float) -> None:
        try:
            await self.inner.aclose(deadline)
        finally:
            self.stats()  # the last requests and errors reach the counters before the process exits

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def instrument_backend(backend: TelegramBackend, metrics: Metrics) -> TelegramBackend:
    return InstrumentedBackend(backend, metrics)

"""Every Prometheus metric the platform exports, defined here and nowhere else.

Two kinds of metric, one scrape:

* Recorded in the processes that see the events (API members: HTTP; worker children: jobs, sends,
  Telegram calls; the worker pool: child restarts). Each process builds ONE `Metrics` with
  `create_metrics(directory)` at start. Under supervisord `PROMETHEUS_MULTIPROC_DIR` is set for
  every process (scripts/run exports it and wipes the directory once, before supervisord starts),
  so prometheus_client writes each process's values to mmap files there, and any API member sums
  them all at scrape time with a fresh `CollectorRegistry` + `MultiProcessCollector`.
* Read at scrape time, where a reading is more accurate than a running count: queue depths and the
  oldest job's age (Redis), Telegram clients (the hosts' published stats), accounts paused
  (PostgreSQL), processes, memory and uptime (supervisord and /proc). See `collect_platform`.

Rules kept here (see shared/notes/anchors.md): gauges recorded in processes use a `live*` mode, so
a dead process's gauges vanish once `mark_process_dead(pid)` runs (the pool calls it for its
children; a scrape sweeps every other exit); counters and histograms of dead processes stay, so
totals never go backwards, and are folded into one archive per type (ops/metric_files.py). No
per-job process ever records a metric. Labels are bounded: route templates, queue names, job
kinds, error classes, program names; never an account id, a phone number or a user.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import glob
import json
import math
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..telegram.base import (
    AuthState,
    ConnectionState,
    PeerFlood,
    RateLimited,
    SentMessage,
    Session,
    TelegramBackend,
    TelegramError,
)
from ..worker.spool import count_waiting
from . import metric_files

if TYPE_CHECKING:  # the worker pool imports this module: keep its imports light
    import asyncpg
    import redis.asyncio as aioredis

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets (seconds) for HTTP requests, jobs and Telegram calls: 5 ms to 60 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SCRAPE_READ_TIMEOUT = 2.0
# telegram.base's error classes (listed here so that the label set is fixed even before an error).
ERROR_CLASSES = ("transient", "rate_limited", "permanent")


class Metrics:
    """The metrics one process records. Build it once per process with `create_metrics`.

    Two `Metrics` in one multiprocess-mode process would overwrite each other's mmap entries, so
    components take this object as a parameter instead of building their own.
    """

    def __init__(self, registry: CollectorRegistry | None, directory: Path | None) -> None:
        # `registry` is None in multiprocess mode: values live in files, collected per scrape.
        self.registry = registry
        self.directory = directory
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = registry

        # -- HTTP (API members) --
        self.http_requests = Counter(
            "tp_http_requests", "HTTP requests answered, by route template, method and status.",
            ("method", "route", "status"), registry=r)
        self.http_duration = Histogram(
            "tp_http_request_duration_seconds", "Time to answer an HTTP request, by route template.",
            ("method", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge(
            "tp_http_requests_in_flight", "HTTP requests being answered now (WebSockets excluded).",
            registry=r, multiprocess_mode="livesum")
        self.websocket_connections = Gauge(
            "tp_websocket_connections", "WebSocket connections open now.",
            registry=r, multiprocess_mode="livesum")

        # -- jobs (worker children) --
        self.jobs_processed = Counter(
            "tp_jobs_processed", "Jobs that completed successfully, by queue and kind.",
            ("queue", "kind"), registry=r)
        self.jobs_failed = Counter(
            "tp_jobs_failed", "Jobs that failed (moved to the failed registry), by queue and kind.",
            ("queue", "kind"), registry=r)
        self.jobs_retried = Counter(
            "tp_jobs_retried", "Jobs rescheduled to run again later (back-off, flood wait).",
            ("queue", "kind"), registry=r)
        self.job_duration = Histogram(
            "tp_job_duration_seconds", "Time a job ran, whatever its outcome, by queue and kind.",
            ("queue", "kind"), buckets=LATENCY_BUCKETS, registry=r)

        # -- messages (worker children) --
        self.messages_sent = Counter(
            "tp_messages_sent", "Messages Telegram confirmed as sent.", registry=r)
        self.messages_failed = Counter(
            "tp_messages_failed", "Messages given up on, by error class.", ("error_class",), registry=r)
        self.flood_waits = Counter(
            "tp_flood_waits", "Flood limits hit: 429 retry-after (flood_wait) or PEER_FLOOD (peer_flood).",
            ("kind",), registry=r)
        self.flood_wait_seconds = Counter(
            "tp_flood_wait_seconds", "Seconds of waiting Telegram imposed through 429 retry-after.", registry=r)

        # -- Telegram layer (the seed's tdlib_* names; recorded in the Telegram host) --
        self.tdlib_sessions = Counter(
            "tdlib_sessions", "Telegram client sessions opened by the hosts.", registry=r)
        self.tdlib_requests = Counter(
            "tdlib_requests", "Requests made to Telegram through TDLib (or the emulator).", registry=r)
        self.tdlib_errors = Counter(
            "tdlib_errors", "Telegram requests that failed, by error class.", ("error_class",), registry=r)
        for error_class in ERROR_CLASSES:
            self.tdlib_errors.labels(error_class)  # present at 0 from the start
        self.telegram_call_duration = Histogram(
            "tp_telegram_call_duration_seconds", "Time an account operation took in the Telegram layer "
            "(start, submit_code, send_text, ...), by operation.", ("method",), buckets=LATENCY_BUCKETS,
            registry=r)
        # One live client per account, kept in outages (worker/account_sessions.py).
        self.lease_closures = Counter(
            "tp_lease_session_closures", "Account sessions a worker closed to keep one live client per account: "
            "its lease held by another host (lost) or not confirmable before it could expire (unconfirmed).",
            ("reason",), registry=r)
        for reason in ("lost", "unconfirmed"):
            self.lease_closures.labels(reason)  # present at 0 from the start
        self.orphans_opened = Counter(
            "tp_orphaned_accounts_opened", "Logged-in accounts nobody hosted, opened by a worker's orphan scan.",
            registry=r)

        # -- processes (the worker pool) --
        self.worker_child_restarts = Counter(
            "tp_worker_child_restarts", "Worker children restarted by the pool, by cause (crash, exit).",
            ("cause",), registry=r)

    # -- hooks the instrumented code calls (one line each at the call site) ----------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: `.labels()` validates and locks on every call, which
        is most of a hot path's metric cost. Label sets here are bounded (route templates, statuses,
        queues, job kinds), so is the cache."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def http_route(self, method: str, route: str, statuses: list[int], nanoseconds: list[int]) -> None:
        """One route's requests since the last write (api/journal.py): their statuses, and the
        durations of those timed. One counter write per status and one per histogram bucket
        touched, instead of four locked mmap writes per request."""
        for status, count in collections.Counter(statuses).items():
            self._child(self.http_requests, method, route, str(status)).inc(count)
        if nanoseconds:
            observe_all(self._child(self.http_duration, method, route), nanoseconds, _LATENCY_BOUNDS_NS, 1e9)

    def job_finished(self, queue: str, kind: str, outcome: Literal["ok", "failed", "retried"],
                     seconds: float) -> None:
        counter = {"ok": self.jobs_processed, "failed": self.jobs_failed, "retried": self.jobs_retried}[outcome]
        self._child(counter, queue, kind).inc()
        self._child(self.job_duration, queue, kind).observe(seconds)

    def message_failed(self, error_class: str) -> None:
        self.messages_failed.labels(error_class).inc()

    def worker_child_exited(self, pid: int, exit_code: int) -> None:
        """The pool saw a child exit: its live gauges go, and the restart to come is counted."""
        self.worker_child_restarts.labels("crash" if exit_code != 0 else "exit").inc()
        if self.directory is not None:
            metric_files.mark_process_dead(pid, self.directory)


def observe_all(histogram: Any, values: list[Any], bounds: Sequence[float] | None = None,
                per_unit: float = 1.0) -> None:
    """`histogram.observe(v / per_unit)` for every value of a non-empty list, as one write per
    bucket touched and one to the sum. May sort `values` in place. `bounds` are the histogram's
    bucket bounds in the values' own unit (`nanosecond_bounds`): integers compared as they are,
    with no division per value.

    Reads the labelled Histogram's `_upper_bounds`, `_buckets` and `_sum`, which prometheus_client
    has kept since 0.4; tests/ops/test_metrics.py checks the result against `observe` itself, so a
    change there fails a test instead of skewing a histogram."""
    bounds = bounds or histogram._upper_bounds
    if max(values) <= bounds[0]:
        # All in the first bucket, as a fast API's requests mostly are: no sort (which cost ~0.3k
        # instructions per request in benchmarks/api_instructions.py).
        histogram._buckets[0].inc(len(values))
        histogram._sum.inc(_total(values) / per_unit)
        return
    # `observe` puts a value in the first bucket whose bound is >= it: sorted, the values up to a
    # bound are bisect_right's count, and a bucket holds the difference from the previous bound's.
    # A C-level sort and a bisect per bound cost less than a bisect per value.
    values.sort()
    counted, total = 0, len(values)
    for bucket, bound in zip(histogram._buckets, bounds, strict=True):
        upto = bisect_right(values, bound)
        if upto > counted:
            bucket.inc(upto - counted)
            if upto == total:
                break
            counted = upto
    histogram._sum.inc(_total(values) / per_unit)


def _total(values: list[Any]) -> float:
    """Integers sum exactly; floats as exactly as fsum can."""
    return sum(values) if isinstance(values[0], int) else math.fsum(values)


def nanosecond_bounds(seconds: Sequence[float]) -> tuple[float, ...]:
    """Bucket bounds in seconds as the largest whole number of nanoseconds `n` for which
    `n / 1e9 <= bound`, the comparison `observe` makes: a duration kept in nanoseconds lands in
    the bucket it would have landed in as seconds. The +Inf bound stays infinite."""
    exact: list[float] = []
    for bound in seconds:
        if math.isinf(bound):
            break
        n = math.floor(bound * 1e9)
        while (n + 1) / 1e9 <= bound:
            n += 1
        while n / 1e9 > bound:
            n -= 1
        exact.append(n)
    return (*exact, math.inf)


_LATENCY_BOUNDS_NS = nanosecond_bounds(LATENCY_BUCKETS)


def create_metrics(directory: Path | None) -> Metrics:
    """The process's one `Metrics`: in multiprocess mode when `directory` (PROMETHEUS_MULTIPROC_DIR)
    is set, else on a fresh in-process registry (tests, a single `tp-api` without supervisord)."""
    if directory is None:
        return Metrics(CollectorRegistry(auto_describe=True), None)
    if Path(os.environ.get(MULTIPROC_ENV) or "/nonexistent").absolute() != directory.absolute():
        # prometheus_client picks its mode from the environment when imported; a mismatch would
        # silently keep this process's numbers out of every scrape.
        raise RuntimeError(f"{MULTIPROC_ENV} must be set in this process's environment to {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    metric_files.name_files_by_process_identity()
    return Metrics(None, directory)


# --------------------------------------------------------------------------------------------
# The Telegram layer, instrumented from outside (no edits in the backends)


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

    async def send_text(self, *args: Any, **kwargs: Any) -> SentMessage:
        with self._call("send_text"):
            sent = await self._inner.send_text(*args, **kwargs)
        self._metrics.messages_sent.inc()
        return sent

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


# --------------------------------------------------------------------------------------------
# Scrape-time readings


@dataclass(frozen=True, slots=True)
class ScrapeSources:
    """What an API member reads at scrape time. Any of them may be missing (then it is skipped)."""

    redis: aioredis.Redis | None
    db: asyncpg.Pool | None
    supervisor_socket: Path | None
    # Restart counts kept by the operations event listener: {(program, cause): count}.
    restart_counts: Callable[[], Mapping[tuple[str, str], int]] | None = None
    # Where this machine's worker children spool incoming messages (worker/spool.py).
    spool_dir: Path | None = None


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


async def collect_platform(sources: ScrapeSources) -> list[Metric]:
    """Read queues, Telegram hosts, accounts, health and processes; each reader reports its own
    success in `tp_metrics_collector_success`, so one slow or broken part hides nothing else."""
    families: list[Metric] = []
    success = _gauge("tp_metrics_collector_success",
                     "1 when this scrape-time reader worked, 0 when it failed or timed out.", ["collector"])
    readers: list[tuple[str, Any]] = []
    if sources.redis is not None:
        readers.append(("redis", _read_redis(sources.redis)))
    if sources.db is not None:
        readers.append(("database", _read_database(sources.db)))
    if sources.supervisor_socket is not None:
        readers.append(("supervisor", asyncio.to_thread(
            _read_processes, sources.supervisor_socket, sources.restart_counts)))
    if sources.spool_dir is not None:
        readers.append(("spool", asyncio.to_thread(_read_spool, sources.spool_dir)))
    results = await asyncio.gather(
        *(asyncio.wait_for(reader, SCRAPE_READ_TIMEOUT) for _, reader in readers), return_exceptions=True)
    up: dict[str, bool] = {}
    for (name, _), result in zip(readers, results, strict=True):
        ok = not isinstance(result, BaseException)
        success.add_metric([name], 1.0 if ok else 0.0)
        up[name] = ok
        if ok:
            assert isinstance(result, list)
            families.extend(result)
    families.append(success)
    health = _gauge("tp_health_ok", "1 when /api/health/detailed would say ok (database, Redis and a "
                    "live worker), else 0.")
    workers = next((f for f in families if f.name == "tp_queue_workers"), None)
    live_workers = workers.samples[0].value if workers is not None and workers.samples else 0.0
    db_up = next((f for f in families if f.name == "tp_database_up"), None)
    db_ok = bool(db_up is not None and db_up.samples and db_up.samples[0].value == 1.0)
    health.add_metric([], 1.0 if (up.get("redis") and db_ok and live_workers > 0) else 0.0)
    families.append(health)
    return families


async def _read_redis(client: aioredis.Redis) -> list[Metric]:
    # Imported here: the queue package imports this module's users, not the other way round.
    from ..events import EVENTS_LOG, parse_id
    from ..queue.consumer import WORKER_KEY_PREFIX
    from ..queue.jobs import JOB_PREFIX, active_key, failed_key, queue_key, scheduled_key
    from ..settings import QUEUE_NAMES
    from ..worker.webhooks import CURSOR_KEY
    from .status import TDLIB_STATS_PREFIX

    depth = _gauge("tp_queue_depth", "Jobs waiting in the queue.", ["queue"])
    started = _gauge("tp_queue_started_jobs", "Jobs taken by a worker and not finished yet.", ["queue"])
    scheduled = _gauge("tp_queue_scheduled_jobs", "Jobs scheduled to run later (retries, flood waits, "
                       "scheduled sends).", ["queue"])
    failed = _gauge("tp_queue_failed_jobs", "Jobs in the failed registry (kept 7 days).", ["queue"])
    oldest = _gauge("tp_queue_oldest_job_age_seconds", "Age of the job at the head of the queue "
                    "(0 when empty).", ["queue"])
    async with client.pipeline(transaction=False) as pipe:
        for queue in QUEUE_NAMES:
            pipe.llen(queue_key(queue))
            pipe.zcard(scheduled_key(queue))
            pipe.zcard(failed_key(queue))
            pipe.lindex(queue_key(queue), 0)
        counts = await pipe.execute()
    heads: dict[str, str] = {}
    for i, queue in enumerate(QUEUE_NAMES):
        depth.add_metric([queue], counts[i * 4])
        scheduled.add_metric([queue], counts[i * 4 + 1])
        failed.add_metric([queue], counts[i * 4 + 2])
        head = counts[i * 4 + 3]
        if head is not None:
            heads[queue] = head.decode() if isinstance(head, bytes) else str(head)
    now = time.time()
    enqueued = await asyncio.gather(*(client.hget(JOB_PREFIX + jid, "enqueued_at") for jid in heads.values()))
    ages = {queue: _age(raw, now) for queue, raw in zip(heads, enqueued, strict=True)}
    for queue in QUEUE_NAMES:
        oldest.add_metric([queue], ages.get(queue, 0.0))
    in_hand = dict.fromkeys(QUEUE_NAMES, 0)
    for queue in QUEUE_NAMES:
        keys = [key async for key in client.scan_iter(match=active_key(queue, "*"), count=200)]
        if keys:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                in_hand[queue] = sum(await pipe.execute())
    for queue, count in in_hand.items():
        started.add_metric([queue], count)
    workers = _gauge("tp_queue_workers", "Worker children alive (heartbeat in the last 10 s).")
    workers.add_metric([], float(len([k async for k in client.scan_iter(match=WORKER_KEY_PREFIX + "*",
                                                                          count=100)])))

    stat_keys = [key async for key in client.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=100)]
    hosts = [json.loads(v) for v in (await client.mget(stat_keys) if stat_keys else []) if v]
    active = _gauge("tdlib_active_clients", "Telegram clients open in the hosts (all authorization states).")
    queue_depth = _gauge("tdlib_queue_depth", "Telegram requests sent and not answered yet, over all hosts.")
    by_state = _gauge("tdlib_clients", "Telegram clients open in the hosts, by authorization state.",
                      ["auth_state"])
    lag = _gauge("tdlib_receive_loop_lag_seconds", "Worst receive-loop lag over the hosts (last minute).")
    host_count = _gauge("tdlib_hosts", "Telegram hosts publishing stats (live worker children).")
    states: dict[str, int] = {}
    for host in hosts:
        for state, count in host.get("clients", {}).items():
            states[state] = states.get(state, 0) + int(count)
    active.add_metric([], float(sum(states.values())))
    queue_depth.add_metric([], float(sum(int(h.get("pending_requests", 0)) for h in hosts)))
    for state, count in sorted(states.items()):
        by_state.add_metric([state], float(count))
    lag.add_metric([], max((float(h.get("receive_loop_lag_seconds", 0.0)) for h in hosts), default=0.0))
    host_count.add_metric([], float(len(hosts)))

    kept = _gauge("tp_event_log_events", "Events kept for replay in the event log (tp:events:log).")
    behind = _gauge("tp_webhook_events_behind_seconds", "How far the webhook listeners' cursor trails the "
                    "newest event, by their publishing times (saved once a second: ~1 s when caught up).")
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(EVENTS_LOG)
        pipe.xrevrange(EVENTS_LOG, count=1)
        pipe.get(CURSOR_KEY)
        length, newest, cursor = await pipe.execute()
    kept.add_metric([], float(length))
    gap = 0.0
    if newest and cursor:
        newest_ms, cursor_ms = parse_id(newest[0][0])[0], parse_id(cursor)[0]
        gap = max(0.0, (newest_ms - cursor_ms) / 1000)
    behind.add_metric([], gap)
    return [depth, started, scheduled, failed, oldest, workers, active, queue_depth, by_state, lag, host_count,
            kept, behind]


def _read_spool(directory: Path) -> list[Metric]:
    spooled = _gauge("tp_incoming_spooled_messages", "Incoming messages written to this machine's disk "
                     "while Redis and PostgreSQL were both unreachable, not yet handed to the updates queue.")
    spooled.add_metric([], float(count_waiting(directory)))
    return [spooled]


def _age(raw: bytes | str | None, now: float) -> float:
    if not raw:
        return 0.0
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, now - when.timestamp())


async def _read_database(pool: asyncpg.Pool) -> list[Metric]:
    up = _gauge("tp_database_up", "1 when PostgreSQL answered this scrape.")
    accounts = _gauge("tp_accounts", "Telegram accounts, by authorization state.", ["auth_state"])
    paused = _gauge("tp_accounts_paused", "Accounts not sending now because Telegram limited them "
                    "(flood_wait: 429 retry-after; peer_flood: cold sends stopped).", ["reason"])
    campaigns = _gauge("tp_campaigns", "Campaigns, by status.", ["status"])
    campaign_progress = _gauge("tp_campaign_recipients", "Recipients of running and paused campaigns, by "
                               "progress (sent, failed, pending, skipped).", ["state"])
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT auth_state, count(*) AS n FROM accounts GROUP BY auth_state")
        limited = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE paused_until > now()) AS flood_wait, "
            "count(*) FILTER (WHERE peer_flood_until > now()) AS peer_flood FROM accounts")
        has_campaigns = await conn.fetchval("SELECT to_regclass('campaigns') IS NOT NULL")
        campaign_rows = (await conn.fetch("SELECT status, count(*) AS n FROM campaigns GROUP BY status")
                         if has_campaigns else [])
        progress = await _campaign_progress(conn) if has_campaigns else None
    up.add_metric([], 1.0)
    for row in rows:
        accounts.add_metric([row["auth_state"]], float(row["n"]))
    paused.add_metric(["flood_wait"], float(limited["flood_wait"]))
    paused.add_metric(["peer_flood"], float(limited["peer_flood"]))
    for row in campaign_rows:
        campaigns.add_metric([row["status"]], float(row["n"]))
    families: list[Metric] = [up, accounts, paused]
    if has_campaigns:
        families.append(campaigns)
    if progress is not None:
        for state in ("sent", "failed", "pending", "skipped"):
            campaign_progress.add_metric([state], float(progress.get(state, 0)))
        families.append(campaign_progress)
    return families


async def _campaign_progress(conn: asyncpg.Connection) -> dict[str, int]:
    """Sent/failed/pending/skipped summed over running and paused campaigns, counted the way
    GET /api/campaigns/{id} counts them (storage.campaigns.progress)."""
    from ..storage import campaigns as campaign_store

    out = {"sent": 0, "failed": 0, "pending": 0, "skipped": 0}
    for row in await conn.fetch("SELECT * FROM campaigns WHERE status IN ('running', 'paused')"):
        progress = await campaign_store.progress(conn, row)
        for state in out:
            out[state] += int(progress.get(state, 0))
    return out


# -- processes: supervisord and /proc ------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_processes(socket_path: Path,
                    restart_counts: Callable[[], Mapping[tuple[str, str], int]] | None) -> list[Metric]:
    """Per program: state, memory, start time, uptime; the worker pool's children too."""
    from .supervisor import SupervisorClient

    sup_up = _gauge("tp_supervisor_up", "1 when supervisord answered this scrape.")
    if not socket_path.exists():
        sup_up.add_metric([], 0.0)
        return [sup_up]
    processes = SupervisorClient(socket_path).processes()
    sup_up.add_metric([], 1.0)
    state = _gauge("tp_process_state", "1 for the state each supervisord program is in (RUNNING, "
                   "BACKOFF, FATAL, ...).", ["program", "state"])
    memory = _gauge("tp_process_resident_memory_bytes", "Resident memory of each platform process "
                    "(worker children listed on their own).", ["program"])
    start = _gauge("tp_process_start_time_seconds", "Start time of each platform process (unix time).",
                   ["program"])
    uptime = _gauge("tp_process_uptime_seconds", "Seconds each platform process has been running.",
                    ["program"])
    now = time.time()
    boot = _boot_time()
    children = _children_by_parent()
    for proc in processes:
        program = proc.name.split(":", 1)[-1]
        state.add_metric([program, proc.state], 1.0)
        if not proc.pid:
            continue
        pids = [(program, proc.pid)]
        for child in children.get(proc.pid, []):
            name = _child_name(child)
            if name:
                pids.append((name, child))
        for name, pid in pids:
            rss = _rss(pid)
            began = _start_time(pid, boot)
            if rss is not None:
                memory.add_metric([name], float(rss))
            if began is not None:
                start.add_metric([name], began)
                uptime.add_metric([name], max(0.0, now - began))
    families: list[Metric] = [sup_up, state, memory, start, uptime]
    if restart_counts is not None:
        from prometheus_client.metrics_core import CounterMetricFamily

        restarts = CounterMetricFamily("tp_process_restarts", "Restarts of each supervisord program, by "
                                       "cause (crash, watchdog, reload).", labels=["program", "cause"])
        for (program, cause), count in sorted(restart_counts().items()):
            restarts.add_metric([program, cause], float(count))
        families.append(restarts)
    return families


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _boot_time() -> float:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _start_time(pid: int, boot: float) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / _CLK_TCK  # field 22 of stat; 20th after "(comm) "
    except (OSError, ValueError, IndexError):
        return None


def _children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _child_name(pid: int) -> str | None:
    """The worker child's `--name`; other children (shells, helpers) are not listed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if b"telegram_platform.worker.child" in argv and b"--name" in argv:
        index = argv.index(b"--name") + 1
        return argv[index].decode(errors="replace") if index < len(argv) else None
    return None


# --------------------------------------------------------------------------------------------
# One scrape


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _files_metric(directory: Path) -> Metric:
    files = _gauge("tp_metrics_files", "prometheus_client multiprocess files: those of live processes, one "
                   "archive per type, and dead processes' files not yet compacted (ops/metric_files.py).")
    files.add_metric([], float(len(glob.glob(os.path.join(directory, "*.db")))))
    return files


def render(metrics: Metrics, families: list[Metric], accept: str) -> tuple[bytes, str]:
    """The exposition for one scrape (blocking file reads: call it in a thread).

    Multiprocess mode: a fresh registry + MultiProcessCollector over the directory, every process's
    values summed; otherwise this process's own registry."""
    encoder, content_type = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    if metrics.directory is None:
        if metrics.registry is not None:
            registry.register(_Families(list(metrics.registry.collect())))
        registry.register(_Families(families))
        return encoder(registry), content_type
    metric_files.maintain(metrics.directory)
    MultiProcessCollector(registry, path=str(metrics.directory))  # type: ignore[no-untyped-call]
    registry.register(_Families([*families, _files_metric(metrics.directory)]))
    # The files are read while encoding: under the lock, so no compaction swaps them meanwhile.
    with metric_files.locked(metrics.directory, exclusive=False):
        return encoder(registry), content_type


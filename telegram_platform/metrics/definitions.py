"""Every Prometheus metric the platform records in its processes (those read only at scrape time are
defined where they are read, api/scrape.py).

Two kinds of metric, one scrape:

* Recorded in the processes that see the events (API members: HTTP; worker children: jobs, sends,
  Telegram calls; the worker pool: child restarts). Each process builds ONE `Metrics` with
  `create_metrics(directory)` at start. Under supervisord `PROMETHEUS_MULTIPROC_DIR` is set for
  every process (scripts/run exports it and wipes the directory once, before supervisord starts),
  so prometheus_client writes each process's values to mmap files there, and any API member sums
  them all at scrape time with a fresh `CollectorRegistry` + `MultiProcessCollector`.
* Read at scrape time, where a reading is more accurate than a running count: queue depths and the
  oldest job's age (Redis), Telegram clients (the hosts' published stats), accounts paused
  (PostgreSQL), processes, memory and uptime (supervisord and /proc). See api/scrape.py.

Rules kept here (prometheus client_python's multiprocess mode, see its documentation at
https://prometheus.github.io/client_python/multiprocess/): gauges recorded in processes use a `live*`
mode, so a dead process's gauges vanish once `mark_process_dead(pid)` runs (the pool calls it for its
children; a scrape sweeps every other exit); counters and histograms of dead processes stay, so
totals never go backwards, and are folded into one archive per type (metrics/files.py). No
per-job process ever records a metric. Labels are bounded: route templates, queue names, job
kinds, error classes, program names; never an account id, a phone number or a user.

A leaf: it imports nothing from the platform's api, worker, queue, storage or telegram packages, so
any of them may import it.
"""

from __future__ import annotations

import collections
import math
import os
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import files

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets (seconds) for HTTP requests, jobs and Telegram calls: 5 ms to 60 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# telegram.base's error classes (listed here so that the label set is fixed even before an error).
ERROR_CLASSES = ("transient", "rate_limited", "permanent")
# What crosses Redis and can be refused (redis_auth.REFUSED_KINDS; a leaf keeps its own copy).
REDIS_REFUSED_KINDS = ("event", "revocation", "request", "reply", "job")


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
            "(start, submit_code, send, ...), by operation.", ("method",), buckets=LATENCY_BUCKETS,
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
        self.rebalance_moves = Counter(
            "tp_rebalance_moves", "Accounts the rebalancing decider moved from the most-loaded to the "
            "least-loaded live host (moved), or tried to and the move failed (failed).", ("result",), registry=r)
        for result in ("moved", "failed"):
            self.rebalance_moves.labels(result)  # present at 0 from the start

        # -- Redis (every process that reads what crosses it: redis_auth.py) --
        self.redis_refused = Counter(
            "tp_redis_refused", "Events, token revocations, account requests and replies, and incoming-message "
            "jobs read from Redis and refused (no valid MAC or seal, or a replayed request), by kind.", ("kind",),
            registry=r)
        for kind in REDIS_REFUSED_KINDS:
            self.redis_refused.labels(kind)  # present at 0 from the start

        # -- retention (the worker's purge, worker/retention.py) --
        self.purged_rows = Counter(
            "tp_retention_purged_rows", "Rows the retention purge deleted, by table.", ("table",), registry=r)

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

    def count_redis_refused(self, kind: str) -> None:
        self._child(self.redis_refused, kind).inc()

    def message_failed(self, error_class: str) -> None:
        self.messages_failed.labels(error_class).inc()

    def worker_child_exited(self, pid: int, exit_code: int) -> None:
        """The pool saw a child exit: its live gauges go, and the restart to come is counted."""
        self.worker_child_restarts.labels("crash" if exit_code != 0 else "exit").inc()
        if self.directory is not None:
            files.mark_process_dead(pid, self.directory)


def observe_all(histogram: Any, values: list[Any], bounds: Sequence[float] | None = None,
                per_unit: float = 1.0) -> None:
    """`histogram.observe(v / per_unit)` for every value of a non-empty list, as one write per
    bucket touched and one to the sum. May sort `values` in place. `bounds` are the histogram's
    bucket bounds in the values' own unit (`nanosecond_bounds`): integers compared as they are,
    with no division per value.

    Reads the labelled Histogram's `_upper_bounds`, `_buckets` and `_sum`, which prometheus_client
    has kept since 0.4; tests/metrics/test_metrics.py checks the result against `observe` itself, so a
    change there fails a test instead of skewing a histogram."""
    bounds = bounds or histogram._upper_bounds
    if max(values) <= bounds[0]:
        # All in the first bucket, as a fast API's requests mostly are: no sort (a sort per batch
        # showed in benchmarks/api_instructions.py).
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
    files.name_files_by_process_identity()
    return Metrics(None, directory)

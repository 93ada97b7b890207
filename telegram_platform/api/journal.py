"""What each answered request leaves behind: its log line and its metrics, recorded in batches.

Per request the pipeline only appends one tuple, a `HeldRequest`. The first request of a batch
schedules the batch's write FLUSH_INTERVAL later (and any other log line writes it first), so an
idle process never wakes for it; the batch is then sorted into its routes' `RouteTally`s, its lines
are encoded in one call and written in one write. The tallies become metric updates, one per label
set, once METRICS_BATCH requests have been answered, or every METRICS_INTERVAL (and on a scrape,
and at shutdown); kept per route, they need no grouping then. Done per request, the same
work (a structlog call, a counter, a histogram and a gauge in mmap files) cost about as much as
aiohttp's own handling of a health check; batched, it costs a few percent of it
(benchmarks/api_wrk.py).

Why two paces: a write of metrics costs the same whatever it holds (prometheus_client's locked
mmap writes, one per label set and bucket), and a periodic task's wake-up as much again; at a
few hundred requests/s a 20 ms batch holds a handful, and those fixed costs were most of what a
request paid. What it costs: a line is up to FLUSH_INTERVAL (20 ms) late and another process's
counts up to METRICS_INTERVAL (scrapes are seconds apart), and a process killed with SIGKILL loses
at most that much of each. Short batches keep the pause a write makes small, which a request's
p99 would otherwise see (the figures: docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import structlog

from ..logs import ACCESS_LOGGER, LineSink, RequestLine, RequestLines, current_sink, utc_stamp
from ..metrics.definitions import Metrics

FLUSH_INTERVAL = 0.02
METRICS_INTERVAL = 1.0
METRICS_BATCH = 512
INFO = 20  # logging.INFO, without importing logging for one constant

# An answered request as `record` takes it: (method, route template, status, duration in
# nanoseconds, request id, user).
RequestRecord = tuple[str, str, int, int, str, str | None]


class RouteTally:
    """One route's answered requests since the last metrics write: what its counter and histogram
    need. A batch's lines add to the lists when written; a metrics write takes them."""

    __slots__ = ("method", "nanoseconds", "route", "statuses", "timed")

    def __init__(self, method: str, route: str, timed: bool) -> None:
        self.method, self.route, self.timed = method, route, timed
        self.statuses: list[int] = []
        self.nanoseconds: list[int] = []  # timed requests only: a WebSocket's lifetime is no latency


# What the pipeline keeps of an answered request until its batch is written: its route's tally,
# the status sent, the duration in nanoseconds, the request id and the user. A tuple of objects the
# request already has: its line and its counts are made from it later, a batch at a time. Inside a
# server under wrk, work done per request between aiohttp's own costs 2-4 times what it costs in a
# loop (benchmarks/api_features.py); making the line and the counts per batch instead saved 0.4-2.3
# µs of CPU per request (README, "Where the API's time goes").
HeldRequest = tuple[RouteTally, int, int, str, str | None]


class RequestJournal:
    """One per API process (`create_app`); `running()` writes it while the application runs."""

    def __init__(self, metrics: Metrics, sink: LineSink | None) -> None:
        self._metrics = metrics
        self._sink = sink
        self._log_lines = sink is None or sink.level <= INFO
        self._lines = RequestLines(sink.process if sink is not None else None)
        # Answered requests not yet written. The pipeline appends to this list itself, and calls
        # `start_batch` when it finds the list empty (what `record` does): a method call per
        # request would cost more than the append.
        self.held: list[HeldRequest] = []
        # The keys the lines of the batch being held share, with its timestamp (`start_batch`).
        self.shared = self._lines.shared_keys(utc_stamp())
        self._tallies: dict[tuple[str, str], RouteTally] = {}
        # Requests being answered now (WebSockets excluded), written to the gauge with each batch of
        # lines (so it drops within FLUSH_INTERVAL of a request's end) and of metrics (so requests
        # that are stuck still show).
        self.in_flight = 0
        self._in_flight_shown = 0
        self._unmetered = 0  # requests logged since the last metrics write
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_pending: asyncio.TimerHandle | None = None

    @classmethod
    def for_this_process(cls, metrics: Metrics) -> RequestJournal:
        return cls(metrics, current_sink())

    def tally(self, method: str, route: str, *, timed: bool = True) -> RouteTally:
        """The route's tally, made on first use (the pipeline takes its route's once)."""
        tally = self._tallies.get((method, route))
        if tally is None:
            tally = self._tallies[method, route] = RouteTally(method, route, timed)
        return tally

    def record(self, record: RequestRecord, *, timed: bool = True) -> None:
        """One answered request (the pipeline does the same inline). Whether a route is `timed` is
        settled by its first request, as it is by its endpoint in the pipeline."""
        method, route, status, nanoseconds, request_id, user = record
        if not self.held:
            self.start_batch()
        self.held.append((self.tally(method, route, timed=timed), status, nanoseconds, request_id, user))

    def start_batch(self) -> None:
        """For a batch's first request, before it is held: the batch's timestamp (that request's
        end, which every line of the batch carries), and its write FLUSH_INTERVAL from now (none
        when a write is already due, or when not `running()`: `flush()` then writes it)."""
        self.shared = self._lines.shared_keys(utc_stamp())
        if self._write_pending is None and self._loop is not None:
            self._write_pending = self._loop.call_later(FLUSH_INTERVAL, self._write_due)

    def flush(self) -> None:
        """Everything held, lines and metrics (a scrape, shutdown)."""
        self.write_lines()
        self.write_metrics()

    def write_lines(self) -> None:
        """The lines of the requests held, and their counts into their routes' tallies."""
        if not self.held:
            return
        held = self.held.copy()
        self.held.clear()  # the same list: the pipeline holds it
        if self._log_lines:
            # One pass for the counts and the lines: a second loop over the batch was a measurable
            # share of a request (docs/performance.md).
            lines: list[RequestLine] = []
            line, unset, shared = lines.append, msgspec.UNSET, self.shared
            for tally, status, nanoseconds, request_id, user in held:
                tally.statuses.append(status)
                if tally.timed:
                    tally.nanoseconds.append(nanoseconds)
                line(RequestLine(tally.method, tally.route, status, nanoseconds / 1e6, request_id,
                                 unset if user is None else user, shared))
            self._write_lines(lines)
        else:
            for tally, status, nanoseconds, _, _ in held:
                tally.statuses.append(status)
                if tally.timed:
                    tally.nanoseconds.append(nanoseconds)
        self._unmetered += len(held)
        if self._unmetered >= METRICS_BATCH:
            self.write_metrics()
        else:
            self._show_in_flight()

    def write_metrics(self) -> None:
        self._unmetered = 0
        self._show_in_flight()
        for tally in self._tallies.values():
            if tally.statuses:
                statuses, nanoseconds = tally.statuses, tally.nanoseconds
                tally.statuses, tally.nanoseconds = [], []
                self._metrics.http_route(tally.method, tally.route, statuses, nanoseconds)

    def _show_in_flight(self) -> None:
        if self._in_flight_shown != self.in_flight:
            self._in_flight_shown = self.in_flight
            self._metrics.http_in_flight.set(self.in_flight)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Write lines when due and metrics every METRICS_INTERVAL until the block ends, then flush."""
        self._loop = asyncio.get_running_loop()
        if self._sink is not None:
            # Any other line of this thread writes the held lines first, keeping the order.
            self._sink.before_each_line(self.write_lines)
        task = asyncio.create_task(self._write_metrics_periodically(), name="request-journal")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._write_pending is not None:
                self._write_pending.cancel()
                self._write_pending = None
            self._loop = None
            self.flush()
            if self._sink is not None:
                self._sink.remove_hook(self.write_lines)

    def _write_due(self) -> None:
        self._write_pending = None
        self.write_lines()

    async def _write_metrics_periodically(self) -> None:
        # Also while no request ends: the in-flight gauge shows requests that are stuck.
        while True:
            await asyncio.sleep(METRICS_INTERVAL)
            self.write_metrics()

    def _write_lines(self, lines: list[RequestLine]) -> None:
        sink = self._sink
        if sink is not None and sink.json:
            sink.write_lines(self._lines.render(lines))
            return
        # A terminal's colours, or structlog's defaults (tests): the ordinary path, one call each
        # (stamped when written, so up to FLUSH_INTERVAL after the request ended).
        log = structlog.get_logger(ACCESS_LOGGER)
        for line in lines:
            extra = {"user": line.user} if line.user is not msgspec.UNSET else {}
            log.info("request", method=line.method, route=line.route, status=line.status,
                     duration_ms=line.duration_ms, request_id=line.request_id, **extra)

"""What each answered request leaves behind: its log line and its metrics, recorded in batches.

Per request the pipeline only appends a tuple; every `FLUSH_INTERVAL` (and before any other log
line, on a scrape, and at shutdown) the batch becomes JSON lines in one write, and metric updates
aggregated by label set. Done per request, the same work (a structlog call, a counter, a histogram
and a gauge in mmap files) cost about as much as aiohttp's own handling of a health check; batched,
it costs a few percent of it (benchmarks/api_wrk.py). What that costs: a line and a count are up
to FLUSH_INTERVAL (20 ms) late, and a process killed with SIGKILL loses at most that much of both.
Short batches keep the pause a flush makes small (~0.5 ms for 400 requests), which a request's p99
would otherwise see.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from ..logs import ACCESS_LOGGER, LineSink, RequestLines, RequestRecord, current_sink, utc_stamp
from ..ops.metrics import Metrics

FLUSH_INTERVAL = 0.02
INFO = 20  # logging.INFO, without importing logging for one constant


class RequestJournal:
    """One per API process (`create_app`); `running()` flushes it while the application runs."""

    def __init__(self, metrics: Metrics, sink: LineSink | None) -> None:
        self._metrics = metrics
        self._sink = sink
        self._log_lines = sink is None or sink.level <= INFO
        self._lines = RequestLines(sink.process if sink is not None else None)
        self._records: list[RequestRecord] = []
        # What the pipeline calls for each answered request (it keeps `in_flight` itself, answered or
        # not): the list's own append, because a method of ours would be a Python call per request.
        self.record = self._records.append
        # Requests being answered now (WebSockets excluded), written to the gauge at each flush.
        self.in_flight = 0
        self._in_flight_shown = 0

    @classmethod
    def for_this_process(cls, metrics: Metrics) -> RequestJournal:
        return cls(metrics, current_sink())

    def flush(self) -> None:
        if self._in_flight_shown != self.in_flight:
            self._in_flight_shown = self.in_flight
            self._metrics.http_in_flight.set(self.in_flight)
        if not self._records:
            return
        records = self._records.copy()
        self._records.clear()  # the same list: `record` stays its append
        self._metrics.http_batch(records)
        if self._log_lines:
            self._write_lines(records)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Flush every FLUSH_INTERVAL until the block ends, then once more."""
        if self._sink is not None:
            self._sink.before_each_line(self.flush)  # any other line of this thread writes the batch first
        task = asyncio.create_task(self._flush_periodically(), name="request-journal")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()
            if self._sink is not None:
                self._sink.remove_hook(self.flush)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def _write_lines(self, records: list[RequestRecord]) -> None:
        sink = self._sink
        if sink is not None and sink.json:
            sink.write_lines(self._lines.render(records, utc_stamp()))
            return
        # A terminal's colours, or structlog's defaults (tests): the ordinary path, one call each
        # (stamped when written, so up to FLUSH_INTERVAL after the request ended).
        log = structlog.get_logger(ACCESS_LOGGER)
        for method, route, status, nanoseconds, request_id, user, _ in records:
            extra = {"user": user} if user is not None else {}
            log.info("request", method=method, route=route, status=status, duration_ms=nanoseconds / 1e6,
                     request_id=request_id, **extra)

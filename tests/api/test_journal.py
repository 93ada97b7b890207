"""The request journal: lines within a flush interval of a batch's first request, metrics in larger batches."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from prometheus_client import CollectorRegistry

from telegram_platform.api.journal import (
    FLUSH_INTERVAL,
    METRICS_BATCH,
    METRICS_INTERVAL,
    RequestJournal,
    RequestRecord,
)
from telegram_platform.metrics.definitions import create_metrics

HEALTH = {"method": "GET", "route": "/api/health", "status": "200"}


def _records(count: int, prefix: str) -> list[RequestRecord]:
    return [("GET", "/api/health", 200, 1_000_000, f"{prefix}-{i}", None) for i in range(count)]


Journaled = tuple[RequestJournal, CollectorRegistry]


@pytest.fixture
def journaled() -> Journaled:
    """A journal without a sink (lines go through structlog, for capture_logs) and its registry."""
    metrics = create_metrics(None)
    assert metrics.registry is not None
    return RequestJournal(metrics, None), metrics.registry


async def test_lines_go_out_each_interval_and_metrics_once_a_batch_is_full(journaled: Journaled) -> None:
    """A few requests are logged within a few flush intervals but counted only with the next metrics
    write; METRICS_BATCH held requests are counted without waiting for METRICS_INTERVAL."""
    journal, registry = journaled
    with structlog.testing.capture_logs() as lines:
        async with journal.running():
            for record in _records(3, "few"):
                journal.record(record)
            await asyncio.sleep(FLUSH_INTERVAL * 4)
            assert [line["request_id"] for line in lines] == ["few-0", "few-1", "few-2"]
            assert (registry.get_sample_value("tp_http_requests_total", HEALTH) or 0.0) == 0.0

            for record in _records(METRICS_BATCH, "many"):
                journal.record(record)
            await asyncio.sleep(FLUSH_INTERVAL * 4)
            assert FLUSH_INTERVAL * 8 < METRICS_INTERVAL  # so the batch, not the clock, wrote them
            assert registry.get_sample_value("tp_http_requests_total", HEALTH) == METRICS_BATCH + 3
            assert registry.get_sample_value("tp_http_request_duration_seconds_count",
                                             {"method": "GET", "route": "/api/health"}) == METRICS_BATCH + 3


async def test_leaving_running_writes_what_is_held(journaled: Journaled) -> None:
    """Requests answered just before shutdown are both logged and counted when `running()` ends."""
    journal, registry = journaled
    with structlog.testing.capture_logs() as lines:
        async with journal.running():
            for record in _records(2, "last"):
                journal.record(record)
    assert [line["request_id"] for line in lines] == ["last-0", "last-1"]
    assert registry.get_sample_value("tp_http_requests_total", HEALTH) == 2


async def test_untimed_requests_are_counted_but_not_timed(journaled: Journaled) -> None:
    """A WebSocket (recorded untimed) adds to the request counter of its route, not to its latency
    histogram; each route keeps its own labels."""
    journal, registry = journaled
    with structlog.testing.capture_logs():
        async with journal.running():
            journal.record(("GET", "/api/ws", 101, 5_000_000_000, "ws-1", "admin"), timed=False)
            journal.record(("GET", "/api/health", 200, 1_000_000, "h-1", None))
            journal.record(("GET", "/api/health", 503, 2_000_000, "h-2", None))
    ws = {"method": "GET", "route": "/api/ws"}
    assert registry.get_sample_value("tp_http_requests_total", {**ws, "status": "101"}) == 1
    assert (registry.get_sample_value("tp_http_request_duration_seconds_count", ws) or 0.0) == 0.0
    assert registry.get_sample_value("tp_http_requests_total", {**HEALTH, "status": "503"}) == 1
    assert registry.get_sample_value("tp_http_request_duration_seconds_count",
                                     {"method": "GET", "route": "/api/health"}) == 2
    assert registry.get_sample_value("tp_http_request_duration_seconds_sum",
                                     {"method": "GET", "route": "/api/health"}) == 0.003


async def test_in_flight_gauge_follows_each_batch_of_lines(journaled: Journaled) -> None:
    """The in-flight gauge drops within a few flush intervals of a request's end, without waiting for
    the metrics (a scrape, itself in flight when written, must not leave a 1 behind for a second)."""
    journal, registry = journaled
    with structlog.testing.capture_logs():
        async with journal.running():
            journal.in_flight = 1
            journal.flush()  # as a scrape does, while it is itself in flight
            assert registry.get_sample_value("tp_http_requests_in_flight") == 1
            journal.in_flight = 0
            journal.record(("GET", "/metrics", 200, 1_000_000, "scrape", None))
            await asyncio.sleep(FLUSH_INTERVAL * 4)
            assert FLUSH_INTERVAL * 4 < METRICS_INTERVAL
            assert registry.get_sample_value("tp_http_requests_in_flight") == 0

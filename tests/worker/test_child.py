"""The worker child's phases, run in this process: a signal records intent, the periodic table runs,
and every task the child started is cancelled and awaited before `serve` returns."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import EmulatorHandle, eventually

from telegram_platform.queue.registry import QUEUE_NAMES, host_queue
from telegram_platform.queue.routing import ROUTED_QUEUES
from telegram_platform.redis_keys import TDLIB_STATS_PREFIX, WORKER_HEARTBEAT_PREFIX, slot_alive
from telegram_platform.settings import Settings
from telegram_platform.storage.hosts import HEARTBEAT_SECONDS
from telegram_platform.worker.account_sessions import (
    DRAIN_CHECK_SECONDS,
    LEASE_RENEW_SECONDS,
    LEASE_RETRY_SECONDS,
    ORPHAN_SCAN_SECONDS,
)
from telegram_platform.worker.child import ChildServices, Periodic, WorkerChild
from telegram_platform.worker.pool import RECYCLE_SIGNAL
from telegram_platform.worker.rebalance import ROUND_SECONDS as REBALANCE_ROUND_SECONDS
from telegram_platform.worker.retention import PURGE_EVERY_SECONDS, PURGE_FIRST_AFTER_SECONDS
from telegram_platform.worker.webhooks import BREAKERS_EVERY_SECONDS

# The table as the child has always run it: (name, every seconds, first after).
EXPECTED_TABLE = {
    ("heartbeat", 3, 0.0), ("rescue", 3, 0.0), ("leases", LEASE_RENEW_SECONDS, 0.0),
    ("orphaned-accounts", ORPHAN_SCAN_SECONDS, ORPHAN_SCAN_SECONDS), ("dead-leases", 3, 0.0),
    ("stats", 5, 0.0), ("abandoned-sends", 2, 0.0), ("reconcile", 10, 0.0), ("reconcile-campaigns", 3, 0.0),
    ("webhook-sweep", 60, 0.0), ("incoming-spool", 5, 0.0),
    ("webhook-breakers", BREAKERS_EVERY_SECONDS, 0.0),
    ("retention-purge", PURGE_EVERY_SECONDS, PURGE_FIRST_AFTER_SECONDS),
    ("host-heartbeat", HEARTBEAT_SECONDS, 0.0), ("drain", DRAIN_CHECK_SECONDS, 0.0),
    ("rebalance", REBALANCE_ROUND_SECONDS, REBALANCE_ROUND_SECONDS),
    ("state-snapshots", 300, 300),
    ("file-purge", 3600.0, 60.0),
}


class RecordingChild(WorkerChild):
    """A child that keeps the table it ran, for the test to read."""

    table: tuple[Periodic, ...] = ()

    def periodic_tasks(self, s: ChildServices) -> tuple[Periodic, ...]:
        self.table = super().periodic_tasks(s)
        return self.table


@pytest.fixture
async def signals_restored() -> AsyncIterator[None]:
    """The child's signal handlers removed afterwards from the test's own loop (still running here,
    whatever loop earlier tests left current), and this process's own ones put back."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, RECYCLE_SIGNAL)}
    yield
    loop = asyncio.get_running_loop()
    for sig, handler in previous.items():
        loop.remove_signal_handler(sig)
        signal.signal(sig, handler)


async def test_a_signal_only_records_the_intent_to_stop(settings: Settings, signals_restored: None) -> None:
    """SIGTERM sets the child's stop event and nothing else: no task started, no phase run."""
    child = WorkerChild(settings, name="signal-test-1")
    child.install_signal_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(child.stopping.wait(), 5)
    assert child.tasks == [] and not child.crashed and child.cancelled_jobs == 0
    assert child.host_stopping  # the worker stops: its accounts are handed off in the drain


async def test_the_pools_recycle_signal_stops_the_child_keeping_its_accounts_here(
        settings: Settings, signals_restored: None) -> None:
    """RECYCLE_SIGNAL (the pool replacing this one child) stops it as SIGTERM does, but not as the
    host's stop: no hand-off; a SIGTERM after it still makes it one."""
    child = WorkerChild(settings, name="signal-test-2")
    child.install_signal_handlers()
    os.kill(os.getpid(), RECYCLE_SIGNAL)
    await asyncio.wait_for(child.stopping.wait(), 5)
    assert not child.host_stopping and child.tasks == []
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.1)
    assert child.host_stopping


async def test_a_failed_round_of_a_periodic_task_is_tried_again_after_its_retry_time(settings: Settings) -> None:
    """A round that fails runs again `retry_seconds` later, not a whole interval later (a lease
    renewal that met a Redis blip is tried again before the leases could expire)."""
    child = WorkerChild(settings, name="retry-test-1")
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) == 1:
            raise ConnectionError("a blip")

    task = asyncio.create_task(child._every(Periodic("flaky", 60, flaky, retry_seconds=0.05)))
    try:
        async def twice() -> bool:
            return len(calls) >= 2

        await eventually(twice, timeout=5)
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(calls) == 2 and calls[1] - calls[0] < 1.0  # the third waits out the 60 s interval


async def test_periodic_tasks_run_and_are_all_cancelled_and_awaited_on_stop(
        platform_env: dict[str, str], db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle,
        signals_restored: None) -> None:
    """The child runs each task of its one periodic table (same names and intervals as ever); on
    SIGTERM `serve` returns 0 with every task it started done, and its heartbeat and stats gone."""
    settings = Settings.from_env(platform_env, app_mode="worker")
    child = RecordingChild(settings, name="table-test-1")
    serving = asyncio.create_task(child.serve())
    try:
        first_round = {name for name, _, first_after in EXPECTED_TABLE if first_after == 0}

        async def every_task_ran() -> Any:
            return all(child.rounds[name] >= 1 for name in first_round)

        await eventually(every_task_ran, timeout=30)
        assert {(p.name, p.every_seconds, p.first_after) for p in child.table} == EXPECTED_TABLE
        assert {p.name: p.retry_seconds for p in child.table if p.retry_seconds is not None} == {
            "leases": LEASE_RETRY_SECONDS}
        assert await redis.exists(WORKER_HEARTBEAT_PREFIX + "table-test-1", TDLIB_STATS_PREFIX + "table-test-1") == 2
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 40) == 0
    finally:
        if not serving.done():
            serving.cancel()
    names = {task.get_name() for task in child.tasks}
    # and this child's slot's own sends and campaign runs (queue/routing.py ROUTED_QUEUES)
    queues = (*QUEUE_NAMES, *(host_queue(queue, "table-test") for queue in ROUTED_QUEUES))
    assert names == ({p.name for p in child.table} | {f"consumer:{queue}" for queue in queues}
                     | {"liveness", "scheduler", "resume-ready-accounts", "webhook-events", "account-requests"})
    assert all(task.done() for task in child.tasks)
    assert not set(child.tasks) & asyncio.all_tasks()
    assert await redis.exists(WORKER_HEARTBEAT_PREFIX + "table-test-1", TDLIB_STATS_PREFIX + "table-test-1") == 0
    assert not await redis.exists(slot_alive("table-test"))  # stopped on purpose: no longer routed to

"""A worker child: one long-lived process that hosts Telegram sessions and runs the queues' jobs.

Started by the pool with fork+exec (a fresh interpreter), it never forks itself, so TDLib may run
in it. SIGTERM stops it taking jobs; jobs in hand get `worker_drain_seconds` to finish, then the rest
are cancelled and requeued, every session is closed, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..logs import configure_logging
from ..ops.metrics import create_metrics, instrument_backend
from ..ops.status import TDLIB_STATS_PREFIX
from ..queue.consumer import JobBudget, JobHandler, QueueConsumer, active_workers, heartbeat, rescue_abandoned
from ..queue.scheduler import Scheduler
from ..settings import QUEUE_NAMES, ConfigError, Settings
from ..storage.db import open_pool
from ..storage.migrations import ensure_schema
from ..storage.outbox import Outbox
from ..storage.redis import open_redis
from ..tasks import cancel_and_wait
from ..telegram.base import Update
from ..telegram.factory import create_backend
from .account_requests import AccountRequests
from .account_sessions import LEASE_RENEW_SECONDS, ORPHAN_SCAN_SECONDS, AccountSessions
from .campaigns import CampaignRunner
from .jobs import RUN_CAMPAIGN, SEND_MESSAGE
from .liveness import DeadLeases, Liveness, alive
from .reconciler import reconcile_campaigns, reconcile_outbox
from .sender import Sender
from .unknown_outcomes import settle_abandoned_sends
from .updates import STORE_INCOMING
from .webhooks import DELIVER_WEBHOOK, WebhookService

# Named explicitly: this module runs as __main__ in the child.
log = structlog.get_logger("telegram_platform.worker.child")

PR_SET_PDEATHSIG = 1
# Closing 1,000 TDLib clients takes 5-7 s on two cores (benchmarks/tdlib_clients.py). Below a
# lease's TTL: AccountSessions.aclose renews the leases just before, so they outlive the close.
CLOSE_SESSIONS_SECONDS = 12.0


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the pool dies, even by SIGKILL: no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


async def _every(seconds: float, action: Callable[[], Awaitable[object]], name: str, *,
                 first_after: float = 0.0) -> None:
    await asyncio.sleep(first_after)
    while True:
        try:
            await action()
        except Exception:
            log.exception("periodic task failed", task=name)
        await asyncio.sleep(seconds)


async def run_child(settings: Settings, *, name: str, parent_pid: int | None = None,
                    reaped: tuple[str, ...] = ()) -> int:
    """Run until SIGTERM (or `TP_WORKER_MAX_JOBS` jobs); `name` is this incarnation's identity
    (the pool's slot name plus this pid): its heartbeat, lease owner, claims and liveness lock."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    structlog.contextvars.bind_contextvars(worker=name)
    log.info("worker child starting", telegram_backend=settings.telegram_backend)

    # No socket_timeout on this client: with one, redis-py 8 loses a task's cancellation when it lands
    # during a read (13 of 200 in a probe; redis-py#2028, #2551), and a child whose loops ignore
    # their cancellation never stops. What must not wait on a Redis that stops answering is bounded
    # where it is awaited instead: lease renewals (3 s), an incoming message's hand-over (15 s).
    async with open_pool(settings) as pool, open_redis(settings.redis_url) as redis:
        async with pool.acquire() as conn:
            await ensure_schema(conn, auto_migrate=settings.auto_migrate)
        # Alive as PostgreSQL sees it, before any claim: messages claimed by this process are judged
        # by this lock, never by Redis (worker/liveness.py).
        liveness = Liveness(settings.database_url, name)
        await liveness.hold()
        sessions_ref: list[AccountSessions] = []

        async def on_update(update: Update) -> None:
            await sessions_ref[0].on_update(update)

        metrics = create_metrics(settings.metrics_dir)  # this process's one Metrics (ops/metrics.py)
        backend = instrument_backend(create_backend(settings, on_update=on_update), metrics)
        sessions = AccountSessions(settings, pool, redis, backend, worker_name=name, metrics=metrics)
        sessions_ref.append(sessions)
        account_requests = AccountRequests(sessions, pool, redis)
        outbox = Outbox(pool, redis, log_length=settings.event_log_length, count_failure=metrics.message_failed)
        sender = Sender(sessions, outbox, pool)
        campaigns = CampaignRunner(sessions, sender, pool, redis)
        handlers: dict[str, JobHandler] = {SEND_MESSAGE: sender.send_message, RUN_CAMPAIGN: campaigns.run_campaign,
                                           STORE_INCOMING: sessions.incoming.store_incoming}
        webhooks = WebhookService(settings, pool, redis)
        handlers[DELIVER_WEBHOOK] = webhooks.deliver
        # RQ's max_jobs: the consumers together take that many jobs, then this child stops warm.
        budget = JobBudget(settings.worker_max_jobs) if settings.worker_max_jobs else None
        consumers = [
            QueueConsumer(redis, queue, worker=name, concurrency=settings.queue_concurrency[queue],
                          handlers=handlers, metrics=metrics, log_each_job=settings.log_each_job, budget=budget)
            for queue in QUEUE_NAMES
        ]
        await heartbeat(redis, name)
        # The previous incarnation of this slot is dead (the pool reaped it): its jobs go back now,
        # not when its heartbeat expires.
        await rescue_abandoned(redis, list(QUEUE_NAMES), dead=reaped)
        scheduler = Scheduler(redis, QUEUE_NAMES, owner=name)
        dead_leases = DeadLeases(pool, redis, self_identity=name)
        background = [
            asyncio.create_task(_every(3, lambda: heartbeat(redis, name), "heartbeat")),
            asyncio.create_task(liveness.keep(), name="liveness"),
            asyncio.create_task(scheduler.run(), name="scheduler"),
            asyncio.create_task(_every(3, lambda: _rescue(pool, redis, name), "rescue")),
            asyncio.create_task(_every(LEASE_RENEW_SECONDS, sessions.renew_leases, "leases")),
            asyncio.create_task(_every(ORPHAN_SCAN_SECONDS, sessions.resume_orphaned_accounts, "orphaned-accounts",
                                       first_after=ORPHAN_SCAN_SECONDS)),
            asyncio.create_task(_every(3, dead_leases.sweep, "dead-leases")),
            asyncio.create_task(_every(5, lambda: _publish_stats(redis, name, sessions), "stats")),
            asyncio.create_task(_every(2, lambda: settle_abandoned_sends(
                pool, outbox, sends_random_id=sender.sends_random_id, self_identity=name, redis=redis,
                unrecorded=sender.unrecorded), "abandoned-sends")),
            asyncio.create_task(_every(10, lambda: reconcile_outbox(pool, redis), "reconcile")),
            asyncio.create_task(_every(3, lambda: reconcile_campaigns(pool, redis, running_here=campaigns.active),
                                       "reconcile-campaigns")),
            asyncio.create_task(sessions.resume_ready_accounts()),
            asyncio.create_task(webhooks.listen(), name="webhook-events"),
            asyncio.create_task(_every(60, webhooks.sweep, "webhook-sweep")),
            # Incoming messages spooled to disk while Redis and PostgreSQL were both away.
            asyncio.create_task(_every(5, sessions.incoming.drain_spool, "incoming-spool")),
        ]
        serving = asyncio.create_task(account_requests.serve_requests(redis), name="account-requests")
        if parent_pid is not None:
            background.append(asyncio.create_task(_watch_parent(parent_pid, stop)))
        if budget is not None:
            background.append(asyncio.create_task(_recycle_after(budget, settings.worker_max_jobs, consumers, stop)))
        running = [asyncio.create_task(c.run(), name=f"consumer:{c.queue}") for c in consumers]
        log.info("worker child ready", queues={c.queue: c.concurrency for c in consumers})

        stop_wait: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stop_wait, *running], return_when=asyncio.FIRST_COMPLETED)
        crashed = False
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                crashed = True
                log.error("consumer crashed", error=repr(task.exception()))

        log.info("worker child stopping: finishing jobs in hand", deadline_s=settings.worker_drain_seconds)
        deadline = time.monotonic() + settings.worker_drain_seconds
        for consumer in consumers:
            consumer.stop()
        await asyncio.wait(running, timeout=2.0)
        cancelled = sum(await asyncio.gather(*(c.drain(deadline) for c in consumers)))
        # Account requests were answered while the jobs drained (the sessions are all still open);
        # now no new ones are taken, and those in hand are answered before the sessions close.
        account_requests.stop_taking_requests()
        await asyncio.wait([serving], timeout=max(0.0, deadline - time.monotonic()))
        await account_requests.finish_answers(deadline)
        # Cancelled again while one runs on: a cancellation lost inside redis-py or asyncpg (tasks.py)
        # would otherwise hold the child until the pool kills it.
        await cancel_and_wait([*background, *running, serving, stop_wait])
        with contextlib.suppress(TimeoutError):
            await sessions.aclose(time.monotonic() + CLOSE_SESSIONS_SECONDS)
        await webhooks.aclose()
        # Best effort: both expire by themselves, and a Redis that is away must not fail the stop.
        with contextlib.suppress(RedisError, OSError):
            await redis.delete(f"tp:worker:{name}", TDLIB_STATS_PREFIX + name)
            await account_requests.hand_back_requests(redis)
        await liveness.close()
        log.info("worker child stopped", cancelled_jobs=cancelled,
                 processed=sum(c.processed for c in consumers))
    # Non-zero: the pool restarts it with back-off; 0 (asked to stop, or recycled) at once.
    return 1 if crashed else 0


async def _rescue(pool: asyncpg.Pool, redis: Redis, name: str) -> int:
    """Jobs taken by workers that are gone go back to their queues: gone as PostgreSQL sees it (at
    once), or with an expired heartbeat. A job run twice is harmless (sends claim their rows)."""
    holders = await active_workers(redis, QUEUE_NAMES) - {name}
    dead = holders - await alive(pool, holders) if holders else set()
    return await rescue_abandoned(redis, list(QUEUE_NAMES), dead=dead)


async def _publish_stats(redis: Redis, name: str, sessions: AccountSessions) -> None:
    """What /api/tdlib/health and the metrics read; it expires if this process dies."""
    await redis.set(TDLIB_STATS_PREFIX + name, json.dumps(sessions.stats()), ex=15)


async def _recycle_after(budget: JobBudget, max_jobs: int, consumers: list[QueueConsumer],
                         stop: asyncio.Event) -> None:
    """RQ's `max_jobs`: once that many jobs are taken, let them finish and stop warm; the pool starts a
    fresh child at once."""
    await budget.spent.wait()
    while any(c.in_flight for c in consumers):  # noqa: ASYNC110 - lanes expose counts, not events
        await asyncio.sleep(0.05)
    log.info("worker child recycling: max jobs reached", max_jobs=max_jobs)
    stop.set()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # PDEATHSIG covers Linux; this covers a parent that vanished before prctl took effect.
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing to wait on but time
        await asyncio.sleep(1)
    log.warning("pool process gone, stopping")
    stop.set()


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="tp-worker-child")
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--reaped", action="append", default=[],
                        help="identity of a previous child of this slot, known dead")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(app_mode="worker")
    except ConfigError as exc:
        print(f"tp-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    # One identity per incarnation: a restarted child never inherits its predecessor's claims,
    # active jobs or leases by accident; they are judged dead or alive on their own.
    identity = f"{args.name}-{os.getpid()}"
    configure_logging(level=settings.log_level, fmt=settings.log_format, process=identity)
    try:
        return asyncio.run(run_child(settings, name=identity, parent_pid=args.parent_pid,
                                     reaped=tuple(args.reaped)))
    except ConfigError as exc:  # found at start, e.g. a schema behind the code (the pool restarts us)
        print(f"tp-worker: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

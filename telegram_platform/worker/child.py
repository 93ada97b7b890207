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

import structlog
from redis.asyncio import Redis

from ..logs import configure_logging
from ..ops.status import TDLIB_STATS_PREFIX
from ..queue.consumer import QueueConsumer, heartbeat, rescue_abandoned
from ..settings import QUEUE_NAMES, ConfigError, Settings
from ..storage.db import open_pool
from ..storage.migrations import migrate
from ..storage.redis import open_redis
from ..telegram.base import Update
from ..telegram.factory import create_backend
from .jobs import SEND_MESSAGE
from .reconciler import reconcile_outbox
from .telegram_host import TelegramHost

# Named explicitly: this module runs as __main__ in the child.
log = structlog.get_logger("telegram_platform.worker.child")

PR_SET_PDEATHSIG = 1
# Closing 1,000 TDLib clients takes 5-7 s on two cores (benchmarks/tdlib_clients.py).
CLOSE_SESSIONS_SECONDS = 12.0


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM us when the pool dies, even by SIGKILL: no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


async def _every(seconds: float, action: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        try:
            await action()
        except Exception:
            log.exception("periodic task failed", task=name)
        await asyncio.sleep(seconds)


async def run_child(settings: Settings, *, name: str, parent_pid: int | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    structlog.contextvars.bind_contextvars(worker=name)
    log.info("worker child starting", telegram_backend=settings.telegram_backend)

    async with open_pool(settings) as pool, open_redis(settings.redis_url) as redis:
        if settings.auto_migrate:
            async with pool.acquire() as conn:
                await migrate(conn)
        host_ref: list[TelegramHost] = []

        async def on_update(update: Update) -> None:
            await host_ref[0].on_update(update)

        backend = create_backend(settings, on_update=on_update)
        host = TelegramHost(settings, pool, redis, backend, worker_name=name)
        host_ref.append(host)
        handlers = {SEND_MESSAGE: host.send_message}
        consumers = [
            QueueConsumer(redis, queue, worker=name, concurrency=settings.queue_concurrency[queue],
                          handlers=handlers)
            for queue in QUEUE_NAMES
        ]
        await heartbeat(redis, name)
        background = [
            asyncio.create_task(_every(3, lambda: heartbeat(redis, name), "heartbeat")),
            asyncio.create_task(_every(5, lambda: rescue_abandoned(redis, list(QUEUE_NAMES)), "rescue")),
            asyncio.create_task(_every(5, host.renew_leases, "leases")),
            asyncio.create_task(_every(5, lambda: _publish_stats(redis, name, host), "stats")),
            asyncio.create_task(_every(10, lambda: reconcile_outbox(pool, redis), "reconcile")),
            asyncio.create_task(host.serve_requests(redis)),
            asyncio.create_task(host.resume_ready_accounts()),
        ]
        if parent_pid is not None:
            background.append(asyncio.create_task(_watch_parent(parent_pid, stop)))
        running = [asyncio.create_task(c.run(), name=f"consumer:{c.queue}") for c in consumers]
        log.info("worker child ready", queues={c.queue: c.concurrency for c in consumers})

        stop_wait: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stop_wait, *running], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop_wait and task.exception() is not None:
                log.error("consumer crashed", error=repr(task.exception()))

        log.info("worker child stopping: finishing jobs in hand", deadline_s=settings.worker_drain_seconds)
        deadline = time.monotonic() + settings.worker_drain_seconds
        for consumer in consumers:
            consumer.stop()
        await asyncio.wait(running, timeout=2.0)
        cancelled = sum(await asyncio.gather(*(c.drain(deadline) for c in consumers)))
        for task in [*background, *running, stop_wait]:
            task.cancel()
        await asyncio.gather(*background, *running, stop_wait, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await host.aclose(time.monotonic() + CLOSE_SESSIONS_SECONDS)
        await redis.delete(f"tp:worker:{name}", TDLIB_STATS_PREFIX + name)
        log.info("worker child stopped", cancelled_jobs=cancelled,
                 processed=sum(c.processed for c in consumers))
    return 0


async def _publish_stats(redis: Redis, name: str, host: TelegramHost) -> None:
    """What /api/tdlib/health and the metrics read; it expires if this process dies."""
    await redis.set(TDLIB_STATS_PREFIX + name, json.dumps(host.stats()), ex=15)


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
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(app_mode="worker")
    except ConfigError as exc:
        print(f"tp-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(level=settings.log_level, fmt=settings.log_format, process=args.name)
    return asyncio.run(run_child(settings, name=args.name, parent_pid=args.parent_pid))


if __name__ == "__main__":
    sys.exit(main())

"""Webhook health: one slow receiver cannot take the others' slots (a per-webhook limit across
workers, whose leases expire), and a receiver failing for long is paused by its circuit breaker,
its deliveries held, then probed and resumed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import free_port
from support import WorkerProcess, eventually

from telegram_platform import events, redis_keys
from telegram_platform.queue.consumer import JobContext, Retry
from telegram_platform.queue.jobs import JOB_PREFIX, Enqueuer, queue_key
from telegram_platform.queue.registry import DELIVER_WEBHOOK, WEBHOOK_QUEUE, webhook_delivery_job_id
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.storage import webhooks as store
from telegram_platform.worker.webhooks import WebhookService, record_and_enqueue


@dataclass
class Receiver:
    """An HTTP endpoint that records when each request came, how many were in flight at most, and
    answers after `delay` seconds with the statuses queued for it (200 once they run out)."""

    url: str
    delay: float = 0.0
    statuses: list[int] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0


async def _serve(state: Receiver, port: int) -> web.AppRunner:
    async def hook(request: web.Request) -> web.Response:
        await request.read()
        state.arrived.append(time.monotonic())
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            await asyncio.sleep(state.delay)
        finally:
            state.in_flight -= 1
        return web.Response(status=state.statuses.pop(0) if state.statuses else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """Two receivers on loopback: the first for a test to make slow or failing, the second healthy."""
    ports = free_port(), free_port()
    states = tuple(Receiver(f"http://127.0.0.1:{port}/hook") for port in ports)
    runners = [await _serve(state, port) for state, port in zip(states, ports, strict=True)]
    yield cast(tuple[Receiver, Receiver], states)
    for runner in runners:
        await runner.cleanup()


async def _hook(settings: Settings, db: asyncpg.Pool, url: str) -> int:
    sealed = store.seal_secret(settings.encryption_key, "k" * 32)
    hook = await store.create_webhook(db, url=url, events=["*"], sealed_secret=sealed, description="",
                                      active=True, created_by=None)
    return int(hook["id"])


async def _record(db: asyncpg.Pool, redis: aioredis.Redis, webhook_id: int, n: int) -> list[int]:
    """`n` deliveries of distinct events to the webhook, recorded and enqueued as the dispatcher does."""
    ids = []
    for i in range(n):
        event = {"type": "webhook.test", "data": {"n": i}, "ts": time.time()}
        delivery_id = await record_and_enqueue(db, Enqueuer(redis), webhook_id,
                                               json.dumps([webhook_id, i, time.time()]).encode(), "webhook.test",
                                               event)
        assert delivery_id is not None
        ids.append(delivery_id)
    return ids


async def test_a_slow_receiver_does_not_hold_back_the_others(
    settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, platform_env: dict[str, str],
    receivers: tuple[Receiver, Receiver],
) -> None:
    """With a receiver that takes seconds to answer, at most TP_WEBHOOK_CONCURRENCY of its deliveries
    are in flight, and a healthy webhook's deliveries arrive at once instead of queueing behind them;
    the slow one's deferred jobs count no attempt."""
    slow, healthy = receivers
    slow.delay = 4.0
    slow_hook, healthy_hook = await _hook(settings, db, slow.url), await _hook(settings, db, healthy.url)
    worker = WorkerProcess.start({**platform_env, "TP_WEBHOOK_CONCURRENCY": "2",
                                  "TP_QUEUE_CONCURRENCY_DEFAULT": "5"})
    try:
        slow_ids = await _record(db, redis, slow_hook, 6)

        async def slow_started() -> bool:
            return slow.in_flight == 2

        await eventually(slow_started, timeout=30)
        sent_at = time.monotonic()
        await _record(db, redis, healthy_hook, 4)

        async def all_healthy_arrived() -> bool:
            return len(healthy.arrived) == 4

        await eventually(all_healthy_arrived, timeout=15)
        assert max(healthy.arrived) - sent_at < 2.0, "the healthy webhook waited for the slow one"
        assert slow.in_flight <= 2

        async def slow_delivered() -> bool:
            return bool(await db.fetchval(
                "SELECT bool_and(status = 'delivered') FROM webhook_deliveries WHERE webhook_id = $1", slow_hook))

        await eventually(slow_delivered, timeout=40)
        assert slow.most_in_flight == 2
        attempts = await db.fetch("SELECT attempts FROM webhook_deliveries WHERE id = ANY($1)", slow_ids)
        assert [r["attempts"] for r in attempts] == [1] * 6
    finally:
        worker.stop()


def _with(settings: Settings, **webhooks: Any) -> Settings:
    return dataclasses.replace(settings, webhooks=dataclasses.replace(settings.webhooks, **webhooks))


def _ctx(delivery_id: int) -> JobContext:
    return JobContext(webhook_delivery_job_id(delivery_id), WEBHOOK_QUEUE, DELIVER_WEBHOOK)


async def test_a_full_webhook_defers_its_jobs_and_a_dead_workers_slot_comes_back(
    settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth,
    receivers: tuple[Receiver, Receiver],
) -> None:
    """A delivery finding its webhook's slots taken is put back with a growing delay, not attempted;
    a slot whose lease expired (its worker died) is taken back, and the delivery goes."""
    receiver, _ = receivers
    service = WebhookService(_with(settings, concurrency=1), db, redis, redis_auth)
    try:
        hook = await _hook(settings, db, receiver.url)
        (delivery_id,) = await _record(db, redis, hook, 1)
        slots = redis_keys.webhook_slots(hook)
        (server_seconds, _) = await redis.time()
        await redis.zadd(slots, {"another-worker": (server_seconds + 60) * 1000})
        delays = []
        for _ in range(3):
            with pytest.raises(Retry) as deferred:
                await service.deliver(_ctx(delivery_id), delivery_id)
            delays.append(deferred.value.delay)
        assert delays[0] < delays[1] < delays[2]
        row = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries WHERE id = $1", delivery_id)
        assert (row["status"], row["attempts"]) == ("pending", 0) and receiver.arrived == []

        await redis.zadd(slots, {"another-worker": (server_seconds - 1) * 1000})  # its lease ran out
        await service.deliver(_ctx(delivery_id), delivery_id)
        row = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries WHERE id = $1", delivery_id)
        assert (row["status"], row["attempts"]) == ("delivered", 1) and len(receiver.arrived) == 1
        assert await redis.zcard(slots) == 0  # its own slot given back
        assert await redis.hget(JOB_PREFIX + webhook_delivery_job_id(delivery_id), "webhook_deferrals") is None
    finally:
        await service.aclose()


async def _events(redis: aioredis.Redis, auth: RedisAuth, event_type: str) -> list[dict[str, Any]]:
    found = []
    async for _, text in events.log_after(redis, auth, "0-0", 500):
        event = json.loads(text)
        if event["type"] == event_type:
            found.append(event["data"])
    return found


async def _true(value: bool) -> bool:
    return value


async def _jobs_ran(redis: aioredis.Redis, delivery_ids: list[int]) -> None:
    """The deliveries' jobs as a worker leaves them once run: off the queue, their hashes gone."""
    await redis.delete(queue_key(WEBHOOK_QUEUE), *[JOB_PREFIX + webhook_delivery_job_id(i) for i in delivery_ids])


async def _fail(service: WebhookService, delivery_id: int) -> None:
    with pytest.raises(Retry):
        await service.deliver(_ctx(delivery_id), delivery_id)


async def test_a_receiver_failing_for_long_is_paused_probed_and_resumed(
    settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth,
    receivers: tuple[Receiver, Receiver],
) -> None:
    """After N failures in a row the breaker opens (`webhook.paused`, stored in the row); deliveries
    are then held (pending, no attempt); after the cool-down one probe goes, and its failure opens
    the breaker again; a probe's success closes it (`webhook.resumed`) and the held ones are sent."""
    receiver, _ = receivers
    service = WebhookService(_with(settings, breaker_failures=3, breaker_seconds=0.0,
                                   breaker_cooldown_seconds=1.0, retry_seconds=60.0), db, redis,
                             redis_auth)
    try:
        hook = await _hook(settings, db, receiver.url)
        ids = await _record(db, redis, hook, 6)
        await _jobs_ran(redis, ids)
        receiver.statuses = [500] * 4
        for delivery_id in ids[:2]:
            await _fail(service, delivery_id)
        assert (await store.get_webhook(db, hook))["breaker"]["state"] == "closed"
        await _fail(service, ids[2])
        breaker = (await store.get_webhook(db, hook))["breaker"]
        assert breaker["state"] == "open" and breaker["consecutive_failures"] == 3 and breaker["paused_at"]
        (paused,) = await _events(redis, redis_auth, events.WEBHOOK_PAUSED)
        assert paused["webhook_id"] == hook and paused["consecutive_failures"] == 3

        await service.deliver(_ctx(ids[3]), ids[3])  # held: no request, no attempt, still pending
        assert len(receiver.arrived) == 3
        row = await db.fetchrow("SELECT status, attempts FROM webhook_deliveries WHERE id = $1", ids[3])
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert await service.sweep() == 0  # held deliveries are not the sweep's

        # The cool-down over, the oldest pending delivery is the probe; it fails: open again.
        await asyncio.sleep(1.1)
        assert await service.breakers() == (1, 0)
        assert await redis.lrange(queue_key(WEBHOOK_QUEUE), 0, -1) == [webhook_delivery_job_id(ids[0]).encode()]
        assert (await store.get_webhook(db, hook))["breaker"]["state"] == "half_open"
        receiver.delay = 0.5
        probe = asyncio.create_task(_fail(service, ids[0]))
        await eventually(lambda: _true(len(receiver.arrived) == 4))
        await service.deliver(_ctx(ids[3]), ids[3])  # not the probe: held while it is tried
        await probe
        receiver.delay = 0.0
        assert len(receiver.arrived) == 4
        assert (await store.get_webhook(db, hook))["breaker"]["state"] == "open"
        assert len(await _events(redis, redis_auth, events.WEBHOOK_PAUSED)) == 1  # paused once, not again

        # The next probe succeeds: closed, resumed, and every held delivery enqueued again.
        await _jobs_ran(redis, ids)
        await asyncio.sleep(1.1)
        assert await service.breakers() == (1, 0)
        await service.deliver(_ctx(ids[0]), ids[0])
        breaker = (await store.get_webhook(db, hook))["breaker"]
        assert breaker["state"] == "closed" and breaker["consecutive_failures"] == 0
        (resumed,) = await _events(redis, redis_auth, events.WEBHOOK_RESUMED)
        assert resumed == {"webhook_id": hook, "by": "probe"}
        await _jobs_ran(redis, ids)
        assert await service.breakers() == (0, 5)
        queued = await redis.lrange(queue_key(WEBHOOK_QUEUE), 0, -1)
        assert queued == [webhook_delivery_job_id(i).encode() for i in ids[1:]]
        assert await service.breakers() == (0, 0)  # released once
    finally:
        await service.aclose()


async def test_failures_must_span_the_breakers_time_to_pause(
    settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth,
    receivers: tuple[Receiver, Receiver],
) -> None:
    """Many failures in a burst shorter than TP_WEBHOOK_BREAKER_SECONDS do not pause a webhook, and a
    success in between starts the count again."""
    receiver, _ = receivers
    service = WebhookService(_with(settings, breaker_failures=2, breaker_seconds=3600.0, retry_seconds=60.0),
                             db, redis, redis_auth)
    try:
        hook = await _hook(settings, db, receiver.url)
        ids = await _record(db, redis, hook, 6)
        receiver.statuses = [500] * 4
        for delivery_id in ids[:4]:
            await _fail(service, delivery_id)
        breaker = (await store.get_webhook(db, hook))["breaker"]
        assert breaker["state"] == "closed" and breaker["consecutive_failures"] == 4
        await service.deliver(_ctx(ids[4]), ids[4])
        breaker = (await store.get_webhook(db, hook))["breaker"]
        assert breaker["consecutive_failures"] == 0 and breaker["failing_since"] is None
        assert await _events(redis, redis_auth, events.WEBHOOK_PAUSED) == []
    finally:
        await service.aclose()

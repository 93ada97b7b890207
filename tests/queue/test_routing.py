"""Routing sends to hosts (queue/routing.py) against the real PostgreSQL and Redis: owners found from
leases and `accounts.owner_host`, moved jobs, dead hosts' queues handed back, loads and shares, the
routes campaign runners ask for and their member jobs enqueued once."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import redis.asyncio as aioredis
from support import eventually

from telegram_platform.ops.status import queue_status
from telegram_platform.queue import routing
from telegram_platform.queue.consumer import ROUTE_HOPS_FIELD, JobContext, Moved, QueueConsumer
from telegram_platform.queue.jobs import JOB_PREFIX, QUEUES_SET, Enqueuer, decode_job_data, queue_key, scheduled_key
from telegram_platform.queue.registry import CAMPAIGNS_QUEUE, MESSAGES_QUEUE, campaign_job_id, host_queue, queue_host
from telegram_platform.queue.scheduler import Scheduler
from telegram_platform.redis_keys import account_lease, host_alive


async def _account(db: asyncpg.Pool, phone: str, owner_host: str | None = None) -> int:
    return int(await db.fetchval("INSERT INTO accounts (phone, owner_host) VALUES ($1, $2) RETURNING id",
                                 phone, owner_host))


async def test_owner_is_the_live_lease_holders_host_else_the_stored_one_else_none(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """A lease held by a live host's process names that host; a dead host's lease names nobody but
    how long it still holds; without a lease a live `owner_host` counts, a dead one does not."""
    leased = await _account(db, "+9996600001")
    stored = await _account(db, "+9996600002", owner_host="host-b")
    stale = await _account(db, "+9996600003", owner_host="host-c")
    await routing.mark_alive(redis, "host-a")
    await routing.mark_alive(redis, "host-b")
    await redis.set(account_lease(leased), "host-a/tp-worker-w0-123|7", px=5000)
    assert await routing.find_owner(redis, db, leased) == routing.Owner("host-a")
    assert await routing.find_owner(redis, db, stored) == routing.Owner("host-b")
    assert await routing.find_owner(redis, db, stale) == routing.Owner(None)
    await redis.delete(host_alive("host-a"))
    dead = await routing.find_owner(redis, db, leased)
    assert dead.host is None and 4.0 < dead.expires_in <= 5.0

    enqueuer = Enqueuer(redis)
    assert await routing.enqueue_send(enqueuer, redis, db, 11, stored) == host_queue(MESSAGES_QUEUE, "host-b")
    assert await routing.enqueue_send(enqueuer, redis, db, 12, stale) == MESSAGES_QUEUE
    assert await redis.lrange(queue_key("messages@host-b"), 0, -1) == [b"msg-11"]
    assert await redis.lrange(queue_key(MESSAGES_QUEUE), 0, -1) == [b"msg-12"]
    assert queue_host("messages@host-b") == "host-b" and queue_host(MESSAGES_QUEUE) is None


async def test_a_moved_job_goes_to_its_queue_as_it_is_counted_as_a_hop_not_a_failure(
        redis: aioredis.Redis, clean_redis: str) -> None:
    """A handler raising Moved puts the job, still queued, on the named queue with one hop more; the
    consumer records no failure and no finish for it."""
    job_id = await Enqueuer(redis).enqueue(MESSAGES_QUEUE, "tests.job", [1, 2])
    seen: list[str] = []

    async def job(ctx: JobContext, *_: int) -> None:
        seen.append(ctx.queue)
        raise Moved("messages@host-b")

    consumer = QueueConsumer(redis, MESSAGES_QUEUE, worker="host-a/w-1", concurrency=1, handlers={"tests.job": job})
    task = asyncio.create_task(consumer.run())
    try:
        await eventually(lambda: redis.llen(queue_key("messages@host-b")))
    finally:
        consumer.stop()
        await consumer.drain(time.monotonic() + 2)
        task.cancel()
    assert seen == [MESSAGES_QUEUE] and consumer.failed == 0 and consumer.processed == 0
    fields = await redis.hmget(JOB_PREFIX + job_id, ["status", "origin", ROUTE_HOPS_FIELD])
    assert fields == [b"queued", b"messages@host-b", b"1"]
    assert await redis.sismember(QUEUES_SET, queue_key("messages@host-b"))
    assert await redis.llen(queue_key(MESSAGES_QUEUE)) == 0


async def test_a_dead_hosts_queued_and_scheduled_jobs_go_back_to_the_shared_queue(
        redis: aioredis.Redis, clean_redis: str) -> None:
    """Jobs queued and scheduled for a host that is no longer alive move to the shared queue and
    scheduled set (in order, keeping their times); a live host's and this host's own stay."""
    enqueuer = Enqueuer(redis)
    dead, live, own = (host_queue(MESSAGES_QUEUE, h) for h in ("host-dead", "host-live", "host-me"))
    for i in range(3):
        await enqueuer.enqueue(dead, "tests.job", [i], job_id=f"d{i}")
    later = time.time() + 60
    await enqueuer.enqueue(dead, "tests.job", [9], job_id="d9", at=later)
    await enqueuer.enqueue(live, "tests.job", [0], job_id="l0")
    await enqueuer.enqueue(own, "tests.job", [0], job_id="o0")
    await routing.mark_alive(redis, "host-live")
    assert await routing.host_queues(redis) == [dead, live, own]
    # Each host's queue is listed beside the shared ones (GET /api/health; tp_queue_* metrics alike).
    assert (await queue_status(redis))["queues"][dead] == {"depth": 3, "scheduled": 1, "failed": 0}

    assert await routing.hand_back_dead_host_queues(redis, "host-me") == 4
    assert await redis.lrange(queue_key(MESSAGES_QUEUE), 0, -1) == [b"d0", b"d1", b"d2"]
    assert await redis.zrange(scheduled_key(MESSAGES_QUEUE), 0, -1, withscores=True) == [(b"d9", later)]
    assert await redis.llen(queue_key(dead)) == 0 and await redis.zcard(scheduled_key(dead)) == 0
    assert await redis.lrange(queue_key(live), 0, -1) == [b"l0"]
    assert await redis.lrange(queue_key(own), 0, -1) == [b"o0"]


async def test_the_scheduler_promotes_a_hosts_due_retries_back_to_that_hosts_queue(
        redis: aioredis.Redis, clean_redis: str) -> None:
    """A retry scheduled on a host's queue comes back on that host's queue, not the shared one."""
    queue = host_queue(MESSAGES_QUEUE, "host-a")
    await Enqueuer(redis).enqueue(queue, "tests.job", [1], job_id="r1", at=time.time() + 0.2)
    scheduler = Scheduler(redis, [MESSAGES_QUEUE], owner="test")
    await eventually(lambda: scheduler.tick(), timeout=5)
    assert await redis.lrange(queue_key(queue), 0, -1) == [b"r1"]
    assert await redis.llen(queue_key(MESSAGES_QUEUE)) == 0


async def test_loads_count_live_undrained_hosts_and_orphans_are_shared_fairly(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """Only hosts up in PostgreSQL, not draining and alive in Redis are candidates, with the accounts
    each owns; the least loaded is chosen, and each host's share of orphans levels the loads."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-a'), ('host-b'), ('host-c'), ('host-d')")
    await db.execute("UPDATE hosts SET draining_since = now() WHERE id = 'host-c'")
    for i in range(3):
        await _account(db, f"+99966001{i:02d}", owner_host="host-a")
    await _account(db, "+9996600200", owner_host="host-b")
    for host in ("host-a", "host-b", "host-c"):  # host-d: up in PostgreSQL, not alive in Redis
        await routing.mark_alive(redis, host)
    loads = await routing.host_loads(db, redis, gone_after=30)
    assert loads == {"host-a": 3, "host-b": 1}
    assert routing.least_loaded(loads) == "host-b" and routing.least_loaded({}) is None
    # 6 orphans: the two hosts would hold 10, 5 each, so host-b opens 4 and host-a 2.
    assert (routing.orphan_share(loads, "host-b", 6), routing.orphan_share(loads, "host-a", 6)) == (4, 2)
    assert routing.orphan_share(loads, "host-a", 1) == 0  # host-a is above its share: host-b takes it
    assert routing.orphan_share({}, "host-new", 5) == 5
    ids = list(range(1, 21))
    assert sorted(routing.spread(ids, "host-a")) == ids
    assert routing.spread(ids, "host-a") != routing.spread(ids, "host-b")


async def test_a_router_routes_an_account_to_where_it_is_open_owned_or_placed(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """`own_queue` is this host's routed queue; `route` answers it for an account open here (no round
    trip), the owner's queue for one a live host holds, None with the wait for one a dead host's lease
    still holds, and the least-loaded host's queue for one nobody holds."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-me'), ('host-b')")
    open_here = await _account(db, "+9996600301")
    owned = await _account(db, "+9996600302", owner_host="host-b")
    dead = await _account(db, "+9996600303")
    orphan = await _account(db, "+9996600304")
    for phone in ("+9996600305", "+9996600306"):  # host-me owns more: host-b is the less loaded
        await _account(db, phone, owner_host="host-me")
    for host in ("host-me", "host-b"):
        await routing.mark_alive(redis, host)
    await redis.set(account_lease(dead), "host-gone/tp-worker-w0-9|3", px=4000)
    router = routing.SendRouter(redis, db, "host-me", gone_after=30, hosted_here=lambda a: a == open_here)
    assert router.own_queue(CAMPAIGNS_QUEUE) == host_queue(CAMPAIGNS_QUEUE, "host-me")
    assert await router.route(CAMPAIGNS_QUEUE, open_here) == routing.Route("campaigns@host-me")
    assert (await router.route(CAMPAIGNS_QUEUE, owned)).queue == "campaigns@host-b"
    waiting = await router.route(CAMPAIGNS_QUEUE, dead)
    assert waiting.queue is None and 3.0 < waiting.wait <= 4.0
    assert (await router.route(MESSAGES_QUEUE, orphan)).queue == "messages@host-b"


async def test_a_job_enqueued_unless_live_is_queued_once_until_it_has_finished(
        redis: aioredis.Redis, clean_redis: str) -> None:
    """Asked again while its job is queued, scheduled or started, `enqueue_unless_live` adds nothing;
    once the job finished (or failed) it is enqueued anew, as a fresh job. A member's job id is one
    RQ accepts, and differs per queue."""
    enqueuer = Enqueuer(redis)
    queue = host_queue(CAMPAIGNS_QUEUE, "host-a")
    job_id = campaign_job_id(7, queue)
    assert job_id == "campaign-7_campaigns_40host-a" != campaign_job_id(7, host_queue(CAMPAIGNS_QUEUE, "host-b"))
    assert campaign_job_id(7) == "campaign-7"
    assert await enqueuer.enqueue_unless_live(queue, "tests.job", [7], job_id=job_id)
    for status in ("queued", "scheduled", "started"):
        await redis.hset(JOB_PREFIX + job_id, "status", status)
        assert not await enqueuer.enqueue_unless_live(queue, "tests.job", [7], job_id=job_id), status
    assert await redis.lrange(queue_key(queue), 0, -1) == [job_id.encode()]
    await redis.delete(queue_key(queue))
    await redis.hset(JOB_PREFIX + job_id, mapping={"status": "finished", ROUTE_HOPS_FIELD: 2})
    assert await enqueuer.enqueue_unless_live(queue, "tests.job", [7], job_id=job_id)
    assert await redis.lrange(queue_key(queue), 0, -1) == [job_id.encode()]
    assert await redis.hget(JOB_PREFIX + job_id, "status") == b"queued"
    assert await redis.hget(JOB_PREFIX + job_id, ROUTE_HOPS_FIELD) is None  # a fresh job
    assert await redis.sismember(QUEUES_SET, queue_key(queue))
    func, args = decode_job_data(await redis.hget(JOB_PREFIX + job_id, "data"))
    assert (func, args) == ("tests.job", [7])

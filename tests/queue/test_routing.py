"""Routing sends to hosts (queue/routing.py) against the real PostgreSQL and Redis: owners found from
leases and `accounts.owner_host`, moved jobs, dead hosts' queues handed back, loads and shares, the
routes campaign runners ask for and their member jobs enqueued once."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import eventually

from telegram_platform.ops.status import queue_status
from telegram_platform.queue import routing
from telegram_platform.queue.consumer import ROUTE_HOPS_FIELD, JobContext, Moved, QueueConsumer, Retry
from telegram_platform.queue.jobs import JOB_PREFIX, QUEUES_SET, Enqueuer, decode_job_data, queue_key, scheduled_key
from telegram_platform.queue.registry import CAMPAIGNS_QUEUE, MESSAGES_QUEUE, campaign_job_id, host_queue, queue_host
from telegram_platform.queue.scheduler import Scheduler
from telegram_platform.redis_keys import account_lease, slot_alive


async def _account(db: asyncpg.Pool, phone: str, owner_host: str | None = None) -> int:
    return int(await db.fetchval("INSERT INTO accounts (phone, owner_host) VALUES ($1, $2) RETURNING id",
                                 phone, owner_host))


async def test_owner_is_the_live_lease_holders_child_else_the_stored_hosts_least_loaded_child_else_none(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """A lease held by its slot's live child names that child (and its host); a lease whose holder is
    not its slot's live child (dead, or replaced by a new child of the slot) names nobody but how long
    it still holds; without a lease a live `owner_host` counts, with its least-loaded live child, a
    dead one does not. Sends are enqueued on the owner child's queue."""
    leased = await _account(db, "+9996600001")
    stored = await _account(db, "+9996600002", owner_host="host-b")
    stale = await _account(db, "+9996600003", owner_host="host-c")
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w1-123", hosted=4)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w0-7", hosted=3)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w1-8", hosted=1)
    await redis.set(account_lease(leased), "host-a/tp-worker-w1-123|7", px=5000)
    assert await routing.find_owner(redis, db, leased) == routing.Owner("host-a", member="host-a/tp-worker-w1")
    assert await routing.find_owner(redis, db, stored) == routing.Owner("host-b", member="host-b/tp-worker-w1")
    assert await routing.find_owner(redis, db, stale) == routing.Owner(None)
    # The slot's child restarted (a new pid): the old one's lease is a dead holder's.
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w1-124")
    dead = await routing.find_owner(redis, db, leased)
    assert dead.host is None and dead.member is None and 4.0 < dead.expires_in <= 5.0
    await redis.delete(slot_alive("host-a/tp-worker-w1"))
    assert (await routing.find_owner(redis, db, leased)).member is None

    enqueuer = Enqueuer(redis)
    assert await routing.enqueue_send(enqueuer, redis, db, 11, stored) == "messages@host-b/tp-worker-w1"
    assert await routing.enqueue_send(enqueuer, redis, db, 12, stale) == MESSAGES_QUEUE
    assert await redis.lrange(queue_key("messages@host-b/tp-worker-w1"), 0, -1) == [b"msg-11"]
    assert await redis.lrange(queue_key(MESSAGES_QUEUE), 0, -1) == [b"msg-12"]
    assert queue_host("messages@host-b/tp-worker-w1") == "host-b/tp-worker-w1" and queue_host(MESSAGES_QUEUE) is None
    assert routing.owner_queue("campaigns", routing.Owner("host-b", member="host-b/tp-worker-w0")) == \
        "campaigns@host-b/tp-worker-w0"
    # A child stopping on purpose is no longer alive; a stale identity cannot remove its successor's key.
    await routing.mark_gone(redis, "host-b/tp-worker-w1-7")
    assert await redis.get(slot_alive("host-b/tp-worker-w1")) == b"host-b/tp-worker-w1-8"
    await routing.mark_gone(redis, "host-b/tp-worker-w1-8")
    assert await routing.find_owner(redis, db, stored) == routing.Owner("host-b", member="host-b/tp-worker-w0")


def test_slots_are_named_by_host_instance_and_index_and_identities_map_back() -> None:
    """A pool's slots start with the host id; an identity (`<slot>-<pid>`) maps to its slot and host;
    a slot knows its pool's other slots (just itself when it is not named like a pool's)."""
    slots = routing.slot_names("edge-1", "tp:worker", 2)
    assert slots == ["edge-1/tp-worker-w0", "edge-1/tp-worker-w1"]
    assert routing.slot_of("edge-1/tp-worker-w1-4242") == "edge-1/tp-worker-w1"
    assert routing.host_of("edge-1/tp-worker-w1") == "edge-1"
    assert routing.sibling_slots("edge-1/tp-worker-w1", 2) == slots
    assert routing.sibling_slots("edge-1/tp-worker-w3", 2) == ["edge-1/tp-worker-w3"]
    assert routing.sibling_slots("edge-1/anything", 2) == ["edge-1/anything"]


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
    """Jobs queued and scheduled for a child (slot) that is no longer alive, or on a per-host queue
    (nobody consumes those), move to the shared queue and scheduled set (in order, keeping their
    times); a live child's and the caller's own stay."""
    enqueuer = Enqueuer(redis)
    dead, live, own = (host_queue(MESSAGES_QUEUE, m) for m in ("h1/tp-worker-w1", "h1/tp-worker-w2", "h1/tp-worker-w0"))
    legacy = host_queue(MESSAGES_QUEUE, "h2")
    for i in range(3):
        await enqueuer.enqueue(dead, "tests.job", [i], job_id=f"d{i}")
    later = time.time() + 60
    await enqueuer.enqueue(dead, "tests.job", [9], job_id="d9", at=later)
    await enqueuer.enqueue(legacy, "tests.job", [3], job_id="h3")
    await enqueuer.enqueue(live, "tests.job", [0], job_id="l0")
    await enqueuer.enqueue(own, "tests.job", [0], job_id="o0")
    await routing.mark_alive(redis, "h1", identity="h1/tp-worker-w2-55")
    await routing.mark_alive(redis, "h2")
    assert await routing.host_queues(redis) == [own, dead, live, legacy]
    # Each child's queue is listed beside the shared ones (GET /api/health; tp_queue_* metrics alike).
    assert (await queue_status(redis))["queues"][dead] == {"depth": 3, "scheduled": 1, "failed": 0}

    assert await routing.hand_back_dead_host_queues(redis, "h1/tp-worker-w0") == 5
    assert await redis.lrange(queue_key(MESSAGES_QUEUE), 0, -1) == [b"d0", b"d1", b"d2", b"h3"]
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


async def test_accounts_nobody_owns_go_to_the_least_loaded_child_of_the_least_loaded_host(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """Children's loads are what their heartbeats publish, live children of live hosts only; a send
    is placed on the least-loaded child of the least-loaded host (PostgreSQL's count), not on the
    least-loaded child anywhere; orphans are shared per child."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-a'), ('host-b')")
    for i in range(4):
        await _account(db, f"+99966003{i:02d}", owner_host="host-a")
    await _account(db, "+9996600400", owner_host="host-b")
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w0-1", hosted=0)  # least loaded child
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w1-2", hosted=4)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w0-3", hosted=1)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w1-4", hosted=0)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w2-5", hosted=9)
    await redis.delete(slot_alive("host-b/tp-worker-w2"))  # a dead child: not a candidate
    loads = await routing.member_loads(db, redis, gone_after=30)
    assert loads == {"host-a/tp-worker-w0": 0, "host-a/tp-worker-w1": 4,
                     "host-b/tp-worker-w0": 1, "host-b/tp-worker-w1": 0}
    assert await routing.place(db, redis, gone_after=30) == "host-b/tp-worker-w1"
    # 5 orphans over 4 children holding 5: 10 in all, so at most 3 each.
    shares = {slot: routing.orphan_share(loads, slot, 5) for slot in loads}
    assert shares == {"host-a/tp-worker-w0": 3, "host-a/tp-worker-w1": 0,
                      "host-b/tp-worker-w0": 2, "host-b/tp-worker-w1": 3}


async def test_a_send_for_a_siblings_account_is_moved_to_the_siblings_queue_not_attempted(
        db: asyncpg.Pool, redis: aioredis.Redis, clean_redis: str) -> None:
    """Two children of one host: a send taken by w0 for an account w1 holds is moved to w1's queue;
    one for an account w0 holds is w0's; one whose holder died waits for its lease (a Retry); one
    for an account nobody owns is placed on the least-loaded child (w0 here: it stays)."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-a')")
    held_by_w1, held_by_w0, dead_holder, nobodys = [await _account(db, f"+99966005{i:02d}") for i in range(4)]
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w0-10", hosted=1)
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w1-11", hosted=1)
    await redis.set(account_lease(held_by_w1), "host-a/tp-worker-w1-11|1", px=5000)
    await redis.set(account_lease(held_by_w0), "host-a/tp-worker-w0-10|1", px=5000)
    await redis.set(account_lease(dead_holder), "host-a/tp-worker-w0-9|1", px=5000)  # w0's previous child
    router = routing.SendRouter(redis, db, "host-a", member="host-a/tp-worker-w0", gone_after=30,
                                hosted_here=lambda _: False)
    assert router.own_queue(MESSAGES_QUEUE) == "messages@host-a/tp-worker-w0"
    ctx = JobContext(job_id="msg-1", queue=router.own_queue(MESSAGES_QUEUE), func="send")
    with pytest.raises(Moved) as moved:
        await router.check(ctx, 1, held_by_w1)
    assert moved.value.queue == "messages@host-a/tp-worker-w1"
    await router.check(ctx, 2, held_by_w0)  # returns: this child's to make
    with pytest.raises(Retry) as retry:
        await router.check(ctx, 3, dead_holder)
    assert 4.0 < retry.value.delay <= 5.2
    await router.check(ctx, 4, nobodys)  # placed here: w0 and w1 hold one each, w0 sorts first


async def test_a_router_routes_an_account_to_where_it_is_open_owned_or_placed(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """`own_queue` is this child's routed queue; `route` answers it for an account open here (no round
    trip), the holder child's queue for one a live child holds, None with the wait for one a dead
    process's lease still holds, and the least-loaded host's least-loaded child's queue for one nobody
    holds."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-me'), ('host-b')")
    open_here = await _account(db, "+9996600301")
    owned = await _account(db, "+9996600302", owner_host="host-b")
    dead = await _account(db, "+9996600303")
    orphan = await _account(db, "+9996600304")
    for phone in ("+9996600305", "+9996600306"):  # host-me owns more: host-b is the less loaded
        await _account(db, phone, owner_host="host-me")
    for host in ("host-me", "host-b"):
        await routing.mark_alive(redis, host, identity=f"{host}/tp-worker-w0-1")
    await redis.set(account_lease(dead), "host-gone/tp-worker-w0-9|3", px=4000)
    router = routing.SendRouter(redis, db, "host-me", member="host-me/tp-worker-w0", gone_after=30,
                                hosted_here=lambda a: a == open_here)
    assert router.own_queue(CAMPAIGNS_QUEUE) == host_queue(CAMPAIGNS_QUEUE, "host-me/tp-worker-w0")
    assert await router.route(CAMPAIGNS_QUEUE, open_here) == routing.Route("campaigns@host-me/tp-worker-w0")
    assert (await router.route(CAMPAIGNS_QUEUE, owned)).queue == "campaigns@host-b/tp-worker-w0"
    waiting = await router.route(CAMPAIGNS_QUEUE, dead)
    assert waiting.queue is None and 3.0 < waiting.wait <= 4.0
    assert (await router.route(MESSAGES_QUEUE, orphan)).queue == "messages@host-b/tp-worker-w0"


async def test_routes_asked_together_agree_with_routes_asked_one_by_one_and_place_once(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """`route_many` answers what `route` answers for each account (open here, held by a live child,
    a dead holder's lease, a live stored host, nobody's), in the order asked, placing the unowned
    ones on the least-loaded child."""
    await db.execute("INSERT INTO hosts (id) VALUES ('host-me'), ('host-b')")
    open_here = await _account(db, "+9996600311")
    held = await _account(db, "+9996600312")
    dead = await _account(db, "+9996600313")
    stored = await _account(db, "+9996600314", owner_host="host-me")
    orphans = [await _account(db, f"+99966003{i}") for i in (15, 16)]
    for phone in ("+9996600317", "+9996600318"):  # host-me owns more: host-b is the less loaded
        await _account(db, phone, owner_host="host-me")
    await routing.mark_alive(redis, "host-me", identity="host-me/tp-worker-w0-1", hosted=3)
    await routing.mark_alive(redis, "host-me", identity="host-me/tp-worker-w1-2", hosted=1)
    await routing.mark_alive(redis, "host-b", identity="host-b/tp-worker-w0-3")
    await redis.set(account_lease(held), "host-me/tp-worker-w1-2|1", px=5000)
    await redis.set(account_lease(dead), "host-gone/tp-worker-w0-9|3", px=4000)
    router = routing.SendRouter(redis, db, "host-me", member="host-me/tp-worker-w0", gone_after=30,
                                hosted_here=lambda a: a == open_here)
    asked = [orphans[0], dead, stored, open_here, held, orphans[1]]
    together = await router.route_many(CAMPAIGNS_QUEUE, asked)
    one_by_one = [await router.route(CAMPAIGNS_QUEUE, a) for a in asked]
    assert [r.queue for r in together] == [r.queue for r in one_by_one] == [
        "campaigns@host-b/tp-worker-w0", None, "campaigns@host-me/tp-worker-w1", "campaigns@host-me/tp-worker-w0",
        "campaigns@host-me/tp-worker-w1", "campaigns@host-b/tp-worker-w0"]
    assert 3.0 < together[1].wait <= 4.0
    assert await router.route_many(CAMPAIGNS_QUEUE, []) == []


async def test_a_campaigns_worth_of_routes_does_not_exhaust_the_redis_connection_pool(
        db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """300 accounts held by a sibling child, well over the platform Redis client's pool of 100
    connections: routed together, and even each asked at once, every one is answered with the
    sibling's queue (no MaxConnectionsError, which left a two-child campaign unsent, issue 28)."""
    accounts = [int(r["id"]) for r in await db.fetch(
        "INSERT INTO accounts (phone) SELECT '+99967' || lpad(g::text, 5, '0') FROM generate_series(1, 300) g"
        " RETURNING id")]
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w0-1", hosted=0)
    await routing.mark_alive(redis, "host-a", identity="host-a/tp-worker-w1-2", hosted=len(accounts))
    async with redis.pipeline(transaction=False) as pipe:
        for account_id in accounts:
            pipe.set(account_lease(account_id), "host-a/tp-worker-w1-2|1", px=60_000)
        await pipe.execute()
    router = routing.SendRouter(redis, db, "host-a", member="host-a/tp-worker-w0", gone_after=30,
                                hosted_here=lambda _: False)
    sibling = "campaigns@host-a/tp-worker-w1"
    assert {r.queue for r in await router.route_many(CAMPAIGNS_QUEUE, accounts)} == {sibling}
    at_once = await asyncio.gather(*(router.route(CAMPAIGNS_QUEUE, a) for a in accounts))
    assert {r.queue for r in at_once} == {sibling}


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

"""The asyncio RQ consumer and the scheduler, against a real Redis."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from support import eventually

from telegram_platform.queue.consumer import (
    MAX_WORKER_DEATHS,
    JobBudget,
    JobContext,
    QueueConsumer,
    Retry,
    heartbeat,
    rescue_abandoned,
)
from telegram_platform.queue.jobs import (
    JOB_PREFIX,
    Enqueuer,
    failed_key,
    finished_key,
    queue_key,
    scheduled_key,
)
from telegram_platform.queue.scheduler import Scheduler
from telegram_platform.redis_keys import SCHEDULER_LOCK, WORKER_HEARTBEAT_PREFIX, active_jobs

Q = "testq"
FUNC = "tests.job"


@pytest.fixture
async def r(clean_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(clean_redis)
    yield client
    await client.aclose()


async def _enqueue(r: aioredis.Redis, n: int, *args: Any) -> list[str]:
    enqueuer = Enqueuer(r)
    return [await enqueuer.enqueue(Q, FUNC, list(args)) for _ in range(n)]


async def _status(r: aioredis.Redis, job_id: str) -> str:
    return (await r.hget(JOB_PREFIX + job_id, "status") or b"").decode()


async def test_concurrency_is_exactly_the_configured_bound(r: aioredis.Redis) -> None:
    """With concurrency 3, never more than 3 handlers run at once, and 3 do run together."""
    running, peak = 0, 0

    async def job(ctx: JobContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    ids = await _enqueue(r, 20)
    consumer = QueueConsumer(r, Q, worker="w1", concurrency=3, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: _done(consumer, 20), timeout=10)
    consumer.stop()
    await task
    await consumer.drain(time.monotonic() + 5)
    assert peak == 3
    assert [await _status(r, i) for i in ids] == ["finished"] * 20
    assert await r.zcard(finished_key(Q)) == 20
    assert await r.llen(active_jobs(Q, "w1")) == 0


async def _done(consumer: QueueConsumer, n: int) -> bool:
    return consumer.processed + consumer.failed >= n


async def test_failure_and_retry(r: aioredis.Redis) -> None:
    """A raising job is failed with its traceback; Retry reschedules it and the scheduler brings it back."""
    calls: dict[str, int] = {}

    async def job(ctx: JobContext, mode: str) -> None:
        calls[mode] = calls.get(mode, 0) + 1
        if mode == "boom":
            raise ValueError("boom")
        if mode == "retry" and calls[mode] == 1:
            raise Retry(0.3, "later")

    enqueuer = Enqueuer(r)
    boom = await enqueuer.enqueue(Q, FUNC, ["boom"])
    retry = await enqueuer.enqueue(Q, FUNC, ["retry"])
    consumer = QueueConsumer(r, Q, worker="w2", concurrency=2, handlers={FUNC: job})
    scheduler = Scheduler(r, [Q], owner="s1")
    tasks = [asyncio.create_task(consumer.run()), asyncio.create_task(scheduler.run())]
    await eventually(lambda: _status_is(r, retry, "finished"), timeout=10)
    consumer.stop()
    await consumer.drain(time.monotonic() + 5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert calls == {"boom": 1, "retry": 2}
    assert await _status(r, boom) == "failed"
    assert await r.zscore(failed_key(Q), boom) is not None
    assert b"ValueError: boom" in zlib.decompress(await r.hget(JOB_PREFIX + boom, "exc_info"))
    assert await r.zcard(scheduled_key(Q)) == 0


async def _status_is(r: aioredis.Redis, job_id: str, status: str) -> bool:
    return await _status(r, job_id) == status


async def test_warm_stop_finishes_jobs_in_hand_and_returns_the_rest(r: aioredis.Redis) -> None:
    """stop(): the jobs running finish; the ones taken but not started go back to the queue front."""
    started: list[str] = []

    async def job(ctx: JobContext) -> None:
        started.append(ctx.job_id)
        await asyncio.sleep(0.3)

    ids = await _enqueue(r, 10)
    consumer = QueueConsumer(r, Q, worker="w3", concurrency=2, handlers={FUNC: job}, batch=8)
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: _true(len(started) == 2), timeout=5)
    consumer.stop()
    await task
    cancelled = await consumer.drain(time.monotonic() + 5)
    assert cancelled == 0 and consumer.processed == 2
    waiting = [x.decode() for x in await r.lrange(queue_key(Q), 0, -1)]
    assert waiting == [i for i in ids if i not in started], "the rest, in their order"
    assert await r.llen(active_jobs(Q, "w3")) == 0


async def _true(value: bool) -> bool:
    return value


async def test_cold_stop_requeues_the_job_in_hand(r: aioredis.Redis) -> None:
    """Past the drain deadline, a job still running is cancelled and put back on the queue."""
    async def job(ctx: JobContext) -> None:
        await asyncio.sleep(30)

    [job_id] = await _enqueue(r, 1)
    consumer = QueueConsumer(r, Q, worker="w4", concurrency=1, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: _true(consumer.in_flight == 1), timeout=5)
    consumer.stop()
    await task
    assert await consumer.drain(time.monotonic() + 0.2) == 1
    assert [x.decode() for x in await r.lrange(queue_key(Q), 0, -1)] == [job_id]
    assert await _status(r, job_id) == "queued"


async def test_rescue_of_a_dead_workers_jobs(r: aioredis.Redis) -> None:
    """Jobs in the active list of a worker without a heartbeat (or known dead) return to the queue."""
    ids = await _enqueue(r, 3)
    for _ in ids:
        await r.lmove(queue_key(Q), active_jobs(Q, "dead"), "LEFT", "RIGHT")
    await heartbeat(r, "alive")
    await r.rpush(active_jobs(Q, "alive"), "keep-me")
    assert await rescue_abandoned(r, [Q]) == 3
    assert await r.lrange(active_jobs(Q, "alive"), 0, -1) == [b"keep-me"]
    assert await rescue_abandoned(r, [Q], dead=["alive"]) == 1
    assert await r.exists(WORKER_HEARTBEAT_PREFIX + "alive")


async def test_a_job_whose_hash_vanished_is_not_run(r: aioredis.Redis) -> None:
    """After a FLUSHALL-like loss of the job hash, its id on the queue is dropped, not run half-known."""
    ran: list[str] = []

    async def job(ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    [lost, kept] = await _enqueue(r, 2)
    await r.delete(JOB_PREFIX + lost)
    consumer = QueueConsumer(r, Q, worker="w5", concurrency=2, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    await eventually(lambda: _true(ran == [kept]), timeout=5)
    consumer.stop()
    await task
    await consumer.drain(time.monotonic() + 2)
    assert await r.llen(active_jobs(Q, "w5")) == 0 and await r.llen(queue_key(Q)) == 0


async def test_one_scheduler_at_a_time(r: aioredis.Redis) -> None:
    """Two schedulers: one holds the lock and promotes due jobs; the other takes over when it is gone."""
    enqueuer = Enqueuer(r)
    job_id = await enqueuer.enqueue(Q, FUNC, [], at=time.time() + 0.01)
    assert await r.zcard(scheduled_key(Q)) == 1
    first, second = Scheduler(r, [Q], owner="a"), Scheduler(r, [Q], owner="b")
    await asyncio.sleep(0.02)
    assert await first.tick() == 1 and first.holding
    assert await second.tick() == 0 and not second.holding
    assert [x.decode() for x in await r.lrange(queue_key(Q), 0, -1)] == [job_id]
    await r.delete(SCHEDULER_LOCK)  # the holder died and its lock expired
    await second.tick()
    assert second.holding


async def test_job_budget_caps_what_is_taken(r: aioredis.Redis) -> None:
    """RQ's max_jobs across consumers: with a budget of 3, exactly 3 jobs are taken, then `spent` is set."""
    async def job(ctx: JobContext) -> None:
        await asyncio.sleep(0.01)

    await _enqueue(r, 10)
    budget = JobBudget(3)
    consumer = QueueConsumer(r, Q, worker="w6", concurrency=5, handlers={FUNC: job}, budget=budget)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(budget.spent.wait(), timeout=5)
    await eventually(lambda: _done(consumer, 3), timeout=5)
    await asyncio.sleep(0.2)
    consumer.stop()
    await task
    await consumer.drain(time.monotonic() + 2)
    assert consumer.processed == 3 and budget.remaining == 0
    assert await r.llen(queue_key(Q)) == 7


async def test_a_consumer_waits_out_a_redis_that_refuses_writes(r: aioredis.Redis) -> None:
    """A Redis out of memory (OOM) makes the consumer wait and retry, not die; it takes jobs again after."""
    ran: list[int] = []

    async def job(ctx: JobContext, n: int) -> None:
        ran.append(n)

    consumer = QueueConsumer(r, Q, worker="w-oom", concurrency=1, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    try:
        await r.config_set("maxmemory", "1")
        await asyncio.sleep(1.5)
        assert not task.done(), task.exception()
    finally:
        await r.config_set("maxmemory", "0")
    await _enqueue(r, 1, 7)
    await eventually(lambda: _true(ran == [7]), timeout=10)
    consumer.stop()
    await task
    await consumer.drain(time.monotonic() + 5)


async def test_a_job_that_kills_its_worker_is_parked_as_failed(r: aioredis.Redis) -> None:
    """A job found in a dead worker's hands is requeued twice; the third time it is failed, with
    exc_info saying why, in the failed registry instead of the queue."""
    [job_id] = await _enqueue(r, 1)
    for death in range(1, MAX_WORKER_DEATHS + 1):
        assert await r.lmove(queue_key(Q), active_jobs(Q, f"dead{death}"), "LEFT", "RIGHT") is not None
        assert await rescue_abandoned(r, [Q], dead=[f"dead{death}"]) == 1
        if death < MAX_WORKER_DEATHS:
            assert await _status(r, job_id) == "queued" and await r.llen(queue_key(Q)) == 1
    assert await r.llen(queue_key(Q)) == 0
    assert await _status(r, job_id) == "failed"
    assert await r.zscore(failed_key(Q), job_id) is not None
    exc_info = zlib.decompress(await r.hget(JOB_PREFIX + job_id, "exc_info")).decode()
    assert f"died {MAX_WORKER_DEATHS} times" in exc_info


async def _calls(r: aioredis.Redis, *commands: str) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands}


async def test_an_idle_consumer_blocks_once_a_second_and_still_takes_a_job_at_once(r: aioredis.Redis) -> None:
    """On an empty queue a consumer makes one blocking BLMOVE a second and no take script between
    them; a job pushed meanwhile is run within a fraction of a second, not at the next poll."""
    ran: list[float] = []

    async def job(ctx: JobContext) -> None:
        ran.append(time.monotonic())

    consumer = QueueConsumer(r, Q, worker="w-idle", concurrency=2, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.sleep(1.5)  # past its first take and first empty wait
        before = await _calls(r, "evalsha", "eval", "blmove")
        await asyncio.sleep(4.0)
        after = await _calls(r, "evalsha", "eval", "blmove")
        assert after["evalsha"] + after["eval"] == before["evalsha"] + before["eval"]
        assert 2 <= after["blmove"] - before["blmove"] <= 6
        pushed = time.monotonic()
        await _enqueue(r, 1)
        await eventually(lambda: _true(bool(ran)), timeout=5)
        assert ran[0] - pushed < 0.9  # not at the next poll: the blocking wait wakes on the push
    finally:
        consumer.stop()
        await task
        await consumer.drain(time.monotonic() + 2)


async def test_a_scheduler_tick_is_one_call_for_every_queue(r: aioredis.Redis) -> None:
    """Due jobs of several queues, a host's among them, are promoted by one script call per tick
    (the host queues read at most once a second); a job not due yet stays scheduled."""
    enqueuer = Enqueuer(r)
    host_q = "messages@host-x"
    due = [await enqueuer.enqueue(q, FUNC, [], at=time.time() + 0.05) for q in (Q, "otherq", host_q)]
    later = await enqueuer.enqueue(Q, FUNC, [], at=time.time() + 60)
    scheduler = Scheduler(r, [Q, "otherq"], owner="one-call")
    await asyncio.sleep(0.1)
    assert await scheduler.tick() == 3
    for queue, job_id in zip((Q, "otherq", host_q), due, strict=True):
        assert [x.decode() for x in await r.lrange(queue_key(queue), 0, -1)] == [job_id]
    assert [x.decode() for x in await r.zrange(scheduled_key(Q), 0, -1)] == [later]
    before = await _calls(r, "evalsha", "eval", "smembers")
    assert await scheduler.tick() == 0
    after = await _calls(r, "evalsha", "eval", "smembers")
    assert after["evalsha"] + after["eval"] - before["evalsha"] - before["eval"] == 1
    assert after["smembers"] == before["smembers"]  # read again only after HOST_QUEUES_SECONDS


async def test_an_outcome_redis_refused_is_written_once_it_takes_writes_again(r: aioredis.Redis) -> None:
    """Jobs that end (one rescheduled, one failed) while Redis refuses writes have their outcome
    written once it takes them again: none stays in the worker's active list, counted live, and
    none is lost between the list and its schedule."""
    go = asyncio.Event()

    async def job(ctx: JobContext, mode: str) -> None:
        await go.wait()
        if mode == "retry":
            raise Retry(60, "later")
        raise ValueError("boom")

    enqueuer = Enqueuer(r)
    retried, failed = await enqueuer.enqueue(Q, FUNC, ["retry"]), await enqueuer.enqueue(Q, FUNC, ["fail"])
    consumer = QueueConsumer(r, Q, worker="w-outcome", concurrency=2, handlers={FUNC: job})
    task = asyncio.create_task(consumer.run())
    try:
        async def both_taken() -> bool:
            return await r.llen(active_jobs(Q, "w-outcome")) == 2

        await eventually(both_taken, timeout=10)
        await r.config_set("maxmemory", "1")
        try:
            go.set()
            await asyncio.sleep(1.0)  # the outcomes are refused, and tried again
            assert await r.zcard(scheduled_key(Q)) == 0 and await r.zcard(failed_key(Q)) == 0
        finally:
            await r.config_set("maxmemory", "0")

        async def written() -> bool:
            return (await r.zscore(scheduled_key(Q), retried) is not None
                    and await r.zscore(failed_key(Q), failed) is not None)

        await eventually(written, timeout=10)
        assert await r.llen(active_jobs(Q, "w-outcome")) == 0
        assert (await _status(r, retried), await _status(r, failed)) == ("scheduled", "failed")
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
        await consumer.drain(time.monotonic() + 5)

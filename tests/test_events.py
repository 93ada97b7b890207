"""Platform events on Redis: the event log and its ids, listening to any channel, catching up on
subscription, stopping."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from conftest import TEST_ENCRYPTION_KEY
from support import TcpProxy, eventually, forge_events

from telegram_platform import events, redis_keys
from telegram_platform.outages import REDIS_DOWN
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.tasks import cancel_and_wait


async def test_the_log_keeps_about_its_length_and_ids_grow(redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Each event's id is its log entry's, growing in publishing order; the log is trimmed to about
    `log_length` (whole stream nodes at a time), and reading it gives the text as published."""
    ids = [await events.publish(redis, redis_auth, "test.event", {"n": n}, log_length=100) for n in range(500)]
    assert [events.parse_id(i) for i in ids] == sorted(events.parse_id(i) for i in ids)
    assert len(set(ids)) == 500
    assert 100 <= await redis.xlen(redis_keys.EVENTS_LOG) < 300
    page = [item async for item in events.log_after(redis, redis_auth, ids[-3], 10)]
    complete = await events.log_reaches(redis, ids[-3])
    assert [event_id for event_id, _ in page] == ids[-2:] and complete
    assert [json.loads(text)["data"]["n"] for _, text in page] == [498, 499]
    assert json.loads(page[0][1])["id"] == ids[-2]
    assert not await events.log_reaches(redis, ids[0])  # trimmed away since


async def test_listen_hands_over_its_channel_and_catches_up_on_subscription(redis: aioredis.Redis) -> None:
    """Messages of the named channel reach the handler, after `on_subscribed` ran; others do not."""
    received: list[bytes | str] = []
    order: list[str] = []
    subscribed = asyncio.Event()

    async def handle(raw: bytes | str) -> None:
        received.append(raw)

    async def catch_up() -> None:
        order.append("caught up" if not subscribed.is_set() else "late")

    task = asyncio.create_task(events.listen(redis, handle, listener="test", channel="tp:test:one",
                                             subscribed=subscribed, on_subscribed=catch_up))
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        await redis.publish("tp:test:other", "not for us")
        await redis.publish("tp:test:one", "for us")
        await eventually(lambda: _returns(bool(received)), timeout=5)
        assert received == [b"for us"] and order == ["caught up"]
    finally:
        await cancel_and_wait([task])
    assert task.cancelled()


async def _returns(value: bool) -> bool:
    return value


async def test_only_events_with_a_valid_mac_are_read(redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """The log is read past forged entries (no MAC, another key's, a MAC of other text), each
    refused and counted; a published message opens only with its MAC over the very text, with
    nothing but a stream id beside it."""
    counted: list[str] = []
    reader = RedisAuth(bytes.fromhex(TEST_ENCRYPTION_KEY), count_refused=counted.append)
    await redis.delete(redis_keys.EVENTS_LOG)
    first = await events.publish(redis, redis_auth, "test.event", {"n": 1})
    forged = await forge_events(redis, redis_auth)
    last = await events.publish(redis, redis_auth, "test.event", {"n": 2})
    read = [item async for item in events.log_after(redis, reader, "0", 100)]
    assert [event_id for event_id, _ in read] == [first, last]
    assert counted == ["event"] * forged

    encoded = events.encode_event("test.event", {"n": 3})
    genuine = redis_auth.event_mac(encoded) + events.with_id("5-1", encoded)
    assert events.open_published(reader, genuine) == events.with_id("5-1", encoded)
    assert events.open_published(reader, genuine.encode()) == events.with_id("5-1", encoded)
    for bad in (genuine[1:], genuine.replace('"n": 3', '"n": 4'), genuine.replace("5-1", "5-1x"),
                redis_auth.event_mac(encoded) + encoded, "", "x" * 40):
        assert events.open_published(reader, bad) is None, bad
    assert counted == ["event"] * (forged + 6)


async def test_events_handed_over_together_go_in_one_call_in_order_each_with_its_mac(
        redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Fifty events published at once by a Publisher make one Redis call; each gets its own id, in
    the order handed over, and each is in the log with a valid MAC (log_after passes only those)."""
    publisher = events.Publisher(redis, redis_auth, log_length=1000)
    start = await events.publish(redis, redis_auth, "test.start", {})
    ids = await asyncio.gather(*(publisher.publish("test.batched", {"n": n}) for n in range(50)))
    assert publisher.calls == 1
    assert [events.parse_id(i) for i in ids] == sorted(events.parse_id(i) for i in ids) and len(set(ids)) == 50
    logged = [item async for item in events.log_after(redis, redis_auth, start, 100)]
    assert [event_id for event_id, _ in logged] == ids
    assert [json.loads(text)["data"]["n"] for _, text in logged] == list(range(50))
    assert await publisher.publish("test.batched", {"n": 50}) > ids[-1] and publisher.calls == 2


async def test_a_batch_that_meets_redis_away_fails_each_caller_and_the_next_one_goes_out(
        redis_proxy: tuple[TcpProxy, aioredis.Redis], redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Redis cut: every caller of the batch gets the outage (REDIS_DOWN, as `publish` raises it), none
    hangs; once Redis is back the same publisher publishes again."""
    proxy, client = redis_proxy
    publisher = events.Publisher(client, redis_auth)
    await publisher.publish("test.before", {})
    await proxy.cut()
    results = await asyncio.wait_for(asyncio.gather(*(publisher.publish("test.lost", {"n": n}) for n in range(5)),
                                                    return_exceptions=True), 10)
    assert all(isinstance(r, REDIS_DOWN) for r in results), results
    await proxy.start()
    event_id = await eventually(lambda: _publishes(publisher), timeout=10)
    assert (await redis.xrange(redis_keys.EVENTS_LOG, min=event_id, max=event_id))


async def test_events_are_published_after_redis_forgot_the_script(redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """The script is called by its SHA; a Redis that lost its script cache (a restart, a failover)
    gets the script again, and the event is published once."""
    first = await events.publish(redis, redis_auth, "test.one", {})
    await redis.script_flush()
    second = await events.publish(redis, redis_auth, "test.two", {})
    logged = [item async for item in events.log_after(redis, redis_auth, first, 10)]
    assert [event_id for event_id, _ in logged] == [second]


async def _publishes(publisher: events.Publisher) -> str | None:
    try:
        return await publisher.publish("test.after", {})
    except REDIS_DOWN:
        return None

"""Incoming messages through the `updates` queue: stored once, published with their id, retried
while PostgreSQL is away, and stored directly while Redis is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, TcpProxy, WorkerProcess, eventually, free_port
from worker.test_end_to_end import _ready_account

from telegram_platform import events, redis_keys
from telegram_platform.queue.consumer import JobContext, Retry
from telegram_platform.queue.jobs import JOB_PREFIX, Enqueuer, decode_job_data, queue_key
from telegram_platform.queue.registry import STORE_INCOMING, UPDATES_QUEUE, incoming_job_id
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.telegram.base import IncomingEdited, IncomingMessage, change_to_json
from telegram_platform.telegram.content import FormattedText
from telegram_platform.worker import updates
from telegram_platform.worker.spool import IncomingSpool, spool_directory
from telegram_platform.worker.updates import IncomingUpdates


async def _account(db: asyncpg.Pool) -> int:
    return int(await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996671234') RETURNING id"))


def _context() -> JobContext:
    return JobContext("in-test", UPDATES_QUEUE, STORE_INCOMING)


async def test_an_incoming_message_is_stored_once_through_the_updates_queue(
        api: ApiClient, admin_token: str, worker: WorkerProcess, fresh_emulator: EmulatorHandle,
        redis: aioredis.Redis) -> None:
    """A message Telegram delivers becomes an `updates` job, is stored once, is listed by
    GET /api/incoming and reaches a WebSocket client as message.incoming with the same id."""
    account = await _ready_account(api, admin_token)
    async with api.client.ws_connect(f"/api/ws?token={admin_token}&types=message.incoming") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        async with aiohttp.ClientSession() as http, http.post(
                f"{fresh_emulator.url}/control/incoming",
                json={"to_phone": account["phone"], "sender": "@eve", "text": "hi there"}) as response:
            assert response.status == 200
            sent = await response.json()
        event = await ws.receive_json(timeout=15)
    assert event["type"] == "message.incoming"
    data = event["data"]
    assert (data["account_id"], data["chat_id"], data["sender"], data["text"], data["date"]) == (
        account["id"], sent["chat_id"], "@eve", "hi there", sent["date"])
    status, page = await api.call("GET", f"/api/incoming?account_id={account['id']}", admin_token)
    assert status == 200 and [item["id"] for item in page["items"]] == [data["id"]]
    assert page["items"][0]["telegram_message_id"] == sent["message_id"] == data["telegram_message_id"]
    job = JOB_PREFIX + _job_id(IncomingMessage(account["id"], sent["chat_id"], sent["message_id"],
                                                       "@eve", "hi there", sent["date"]))

    async def finished() -> Any:
        return await redis.hget(job, "status") == b"finished"

    await eventually(finished, timeout=10)


async def test_a_store_is_retried_while_the_database_is_away(settings: Settings, db: asyncpg.Pool,
                                                            redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """With PostgreSQL unreachable the job asks to be run again, sooner for a fresh message; once it
    is back the message is stored, and a second run stores nothing more and publishes the same id."""
    account_id = await _account(db)
    message = IncomingMessage(account_id, 42, 7 << 20, "@eve", "are you there?", int(time.time()) - 5)
    closed = await asyncpg.create_pool(settings.database.url, min_size=0, max_size=1)
    await closed.close()
    with pytest.raises(Retry) as retry:
        await IncomingUpdates(closed, redis, redis_auth).store_incoming(_context(), *_signed(message, redis_auth))
    assert updates.MIN_RETRY_DELAY <= retry.value.delay <= 1.0
    assert updates.retry_delay(3600) == updates.MAX_RETRY_DELAY

    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.EVENTS_CHANNEL)
    try:
        service = IncomingUpdates(db, redis, redis_auth)
        await service.store_incoming(_context(), *_signed(message, redis_auth))
        await service.store_incoming(_context(), *_signed(message, redis_auth))  # a retried or redelivered job
        published = await _incoming_events(pubsub, redis_auth, 2)
    finally:
        await pubsub.aclose()  # type: ignore[attr-defined]
    rows = await db.fetch("SELECT id, text, sent_at FROM incoming_messages WHERE account_id = $1", account_id)
    assert len(rows) == 1 and rows[0]["text"] == "are you there?"
    assert int(rows[0]["sent_at"].timestamp()) == message.date
    assert [event["id"] for event in published] == [rows[0]["id"]] * 2


async def test_a_week_old_message_still_unstored_fails_for_an_operator(settings: Settings, db: asyncpg.Pool,
                                                                       redis: aioredis.Redis,
                                                                       redis_auth: RedisAuth) -> None:
    """Past GIVE_UP_AFTER the database's error fails the job (RQ's failed registry, requeue-able)
    instead of asking for another retry."""
    closed = await asyncpg.create_pool(settings.database.url, min_size=0, max_size=1)
    await closed.close()
    old = IncomingMessage(1, 42, 1, "@eve", "old", int(time.time()) - updates.GIVE_UP_AFTER - 60)
    with pytest.raises(asyncpg.InterfaceError):
        await IncomingUpdates(closed, redis, redis_auth).store_incoming(_context(), *_signed(old, redis_auth))


async def test_with_redis_away_the_message_is_stored_directly(settings: Settings, db: asyncpg.Pool,
                                                              redis_auth: RedisAuth) -> None:
    """`accept` with Redis unreachable stores the message in PostgreSQL at once (the event cannot
    go out; GET /api/incoming shows it)."""
    account_id = await _account(db)
    message = IncomingMessage(account_id, -1001234567890, 1 << 20, "@group", "hello group", int(time.time()))
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        await IncomingUpdates(db, unreachable, redis_auth).accept(message)
    finally:
        await unreachable.aclose()
    row = await db.fetchrow("SELECT chat_id, text FROM incoming_messages WHERE account_id = $1", account_id)
    assert row is not None and (row["chat_id"], row["text"]) == (-1001234567890, "hello group")


async def test_with_redis_and_the_database_away_the_message_is_spooled_until_one_is_back(
        settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """`accept` with neither reachable writes the message to the spool instead of losing it, and the
    next message goes behind it even with the services back; the next drain makes them `updates`
    jobs in arrival order and empties the spool, after which messages go to the queue again."""
    account_id = await _account(db)
    message, behind, after = (IncomingMessage(account_id, 42, n << 20, "@eve", f"anyone home? {n}", int(time.time()))
                              for n in (9, 10, 11))
    spool = IncomingSpool(spool_directory(settings.var_dir))
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    no_database = await asyncpg.create_pool(f"postgresql://tp@127.0.0.1:{free_port()}/tp", min_size=0)
    try:
        away = IncomingUpdates(no_database, unreachable, redis_auth, spool=spool)
        await away.accept(message)
        assert spool.waiting() == 1
        assert await away.drain_spool() == 0 and spool.waiting() == 1  # still away: kept
    finally:
        await unreachable.aclose()
        await no_database.close()
    back = IncomingUpdates(db, redis, redis_auth, spool=spool)
    await back.accept(behind)
    assert spool.waiting() == 2 and not await redis.exists(JOB_PREFIX + _job_id(behind))
    assert await back.drain_spool() == 2
    assert spool.waiting() == 0 and not spool.backlog
    queued = [jid.decode() for jid in await redis.lrange(queue_key(UPDATES_QUEUE), 0, -1)]
    assert queued == [_job_id(message), _job_id(behind)]  # taken from the left
    job = await redis.hgetall(JOB_PREFIX + _job_id(message))
    assert job[b"origin"] == UPDATES_QUEUE.encode()
    assert decode_job_data(job[b"data"]) == (STORE_INCOMING, _signed(message, redis_auth))
    await back.accept(after)
    assert spool.waiting() == 0 and await redis.exists(JOB_PREFIX + _job_id(after))


@contextlib.asynccontextmanager
async def _worker_behind_proxies(platform_env: dict[str, str]) -> AsyncIterator[tuple[WorkerProcess, TcpProxy,
                                                                                    TcpProxy]]:
    """A real worker reaching PostgreSQL and Redis through proxies the test can cut or stall."""
    database, queue = TcpProxy.before(platform_env["DATABASE_URL"]), TcpProxy.before(platform_env["REDIS_URL"])
    await database.start()
    await queue.start()
    worker = WorkerProcess.start({**platform_env, "DATABASE_URL": database.url, "REDIS_URL": queue.url})
    try:
        yield worker, database, queue
    finally:
        await asyncio.to_thread(worker.stop)  # the proxies serve from this event loop: keep it running
        await database.cut()
        await queue.cut()


async def _deliver(emulator: EmulatorHandle, account: dict[str, Any], text: str) -> dict[str, Any]:
    """Telegram delivers a message to the account."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{emulator.url}/control/incoming", json={"to_phone": account["phone"], "sender": "@eve", "text": text},
    ) as response:
        assert response.status == 200
        sent: dict[str, Any] = await response.json()
        return sent


async def _spooled_and_then_stored(api: ApiClient, token: str, worker: WorkerProcess, account: dict[str, Any],
                                   come_back: Callable[[], Awaitable[None]]) -> list[dict[str, Any]]:
    """Waits for the worker to spool a message, brings the services back, and returns what
    GET /api/incoming then lists for the account."""

    async def spooled() -> bool:
        return "incoming message spooled to disk" in worker.log()

    await eventually(spooled, timeout=30, interval=0.2)
    (line,) = [json.loads(x) for x in worker.log().splitlines() if "spooled to disk" in x]
    assert line["account_id"] == account["id"] and "op" not in line and line["worker"]  # not the login's op
    await come_back()

    async def stored() -> Any:
        _, page = await api.call("GET", f"/api/incoming?account_id={account['id']}", token)
        return page["items"]

    items: list[dict[str, Any]] = await eventually(stored, timeout=45, interval=0.2)
    return items


async def test_a_message_that_arrives_while_redis_and_the_database_are_away_is_stored_after(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], fresh_emulator: EmulatorHandle,
        db: asyncpg.Pool) -> None:
    """A real worker whose PostgreSQL and Redis both go away (connections reset, new ones refused)
    while Telegram delivers a message: it spools it, and once they are back the message is stored,
    once, and listed by GET /api/incoming."""
    async with _worker_behind_proxies(platform_env) as (worker, database, queue):
        account = await _ready_account(api, admin_token)
        await database.cut()
        await queue.cut()
        sent = await _deliver(fresh_emulator, account, "during the outage")

        async def come_back() -> None:
            await database.start()
            await queue.start()

        items = await _spooled_and_then_stored(api, admin_token, worker, account, come_back)
        assert [(i["telegram_message_id"], i["text"]) for i in items] == [(sent["message_id"], "during the outage")]
        assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 1


async def test_a_redis_that_stops_answering_does_not_hold_incoming_messages_forever(
        api: ApiClient, admin_token: str, platform_env: dict[str, str], fresh_emulator: EmulatorHandle) -> None:
    """Redis stalls (answers nothing, refuses nothing) and PostgreSQL is cut: the hand-over gives up
    after HAND_OVER_TIMEOUT, so the message is spooled rather than waiting in memory for an answer
    that never comes (the session closing meanwhile, its lease unconfirmable, does not drop it); it
    is stored once both are back."""
    async with _worker_behind_proxies(platform_env) as (worker, database, queue):
        account = await _ready_account(api, admin_token)
        queue.stall()
        await database.cut()
        await _deliver(fresh_emulator, account, "into the void")

        async def come_back() -> None:
            await queue.cut()  # resets the connections the stall spoiled
            await queue.start()
            await database.start()

        items = await _spooled_and_then_stored(api, admin_token, worker, account, come_back)
        assert [i["text"] for i in items] == ["into the void"]


async def test_without_a_spool_an_unstorable_message_raises(settings: Settings, redis_auth: RedisAuth) -> None:
    """Where no spool is given (a host that cannot keep one), the outage is raised to the caller,
    never swallowed."""
    message = IncomingMessage(1, 42, 1, "@eve", "lost?", int(time.time()))
    unreachable = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    no_database = await asyncpg.create_pool(f"postgresql://tp@127.0.0.1:{free_port()}/tp", min_size=0)
    try:
        with pytest.raises(OSError):
            await IncomingUpdates(no_database, unreachable, redis_auth).accept(message)
    finally:
        await unreachable.aclose()
        await no_database.close()


async def test_a_message_for_a_deleted_account_is_dropped(db: asyncpg.Pool, redis: aioredis.Redis,
                                                          redis_auth: RedisAuth) -> None:
    """The account is gone by the time the job runs: nothing is stored and the job succeeds (a
    retry could never store it)."""
    account_id = await _account(db)
    await db.execute("DELETE FROM accounts WHERE id = $1", account_id)
    message = IncomingMessage(account_id, 42, 1, "@eve", "too late", int(time.time()))
    await IncomingUpdates(db, redis, redis_auth).store_incoming(_context(), *_signed(message, redis_auth))
    assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 0


async def test_a_forged_incoming_message_job_stores_and_publishes_nothing(
        worker: WorkerProcess, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """`store_incoming` jobs someone without ENCRYPTION_KEY puts in the updates queue (no MAC,
    another key's, a MAC of other arguments) are taken by a real worker and dropped: no incoming
    message stored, no message.incoming event for webhooks to sign; a genuine job after them is."""
    account_id = await _account(db)
    forged = IncomingMessage(account_id, 42, 1, "@mallory", "forged by a Redis writer", int(time.time()))
    genuine = IncomingMessage(account_id, 42, 2, "@eve", "genuine", int(time.time()))
    enqueuer = Enqueuer(redis)
    for n, args in enumerate((_args(forged), [*_args(forged), RedisAuth(bytes(32)).job_mac(_args(forged))],
                              [*_args(forged), redis_auth.job_mac(_args(genuine))])):
        await enqueuer.enqueue(UPDATES_QUEUE, STORE_INCOMING, args, job_id=f"forged-{n}")
    await IncomingUpdates(db, redis, redis_auth).accept(genuine)

    async def stored() -> Any:
        return await db.fetchval("SELECT count(*) FROM incoming_messages WHERE text = 'genuine'") == 1

    await eventually(stored, timeout=20)
    for n in range(3):
        await eventually(lambda n=n: _finished(redis, f"forged-{n}"), timeout=10)
    texts = [row["text"] for row in await db.fetch("SELECT text FROM incoming_messages")]
    assert texts == ["genuine"]
    logged = [json.loads(text) async for _, text in events.log_after(redis, redis_auth, "0", 1000)]
    assert "forged by a Redis writer" not in json.dumps(logged)


async def _finished(redis: aioredis.Redis, job_id: str) -> bool:
    return await redis.hget(JOB_PREFIX + job_id, "status") in (b"finished", b"failed")


def _args(message: IncomingMessage) -> list[Any]:
    return [message.account_id, message.chat_id, message.telegram_message_id, message.sender, message.text,
            message.date, message.extra_json()]


def _signed(message: IncomingMessage, auth: RedisAuth) -> list[Any]:
    """A `store_incoming` job's arguments as the platform enqueues them: with their MAC."""
    return [*_args(message), auth.job_mac(_args(message))]


async def _incoming_events(pubsub: Any, redis_auth: RedisAuth, count: int) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []

    async def enough() -> Any:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            text = events.open_published(redis_auth, message["data"])
            assert text is not None, "an event without a valid MAC"
            event = json.loads(text)
            if event["type"] == "message.incoming":
                received.append(event["data"])
        return len(received) >= count

    await eventually(enough, timeout=10)
    return received


def _job_id(message: IncomingMessage) -> str:
    return incoming_job_id(message.account_id, message.chat_id, message.telegram_message_id)


async def test_a_forged_message_change_job_changes_nothing(db: asyncpg.Pool, redis: aioredis.Redis,
                                                          redis_auth: RedisAuth) -> None:
    """An edit job without a valid MAC (none, another key's) leaves the stored message as it was and
    publishes nothing; the same edit with the platform's MAC is recorded."""
    account_id = await _account(db)
    message = IncomingMessage(account_id, 42, 7, "@eve", "as sent", int(time.time()))
    service = IncomingUpdates(db, redis, redis_auth)
    await service.store_incoming(_context(), *_signed(message, redis_auth))
    edit = change_to_json(IncomingEdited(account_id, 42, 7, FormattedText("forged by a Redis writer"),
                                         int(time.time())))
    at = time.time()
    await redis.delete(redis_keys.EVENTS_LOG)
    for mac in ("", RedisAuth(bytes(32)).job_mac([edit, at])):
        await service.apply_change(_context(), edit, at, mac)
    assert await db.fetchval("SELECT text FROM incoming_messages WHERE telegram_message_id = 7") == "as sent"
    assert [text async for _, text in events.log_after(redis, redis_auth, "0-0", 10)] == []
    await service.apply_change(_context(), edit, at, redis_auth.job_mac([edit, at]))
    assert await db.fetchval("SELECT text FROM incoming_messages WHERE telegram_message_id = 7") == \
        "forged by a Redis writer"  # with the platform's MAC, the same edit is taken

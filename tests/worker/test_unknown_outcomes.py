"""Sends left `sending` by a worker that died: re-sent with their random_id (a backend that sends it), or
recorded as outcome unknown (TDLib); never touched while their worker lives; each settled one
announced by its `message.status` event."""

from __future__ import annotations

import json

import asyncpg
import pytest
import redis.asyncio as aioredis

from telegram_platform import redis_keys
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.storage.outbox import Outbox
from telegram_platform.worker.liveness import Liveness, alive
from telegram_platform.worker.unknown_outcomes import settle_abandoned_sends


async def _claimed(db: asyncpg.Pool, account_id: int, by: str, peer: str) -> int:
    message, _ = await outbox_store.create_message(db, account_id=account_id, peer=peer, text="t",
                                                    idempotency_key=None, created_by=None)
    await db.execute("""UPDATE messages SET status = 'sending', claimed_by = $2, claimed_at = now() - interval '1 min'
                        WHERE id = $1""", message["id"], by)
    return int(message["id"])


async def test_liveness_is_what_postgresql_sees(db: asyncpg.Pool, settings: Settings) -> None:
    """A process holding its lock is alive; once its connection closes, it is not."""
    holder = Liveness(settings.database.url, "w-live-1")
    await holder.hold()
    assert await alive(db, ["w-live-1", "w-ghost"]) == {"w-live-1"}
    await holder.close()
    assert await alive(db, ["w-live-1"]) == set()


async def test_abandoned_sends_keyed_and_not(db: asyncpg.Pool, redis: aioredis.Redis, settings: Settings,
                                             redis_auth: RedisAuth) -> None:
    """Keyed: back to queued, same random_id, marked delivery_unknown. TDLib: failed, unknown. A live
    worker's claims are left alone."""
    account = await account_store.create_account(db, "+9996619999", None)
    living = Liveness(settings.database.url, "w-living")
    await living.hold()
    try:
        dead_a = await _claimed(db, account["id"], "w-dead", "@a")
        dead_b = await _claimed(db, account["id"], "w-dead", "@b")
        live = await _claimed(db, account["id"], "w-living", "@c")
        before = await db.fetchval("SELECT random_id FROM messages WHERE id = $1", dead_a)

        outbox = Outbox(db, redis, redis_auth)
        assert await settle_abandoned_sends(db, outbox, sends_random_id=True, self_identity="me") == (2, 0)
        rows = {r["id"]: r for r in await db.fetch("SELECT * FROM messages")}
        assert rows[dead_a]["status"] == "queued" and rows[dead_a]["delivery_unknown"]
        assert rows[dead_a]["random_id"] == before
        assert rows[live]["status"] == "sending"

        await db.execute("UPDATE messages SET status = 'sending', claimed_by = 'w-dead', "
                         "claimed_at = now() - interval '1 min' WHERE id = ANY($1::bigint[])", [dead_a, dead_b])
        assert await settle_abandoned_sends(db, outbox, sends_random_id=False, self_identity="me") == (0, 2)
        row = await db.fetchrow("SELECT status, error_class, error FROM messages WHERE id = $1", dead_b)
        assert row["status"] == "failed" and row["error_class"] == "unknown" and "not retried" in row["error"]
        assert await db.fetchval("SELECT status FROM messages WHERE id = $1", live) == "sending"
    finally:
        await living.close()


@pytest.mark.parametrize("sends_random_id", [True, False])
async def test_settled_sends_publish_their_message_status(db: asyncpg.Pool, redis: aioredis.Redis,
                                                          sends_random_id: bool, redis_auth: RedisAuth) -> None:
    """Settling a stopped worker's send publishes `message.status` (queued, or failed) with the
    message's account, campaign-less, and the error it was recorded with."""
    account = await account_store.create_account(db, "+9996619998", None)
    message_id = await _claimed(db, account["id"], "w-gone", "@d")
    await settle_abandoned_sends(db, Outbox(db, redis, redis_auth), sends_random_id=sends_random_id, self_identity="me")
    stored = await db.fetchrow("SELECT status, error FROM messages WHERE id = $1", message_id)
    published = [json.loads(entry[1][b"e"]) for entry in await redis.xrange(redis_keys.EVENTS_LOG)]
    statuses = [event["data"] for event in published
                if event["type"] == "message.status" and event["data"]["message_id"] == message_id]
    assert statuses == [{"message_id": message_id, "status": stored["status"], "account_id": account["id"],
                         "error": stored["error"]}]
    assert stored["status"] == ("queued" if sends_random_id else "failed")

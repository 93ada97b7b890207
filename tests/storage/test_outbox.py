"""storage/outbox.py: what the claims return, so a send asks nothing more of PostgreSQL than it must, and
the claims and records of concurrent sends batched into one statement each."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis

from telegram_platform import events
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import optouts
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.storage.files import FileStore
from telegram_platform.storage.outbox import Outbox


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_claim_says_whether_its_message_carries_files(db: asyncpg.Pool) -> None:
    """claim_for_send returns has_files: False for a text message (its send makes no files query),
    True for one with a file (whose send then reads its files); a second claim still gets nothing."""
    account_id = int((await account_store.create_account(db, "+9996640001", None))["id"])
    plain, _ = await outbox_store.create_message(db, account_id=account_id, peer="@a", text="hi",
                                                  idempotency_key=None, created_by=None)
    with_file, _ = await outbox_store.create_message(db, account_id=account_id, peer="@a", text="see",
                                                      idempotency_key=None, created_by=None)
    stored, _ = await FileStore(db).put(_one(b"x" * 100), file_name="a.txt", mime_type="text/plain",
                                        max_size=1 << 20, created_by=None)
    await db.execute("INSERT INTO message_files (message_id, position, file_id, kind) VALUES ($1, 0, $2, 'document')",
                     with_file["id"], stored["id"])
    claimed_plain = await outbox_store.claim_for_send(db, plain["id"], "w")
    claimed_file = await outbox_store.claim_for_send(db, with_file["id"], "w")
    assert claimed_plain is not None and claimed_plain["has_files"] is False
    assert claimed_file is not None and claimed_file["has_files"] is True
    assert await outbox_store.claim_for_send(db, plain["id"], "w") is None  # exactly once, as before


async def test_a_claimant_whose_claim_was_settled_records_nothing_and_events_stay_in_order(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A claim settled as abandoned (back to `queued`) is not recorded by its old claimant: its
    `sent` changes no row and publishes no event; another claim then takes the message, and the
    events (through the batching publisher) are in the log in the order the rows were written."""
    account_id = int((await account_store.create_account(db, "+9996640002", None))["id"])
    message, _ = await outbox_store.create_message(db, account_id=account_id, peer="@a", text="hi",
                                                    idempotency_key=None, created_by=None)
    outbox = Outbox(db, redis, redis_auth)
    start = await events.publish(redis, redis_auth, "test.start", {})
    old = await outbox_store.claim_for_send(db, message["id"], "w-old")
    assert old is not None
    assert await outbox.settle_abandoned([message["id"]], ["w-old"], resend=True) == [(message["id"], None)]
    await outbox.mark_sent(old, 123)
    stored = await db.fetchrow("SELECT status, telegram_message_id FROM messages WHERE id = $1", message["id"])
    assert stored["status"] == "queued" and stored["telegram_message_id"] is None
    new = await outbox_store.claim_for_send(db, message["id"], "w-new")
    assert new is not None and new["attempts"] == 2
    await outbox.mark_sent(new, 456)
    assert await db.fetchval("SELECT telegram_message_id FROM messages WHERE id = $1", message["id"]) == 456
    statuses = [json.loads(text)["data"]["status"] async for _, text in events.log_after(redis, redis_auth, start, 10)]
    assert statuses == ["queued", "sent"]  # the settle's, then the new claimant's: the old one wrote nothing


async def test_concurrent_sends_are_recorded_by_one_statement_each_row_only_while_claimed(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Twenty outcomes recorded at once take one UPDATE; each row gets its own Telegram ids and chat,
    and a row settled as abandoned meanwhile is left as it is, without an event, while the others
    are recorded and announced."""
    account_id = int((await account_store.create_account(db, "+9996640003", None))["id"])
    rows = []
    for n in range(20):
        message, _ = await outbox_store.create_message(db, account_id=account_id, peer=f"@p{n}", text="hi",
                                                        idempotency_key=None, created_by=None)
        claimed = await outbox_store.claim_for_send(db, message["id"], "w-batch")
        assert claimed is not None
        rows.append(claimed)
    outbox = Outbox(db, redis, redis_auth)
    await outbox.settle_abandoned([rows[7]["id"]], ["w-batch"], resend=True)
    start = await events.publish(redis, redis_auth, "test.start", {})
    await asyncio.gather(*(outbox.mark_sent(row, 1000 + n, telegram_message_ids=[1000 + n, 2000 + n], chat_id=50 + n)
                           for n, row in enumerate(rows)))
    assert outbox.record_calls == 1
    stored = {r["id"]: r for r in await db.fetch(
        "SELECT id, status, telegram_message_id, telegram_message_ids, chat_id FROM messages "
        "WHERE id = ANY($1::bigint[])",
        [row["id"] for row in rows])}
    for n, row in enumerate(rows):
        got = stored[row["id"]]
        if n == 7:
            assert got["status"] == "queued" and got["telegram_message_id"] is None
        else:
            recorded = (got["status"], got["telegram_message_id"], list(got["telegram_message_ids"]), got["chat_id"])
            assert recorded == ("sent", 1000 + n, [1000 + n, 2000 + n], 50 + n)
    announced = [json.loads(text)["data"]["message_id"]
                 async for _, text in events.log_after(redis, redis_auth, start, 100)]
    assert sorted(announced) == sorted(row["id"] for n, row in enumerate(rows) if n != 7)


async def test_concurrent_campaign_claims_take_one_statement_each_message_claimed_once(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Claims asked for at once take one UPDATE: each due message is claimed (`sending`, its
    attempt counted) for exactly one caller, one asked for twice included; a message claimed
    elsewhere gets nothing; a recipient who opted out is cancelled with its event, not sent."""
    account_id = int((await account_store.create_account(db, "+9996640004", None))["id"])
    ids = []
    for n in range(12):
        message, _ = await outbox_store.create_message(db, account_id=account_id, peer=f"@c{n}", text="hi",
                                                        idempotency_key=None, created_by=None)
        ids.append(message["id"])
    assert await outbox_store.claim_for_send(db, ids[3], "w-other") is not None  # taken elsewhere first
    await optouts.add_optouts(db, ["@c5"], "asked", None)
    outbox = Outbox(db, redis, redis_auth)
    start = await events.publish(redis, redis_auth, "test.start", {})
    asked = [*ids, ids[0]]  # the first message asked for twice
    claims = await asyncio.gather(*(outbox.claim_for_campaign(i, "w-camp", optouts.peer_key(f"@c{n % 12}"))
                                    for n, i in enumerate(asked)))
    assert outbox.claim_calls == 1
    got = {i: c for i, c in zip(asked[:12], claims[:12], strict=True)}
    assert got[ids[3]] is None and got[ids[5]] is None
    assert (claims[0] is None) != (claims[12] is None)  # the twice-asked message went to one caller
    for n, message_id in enumerate(ids):
        if n in (0, 3, 5):
            continue
        claimed = got[message_id]
        assert claimed is not None and claimed["id"] == message_id and claimed["peer"] == f"@c{n}"
        assert claimed["status"] == "sending" and claimed["attempts"] == 1 and claimed["has_files"] is False
    stored = {r["id"]: r for r in await db.fetch(
        "SELECT id, status, claimed_by, attempts, error FROM messages WHERE id = ANY($1::bigint[])", ids)}
    assert (stored[ids[3]]["claimed_by"], stored[ids[3]]["attempts"]) == ("w-other", 1)
    assert (stored[ids[5]]["status"], stored[ids[5]]["error"], stored[ids[5]]["attempts"]) == ("cancelled",
                                                                                                "opted out", 0)
    assert stored[ids[0]]["attempts"] == 1 and stored[ids[0]]["claimed_by"] == "w-camp"
    announced = [json.loads(text)["data"] async for _, text in events.log_after(redis, redis_auth, start, 100)]
    assert announced == [{"message_id": ids[5], "status": "cancelled", "account_id": account_id,
                          "error": "opted out"}]

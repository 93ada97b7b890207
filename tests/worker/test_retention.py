"""The retention purge: finished rows older than their retention go, in batches, one purger at a
time; newer rows and rows still in play stay, and campaigns keep their progress."""

from __future__ import annotations

import os
import uuid
from typing import Any

import asyncpg

from telegram_platform.metrics.definitions import create_metrics
from telegram_platform.settings import RetentionSettings
from telegram_platform.storage import campaigns as campaign_store
from telegram_platform.storage import webhooks as webhook_store
from telegram_platform.worker.retention import PURGE_LOCK_KEY, Purger

DAYS = 86_400.0
THIRTY_DAYS = RetentionSettings(webhook_deliveries=30 * DAYS, incoming=30 * DAYS, messages=30 * DAYS,
                                refresh_tokens=30 * DAYS)


async def _messages(db: asyncpg.Pool, account_id: int, campaign_id: int) -> dict[str, list[int]]:
    """Messages by (status, age), some of them a campaign's with their recipient."""
    made: dict[str, list[int]] = {}
    rows: list[tuple[str, str, bool]] = (
        [("sent", "40 days", True)] * 3 + [("sent", "40 days", False)] * 2 + [("failed", "40 days", True)]
        + [("failed", "40 days", False)] + [("cancelled", "40 days", True)] + [("queued", "40 days", True)]
        + [("sending", "40 days", False)] + [("sent", "1 day", True)] * 2)
    for n, (status, age, of_campaign) in enumerate(rows):
        message_id = await db.fetchval(
            f"""INSERT INTO messages (account_id, peer, text, status, campaign_id, updated_at, created_at)
                VALUES ($1, $2, 'hi', $3, $4, now() - interval '{age}', now() - interval '{age}') RETURNING id""",
            account_id, f"@peer{n}", status, campaign_id if of_campaign else None)
        if of_campaign:
            recipient_id = await db.fetchval(
                """INSERT INTO campaign_recipients (campaign_id, peer, peer_key, status, message_id)
                   VALUES ($1, $2, $2, 'assigned', $3) RETURNING id""", campaign_id, f"peer{n}", message_id)
            await db.execute("UPDATE messages SET recipient_id = $2 WHERE id = $1", message_id, recipient_id)
        made.setdefault(f"{status} {age}", []).append(message_id)
    return made


async def _refresh_tokens(db: asyncpg.Pool) -> dict[str, uuid.UUID]:
    user_id = await db.fetchval("INSERT INTO users (username, password_hash, role) VALUES ('u', 'x', 'viewer') "
                                "RETURNING id")
    dead, live, lone, recent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    tokens = {  # name: (family, expires in, revoked ago)
        "dead-family-1": (dead, "10 days", "40 days"), "dead-family-2": (dead, "10 days", "35 days"),
        "live-family-spent": (live, "-10 days", "40 days"), "live-family-live": (live, "20 days", None),
        "long-expired": (lone, "-31 days", None), "recently-spent": (recent, "20 days", "1 day"),
    }
    ids = {}
    for name, (family, expires_in, revoked_ago) in tokens.items():
        revoked = f"now() - interval '{revoked_ago}'" if revoked_ago else "NULL"
        ids[name] = await db.fetchval(
            f"""INSERT INTO refresh_tokens (id, user_id, expires_at, revoked_at, token_hash, family_id)
                VALUES ($1, $2, now() + interval '{expires_in}', {revoked}, $3, $4) RETURNING id""",
            uuid.uuid4(), user_id, os.urandom(32), family)
    return ids


async def test_old_final_rows_are_purged_in_batches_and_the_rest_stays(db: asyncpg.Pool) -> None:
    """Sent/failed/cancelled messages, finished deliveries, incoming messages and dead refresh tokens
    older than the retention are deleted, a few per statement; queued and sending messages, pending
    deliveries, newer rows and the spent tokens of a live family stay; a campaign's progress and its
    recipients' statuses do not change; the metric counts what went, per table."""
    account_id = await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996620001') RETURNING id")
    campaign_id = await db.fetchval(
        "INSERT INTO campaigns (name, template, status, total) VALUES ('c', 't', 'running', 8) RETURNING id")
    messages = await _messages(db, account_id, campaign_id)
    await db.executemany(
        """INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text, received_at)
           VALUES ($1, 1, $2, '@a', 'x', now() - make_interval(days => $3))""",
        [(account_id, n, 40 if n < 5 else 1) for n in range(7)])
    hook = await webhook_store.create_webhook(db, url="http://127.0.0.1:9/", events=["*"], sealed_secret=b"x",
                                              description="", active=True, created_by=None)
    await db.executemany(
        """INSERT INTO webhook_deliveries (webhook_id, event_key, event_type, payload, status, created_at)
           VALUES ($1, $2, 'e', '{}', $3, now() - make_interval(days => $4))""",
        [(hook["id"], os.urandom(32), status, days) for status, days in
         [("delivered", 40)] * 3 + [("failed", 40)] * 2 + [("pending", 40)] * 2 + [("delivered", 1)]])
    tokens = await _refresh_tokens(db)
    campaign = await db.fetchrow("SELECT * FROM campaigns WHERE id = $1", campaign_id)
    progress_before = await campaign_store.progress(db, campaign)

    metrics = create_metrics(None)
    done = await Purger(db, THIRTY_DAYS, metrics, batch=2).run_once()

    assert done == {"webhook_deliveries": (5, 3), "incoming_messages": (5, 3), "messages": (8, 5),
                    "refresh_tokens": (3, 2)}
    kept = {r["id"] for r in await db.fetch("SELECT id FROM messages")}
    assert kept == {*messages["queued 40 days"], *messages["sending 40 days"], *messages["sent 1 day"]}
    assert await campaign_store.progress(db, campaign) == progress_before
    recipients = await db.fetch("SELECT status, message_id FROM campaign_recipients ORDER BY id")
    assert [r["status"] for r in recipients] == ["assigned"] * 8
    assert sum(r["message_id"] is None for r in recipients) == 5
    assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 2
    remaining: list[Any] = await db.fetch("SELECT status, created_at > now() - interval '2 days' AS new "
                                          "FROM webhook_deliveries ORDER BY id")
    assert [(r["status"], r["new"]) for r in remaining] == [("pending", False)] * 2 + [("delivered", True)]
    left = {r["id"] for r in await db.fetch("SELECT id FROM refresh_tokens")}
    assert left == {tokens["live-family-spent"], tokens["live-family-live"], tokens["recently-spent"]}
    for table, rows in [("messages", 8), ("incoming_messages", 5), ("webhook_deliveries", 5), ("refresh_tokens", 3)]:
        assert metrics.registry is not None
        assert metrics.registry.get_sample_value("tp_retention_purged_rows_total", {"table": table}) == rows

    assert await Purger(db, THIRTY_DAYS, metrics, batch=2).run_once() == {
        table: (0, 1) for table in ("webhook_deliveries", "incoming_messages", "messages", "refresh_tokens")}


async def test_one_purger_at_a_time_and_zero_keeps_forever(db: asyncpg.Pool) -> None:
    """While another process holds the purge's advisory lock a round does nothing; a retention of 0
    leaves its table alone; a round stops at its batch bound and the next one goes on."""
    account_id = await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996620002') RETURNING id")
    await db.executemany(
        """INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text, received_at)
           VALUES ($1, 1, $2, '@a', 'x', now() - interval '40 days')""", [(account_id, n) for n in range(5)])
    async with db.acquire() as other:
        await other.execute("SELECT pg_advisory_lock($1::bigint)", PURGE_LOCK_KEY)
        try:
            assert await Purger(db, THIRTY_DAYS, batch=2).run_once() is None
        finally:
            await other.execute("SELECT pg_advisory_unlock($1::bigint)", PURGE_LOCK_KEY)
    assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 5

    forever = RetentionSettings(webhook_deliveries=0, incoming=0, messages=0, refresh_tokens=0)
    assert await Purger(db, forever, batch=2).run_once() == {}
    assert await db.fetchval("SELECT count(*) FROM incoming_messages") == 5

    bounded = Purger(db, THIRTY_DAYS, batch=2, max_batches=2)
    assert (await bounded.run_once() or {})["incoming_messages"] == (4, 2)
    assert (await bounded.run_once() or {})["incoming_messages"] == (1, 1)

"""Campaign state in PostgreSQL under concurrent use: completion against an import in progress, a
cancel against a send in flight, resuming a paused scheduled campaign."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import asyncpg
import redis.asyncio as aioredis

from telegram_platform import redis_keys
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import campaigns as campaign_store
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.storage.optouts import peer_key
from telegram_platform.storage.outbox import Outbox


async def _running_campaign(db: asyncpg.Pool, phone: str, schedule_at: dt.datetime | None = None) -> dict:
    account = await account_store.create_account(db, phone, None)
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="hi", account_ids=[account["id"]], schedule_at=schedule_at,
        recipients=[("@one", {})], idempotency_key=None, created_by=None)
    return {"account_id": account["id"], **campaign}


async def test_completion_waits_for_an_import_and_sees_its_recipients(db: asyncpg.Pool) -> None:
    """A campaign whose work is done is not completed while an import holds it: once the import
    commits, its recipients are pending and the campaign stays running."""
    campaign = await _running_campaign(db, "+9996610001")
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])
    await db.execute("UPDATE campaign_recipients SET status = 'skipped' WHERE campaign_id = $1", campaign["id"])

    async with db.acquire() as importer:
        transaction = importer.transaction()
        await transaction.start()
        await campaign_store.add_recipients(importer, campaign["id"], [("@late1", {}), ("@late2", {})])
        completing = asyncio.create_task(campaign_store.complete_if_done(db, campaign["id"]))
        await asyncio.sleep(0.3)
        assert not completing.done()  # it waits for the import's lock on the campaign
        await transaction.commit()
    assert await completing is False
    assert await campaign_store.status_of(db, campaign["id"]) == "running"
    assert await db.fetchval("SELECT count(*) FROM campaign_recipients WHERE campaign_id = $1 AND status = 'pending'",
                             campaign["id"]) == 2

    await db.execute("UPDATE campaign_recipients SET status = 'skipped' WHERE campaign_id = $1", campaign["id"])
    assert await campaign_store.complete_if_done(db, campaign["id"]) is True
    assert await campaign_store.status_of(db, campaign["id"]) == "completed"
    assert await campaign_store.complete_if_done(db, campaign["id"]) is False  # not running any more


async def test_a_send_requeued_after_its_campaign_was_cancelled_is_cancelled(db: asyncpg.Pool,
                                                                              redis: aioredis.Redis,
                                                                              redis_auth: RedisAuth) -> None:
    """A campaign message in flight when the campaign is cancelled, then answered with a 429, ends
    cancelled (no runner would ever send it); a message outside any campaign is requeued."""
    campaign = await _running_campaign(db, "+9996610002")
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])
    in_flight = await db.fetchval(
        """INSERT INTO messages (account_id, peer, text, status, campaign_id, claimed_by)
           VALUES ($1, '@one', 'hi', 'sending', $2, 'w') RETURNING id""", campaign["account_id"], campaign["id"])
    await campaign_store.transition(db, campaign["id"], "cancel")
    outbox = Outbox(db, redis, redis_auth)
    claimed = {"id": in_flight, "account_id": campaign["account_id"], "campaign_id": campaign["id"]}
    assert await outbox.requeue(claimed, 30, "FLOOD_WAIT_30", "rate_limited") == "cancelled"
    row = await db.fetchrow("SELECT status, error, claimed_by FROM messages WHERE id = $1", in_flight)
    assert dict(row) == {"status": "cancelled", "error": "campaign cancelled", "claimed_by": None}

    single, _ = await outbox_store.create_message(db, account_id=campaign["account_id"], peer="@two", text="t",
                                                   idempotency_key=None, created_by=None)
    await db.execute("UPDATE messages SET status = 'sending', claimed_by = 'w' WHERE id = $1", single["id"])
    assert await outbox.requeue(single, 30, "FLOOD_WAIT_30", "rate_limited") == "queued"
    assert await outbox.requeue(single, 30, "again", "rate_limited") is None  # not sending


async def test_a_cancel_landing_during_a_requeue_is_seen(db: asyncpg.Pool, redis: aioredis.Redis,
                                                         redis_auth: RedisAuth) -> None:
    """While a cancel holds the campaign, a requeue waits for it and then cancels the message."""
    campaign = await _running_campaign(db, "+9996610003")
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])
    in_flight = await db.fetchval(
        """INSERT INTO messages (account_id, peer, text, status, campaign_id, claimed_by)
           VALUES ($1, '@one', 'hi', 'sending', $2, 'w') RETURNING id""", campaign["account_id"], campaign["id"])
    async with db.acquire() as canceller:
        transaction = canceller.transaction()
        await transaction.start()
        await canceller.execute("UPDATE campaigns SET status = 'cancelled' WHERE id = $1", campaign["id"])
        claimed = {"id": in_flight, "account_id": campaign["account_id"], "campaign_id": campaign["id"]}
        requeue = asyncio.create_task(Outbox(db, redis, redis_auth).requeue(claimed, 1, "transient", "transient"))
        await asyncio.sleep(0.3)
        assert not requeue.done()
        await transaction.commit()
    assert await requeue == "cancelled"


async def test_resuming_a_campaign_paused_before_its_time_schedules_it_again(db: asyncpg.Pool) -> None:
    """Paused while scheduled for tomorrow, resumed: scheduled again, not running now; one whose time
    has passed resumes running."""
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    campaign = await _running_campaign(db, "+9996610004", schedule_at=tomorrow)
    assert (await campaign_store.transition(db, campaign["id"], "pause"))["status"] == "paused"
    resumed = await campaign_store.transition(db, campaign["id"], "resume")
    assert resumed["status"] == "scheduled" and resumed["started_at"] is None

    await db.execute("UPDATE campaigns SET schedule_at = now() - interval '1 minute' WHERE id = $1", campaign["id"])
    assert (await campaign_store.transition(db, campaign["id"], "pause"))["status"] == "paused"
    assert (await campaign_store.transition(db, campaign["id"], "resume"))["status"] == "running"


async def test_a_failed_campaign_can_be_resumed_or_cancelled(db: asyncpg.Pool) -> None:
    """A campaign that failed because no account could send resumes running, its error and end time
    cleared and its pending recipients still there; failed again, it can be cancelled instead."""
    campaign = await _running_campaign(db, "+9996610005")
    await campaign_store.transition(db, campaign["id"], "start")
    assert await campaign_store.finish(db, campaign["id"], "failed", "no account can send: PEER_FLOOD")
    resumed = await campaign_store.transition(db, campaign["id"], "resume")
    assert resumed["status"] == "running" and resumed["error"] is None and resumed["finished_at"] is None
    assert resumed["progress"]["pending"] == 1

    assert await campaign_store.finish(db, campaign["id"], "failed", "no account can send: PEER_FLOOD")
    cancelled = await campaign_store.transition(db, campaign["id"], "cancel")
    assert cancelled["status"] == "cancelled" and cancelled["progress"]["cancelled"] == 1


async def test_an_opted_out_campaign_message_is_cancelled_with_its_event_by_the_claim(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Claiming a campaign message whose peer opted out meanwhile cancels it and publishes that
    `message.status` in the same step; a claim of a peer still reachable returns the row, sending."""
    campaign = await _running_campaign(db, "+9996610004")
    ids = [await db.fetchval(
        """INSERT INTO messages (account_id, peer, text, status, campaign_id)
           VALUES ($1, $2, 'hi', 'queued', $3) RETURNING id""", campaign["account_id"], peer, campaign["id"])
        for peer in ("@gone", "@here")]
    await db.execute("INSERT INTO optouts (peer_key, peer) VALUES ($1, $2)", peer_key("@gone"), "@gone")
    outbox = Outbox(db, redis, redis_auth)
    await redis.delete(redis_keys.EVENTS_LOG)

    assert await outbox.claim_for_campaign(ids[0], "w", peer_key("@gone")) is None
    claimed = await outbox.claim_for_campaign(ids[1], "w", peer_key("@here"))

    assert claimed is not None and claimed["id"] == ids[1] and claimed["status"] == "sending"
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", ids[0]) == "cancelled"
    published = [json.loads(entry[1][b"e"]) for entry in await redis.xrange(redis_keys.EVENTS_LOG)]
    assert [(e["type"], e["data"]["message_id"], e["data"]["status"], e["data"]["error"]) for e in published] == [
        ("message.status", ids[0], "cancelled", "opted out")]


async def test_accounts_that_may_send_are_the_logged_in_ones_not_peer_flooded(db: asyncpg.Pool) -> None:
    """What a campaign member judges the accounts other hosts run by: ready or closed accounts, not
    those mid-login, logged out, or held by PEER_FLOOD (one whose PEER_FLOOD is over counts again)."""
    ids = {}
    for n, (state, flood) in enumerate([("ready", None), ("closed", None), ("wait_code", None), ("logged_out", None),
                                        ("ready", "1 hour"), ("ready", "-1 hour")]):
        account = await account_store.create_account(db, f"+99966313{n:02d}", None)
        await db.execute("UPDATE accounts SET auth_state = $2, peer_flood_until = now() + $3::text::interval "
                         "WHERE id = $1", account["id"], state, flood)
        ids[n] = account["id"]
    assert await campaign_store.accounts_that_may_send(db, list(ids.values())) == [ids[0], ids[1], ids[5]]
    assert await campaign_store.accounts_that_may_send(db, [ids[2], 10_000]) == []


async def test_a_batch_hands_out_recipients_as_the_queued_messages_it_returns(db: asyncpg.Pool) -> None:
    """assign_batch returns the queued messages it made, oldest first and ready to claim; an
    opted-out recipient is skipped and counted, one whose text cannot be sent gets a failed message
    that is not returned (both counted as taken otherwise), and a campaign no longer running hands
    out nothing."""
    account = await account_store.create_account(db, "+9996610090", None)
    recipients = [("@b0", {"name": "A"}), ("@b1", {"name": "B"}), ("@out", {"name": "C"}),
                  ("@long", {"name": "x" * 5000}), ("@b4", {"name": "D"}), ("@b5", {"name": "E"})]
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="Hi {name}", account_ids=[account["id"]], schedule_at=None,
        recipients=recipients, idempotency_key=None, created_by=None)
    await db.execute("INSERT INTO optouts (peer_key, peer) VALUES ($1, '@out')", peer_key("@out"))
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])

    rows, set_aside = await campaign_store.assign_batch(db, campaign, account["id"], 5)

    assert set_aside == 2
    assert [(r["peer"], r["text"], r["status"]) for r in rows] == [("@b0", "Hi A", "queued"), ("@b1", "Hi B", "queued"),
                                                                  ("@b4", "Hi D", "queued")]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert all(r["campaign_id"] == campaign["id"] and r["random_id"] and r["recipient_id"] for r in rows)
    assert rows == await campaign_store.queued_for(db, campaign["id"], account["id"], 10)
    stored = {r["peer"]: (r["status"], r["message_status"]) for r in await db.fetch(
        """SELECT r.peer, r.status, m.status AS message_status FROM campaign_recipients r
           LEFT JOIN messages m ON m.id = r.message_id WHERE r.campaign_id = $1""", campaign["id"])}
    assert stored == {"@b0": ("assigned", "queued"), "@b1": ("assigned", "queued"), "@out": ("skipped", None),
                      "@long": ("assigned", "failed"), "@b4": ("assigned", "queued"), "@b5": ("pending", None)}
    assert await db.fetchval("SELECT skipped FROM campaigns WHERE id = $1", campaign["id"]) == 1
    await db.execute("UPDATE campaigns SET status = 'paused' WHERE id = $1", campaign["id"])
    assert await campaign_store.assign_batch(db, campaign, account["id"], 5) == ([], 0)


async def test_one_transaction_refills_several_accounts_each_with_its_share_in_order(db: asyncpg.Pool) -> None:
    """assign_batches gives each account the next recipients up to its limit, in the campaign's order
    (an opted-out one counted in its account's share), and what is left stays pending."""
    first = await account_store.create_account(db, "+9996610091", None)
    second = await account_store.create_account(db, "+9996610092", None)
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="Hi {name}", account_ids=[first["id"], second["id"]], schedule_at=None,
        recipients=[(f"@m{n}", {"name": str(n)}) for n in range(7)], idempotency_key=None, created_by=None)
    await db.execute("INSERT INTO optouts (peer_key, peer) VALUES ($1, '@m3')", peer_key("@m3"))
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])

    (mine, skipped_mine), (theirs, skipped_theirs) = await campaign_store.assign_batches(
        db, campaign, [(first["id"], 2), (second["id"], 3)])

    assert [(r["peer"], r["account_id"]) for r in mine] == [("@m0", first["id"]), ("@m1", first["id"])]
    assert [(r["peer"], r["account_id"]) for r in theirs] == [("@m2", second["id"]), ("@m4", second["id"])]
    assert (skipped_mine, skipped_theirs) == (0, 1)
    pending = await db.fetch("SELECT peer FROM campaign_recipients WHERE campaign_id = $1 AND status = 'pending' "
                             "ORDER BY id", campaign["id"])
    assert [r["peer"] for r in pending] == ["@m5", "@m6"]


async def test_a_member_takes_only_its_part_of_a_campaigns_tail_shared_among_its_accounts(db: asyncpg.Pool) -> None:
    """With 10 recipients left and a member running half the campaign's accounts (share 0.5), a refill
    of two accounts asking for 4 each takes 5, split 3 and 2, not 4 and 4 with none for the others."""
    first = await account_store.create_account(db, "+9996610093", None)
    second = await account_store.create_account(db, "+9996610094", None)
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="hi", account_ids=[first["id"], second["id"]], schedule_at=None,
        recipients=[(f"@t{n}", {}) for n in range(10)], idempotency_key=None, created_by=None)
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])

    (mine, _), (theirs, _) = await campaign_store.assign_batches(db, campaign, [(first["id"], 4), (second["id"], 4)],
                                                                 share=0.5)

    assert ([r["peer"] for r in mine], [r["peer"] for r in theirs]) == (["@t0", "@t1", "@t2"], ["@t3", "@t4"])
    assert await db.fetchval("SELECT count(*) FROM campaign_recipients WHERE campaign_id = $1 AND status = 'pending'",
                             campaign["id"]) == 5

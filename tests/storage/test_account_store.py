"""Removing an account keeps the record of what it sent and hands on what it had not sent."""

from __future__ import annotations

import asyncpg

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import campaigns as campaign_store
from telegram_platform.storage import outbox as outbox_store


async def test_a_removed_accounts_messages_stay_and_its_unsent_work_is_handed_on(db: asyncpg.Pool) -> None:
    """After DELETE of an account in a running campaign: its sent messages stay (account_id null)
    and the campaign's progress is unchanged; its queued campaign message goes back to a pending
    recipient for the other account; one only it could re-send, and a send caught in flight, fail
    as unknown; its own queued message is cancelled."""
    gone = (await account_store.create_account(db, "+9996610201", None))["id"]
    stays = (await account_store.create_account(db, "+9996610202", None))["id"]
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="hi", account_ids=[gone, stays], schedule_at=None,
        recipients=[(f"@r{i}", {}) for i in range(5)], idempotency_key=None, created_by=None)
    await db.execute("UPDATE campaigns SET status = 'running' WHERE id = $1", campaign["id"])
    recipients = [r["id"] for r in await db.fetch(
        "SELECT id FROM campaign_recipients WHERE campaign_id = $1 ORDER BY id", campaign["id"])]
    by_status = {}
    for recipient, status, unknown in zip(recipients, ("sent", "sent", "queued", "queued", "sending"),
                                          (False, False, False, True, False), strict=True):
        message_id = await db.fetchval(
            """INSERT INTO messages (account_id, peer, text, status, campaign_id, recipient_id, delivery_unknown,
                                     sent_at)
               VALUES ($1, 'p', 'hi', $2, $3, $4, $5, CASE WHEN $2 = 'sent' THEN now() END) RETURNING id""",
            gone, status, campaign["id"], recipient, unknown)
        await db.execute("UPDATE campaign_recipients SET status = 'assigned', message_id = $2 WHERE id = $1",
                         recipient, message_id)
        by_status.setdefault((status, unknown), []).append(message_id)
    single, _ = await outbox_store.create_message(db, account_id=gone, peer="@x", text="t",
                                                   idempotency_key=None, created_by=None)
    before = await campaign_store.progress(db, await campaign_store.campaign_for_run(db, campaign["id"]))

    await account_store.delete_account(db, gone)

    rows = {r["id"]: r for r in await db.fetch("SELECT id, account_id, status, error_class FROM messages")}
    for message_id in by_status[("sent", False)]:
        assert rows[message_id]["status"] == "sent" and rows[message_id]["account_id"] is None
    [handed_back] = by_status[("queued", False)]
    assert handed_back not in rows  # its recipient is pending again, for the other account
    assert await db.fetchval("SELECT status FROM campaign_recipients WHERE id = $1", recipients[2]) == "pending"
    for key in (("queued", True), ("sending", False)):
        [message_id] = by_status[key]
        assert (rows[message_id]["status"], rows[message_id]["error_class"]) == ("failed", "unknown")
    assert rows[single["id"]]["status"] == "cancelled"
    after = await campaign_store.progress(db, await campaign_store.campaign_for_run(db, campaign["id"]))
    assert after["sent"] == before["sent"] == 2
    assert after["failed"] == 2 and after["pending"] == 1
    assert await db.fetchval("SELECT array_agg(account_id) FROM campaign_accounts WHERE campaign_id = $1",
                             campaign["id"]) == [stays]


KEY = bytes.fromhex("5" * 64)


async def test_proxy_credentials_are_sealed_and_never_read_back(db: asyncpg.Pool) -> None:
    """A proxy's password and MTProto secret are stored sealed, read back as flags only, and
    unsealed for the session alone."""
    proxy = {"type": "socks5", "server": "10.1.2.3", "port": 1080, "username": "u", "password": "pw-s3cret-91",
             "secret": None, "http_only": False}
    account = await account_store.create_account(db, "+9996610301", proxy, encryption_key=KEY)
    mtproto = {"type": "mtproto", "server": "10.1.2.4", "port": 443, "secret": "ee0123456789abcdef"}
    other = await account_store.create_account(db, "+9996610302", mtproto, encryption_key=KEY)
    row = await db.fetchrow("SELECT * FROM accounts WHERE id = $1", account["id"])
    assert "pw-s3cret-91" not in repr(dict(row))
    dump = repr([dict(r) for r in await db.fetch("SELECT * FROM accounts")])
    assert "ee0123456789abcdef" not in dump
    for shown in (account, await account_store.get_account(db, account["id"]), *await account_store.list_accounts(db)):
        assert "password" not in (shown["proxy"] or {}) and "secret" not in (shown["proxy"] or {})
    assert account["proxy"]["has_password"] is True and account["proxy"]["has_secret"] is False
    assert other["proxy"]["has_secret"] is True and other["proxy"]["has_password"] is False
    assert (await account_store.session_proxy(db, KEY, account["id"]) or {})["password"] == "pw-s3cret-91"
    assert (await account_store.session_proxy(db, KEY, other["id"]) or {})["secret"] == "ee0123456789abcdef"
    assert await account_store.session_proxy(db, KEY, (await account_store.create_account(
        db, "+9996610303", None))["id"]) is None


async def test_the_owner_host_follows_the_fencing_token(db: asyncpg.Pool) -> None:
    """Taking ownership names the host with the new token; letting go clears it only under the token
    it was taken with, so an owner that lost the account to another host clears nothing."""
    account_id = (await account_store.create_account(db, "+9996610301", None))["id"]

    async def owner() -> object:
        return await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account_id)

    first = await account_store.take_ownership(db, account_id, "host-a")
    assert await owner() == "host-a"
    second = await account_store.take_ownership(db, account_id, "host-b")
    assert second == first + 1 and await owner() == "host-b"
    await account_store.let_go(db, {account_id: first})  # host-a's late close
    assert await owner() == "host-b"
    await account_store.let_go(db, {account_id: second})
    assert await owner() is None

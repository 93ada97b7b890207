"""The Telegram host's sends (worker/sender.py) when something other than Telegram fails: Redis away, an outcome it
could not record, an account whose login has ended."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from support import EmulatorHandle, Host, HostFactory, TcpProxy

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import outbox as outbox_store
from telegram_platform.telegram.base import NotAuthorized
from telegram_platform.telegram.keys import set_aside_copies
from telegram_platform.worker.unknown_outcomes import settle_abandoned_sends


async def _logged_in(host_factory: HostFactory, db: asyncpg.Pool, phone: str, code: str,
                     redis_client: aioredis.Redis) -> tuple[Host, int]:
    host = await host_factory("host-a", redis_client=redis_client)
    account_id = int((await account_store.create_account(db, phone, None))["id"])
    await host.requests.handle_request({"op": "login", "account_id": account_id})
    assert (await host.requests.handle_request({"op": "code", "account_id": account_id,
                                       "args": {"code": code}}))["auth_state"] == "ready"
    return host, account_id


async def _claimed(db: asyncpg.Pool, account_id: int, worker: str) -> dict[str, Any]:
    message, _ = await outbox_store.create_message(db, account_id=account_id, peer="@bob", text="hi",
                                                    idempotency_key=None, created_by=None)
    row = await outbox_store.claim_for_send(db, message["id"], worker)
    assert row is not None
    return row


async def test_a_send_goes_out_and_is_recorded_while_redis_is_away(
        redis_proxy: tuple[TcpProxy, aioredis.Redis], make_host: HostFactory, db: asyncpg.Pool) -> None:
    """With the account open and Redis cut, a send is made and recorded `sent`: its status events
    are lost (logged), the message is not left `sending`."""
    proxy, cut_off = redis_proxy
    host, account_id = await _logged_in(make_host, db, "+9996631111", "33333", cut_off)
    row = await _claimed(db, account_id, "host-a")
    await proxy.cut()
    try:
        assert await host.sender.send(row) is None
    finally:
        await proxy.start()  # for the host's own shutdown
    stored = await db.fetchrow("SELECT status, telegram_message_id FROM messages WHERE id = $1", row["id"])
    assert stored["status"] == "sent" and stored["telegram_message_id"] is not None
    assert not host.sender.unrecorded


async def test_a_send_that_cannot_open_its_account_is_requeued_not_stuck(
        redis_proxy: tuple[TcpProxy, aioredis.Redis], make_host: HostFactory, db: asyncpg.Pool) -> None:
    """The account not open here and Redis (its lease) away: nothing reached Telegram, so the
    message goes back to `queued` with a retry delay, on any backend."""
    proxy, cut_off = redis_proxy
    host, account_id = await _logged_in(make_host, db, "+9996631112", "33333", cut_off)
    await host.sessions.close_account(account_id)
    row = await _claimed(db, account_id, "host-a")
    await proxy.cut()
    try:
        delay = await host.sender.send(row)
    finally:
        await proxy.start()
    assert delay is not None and delay > 0
    stored = await db.fetchrow("SELECT status, error_class, error FROM messages WHERE id = $1", row["id"])
    assert stored["status"] == "queued" and stored["error_class"] == "transient", dict(stored)
    assert stored["error"].startswith("account not opened")


@pytest.mark.parametrize("keyed", [True, False])
async def test_a_send_whose_outcome_was_not_recorded_is_settled_by_its_own_worker(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, keyed: bool) -> None:
    """Sender.send() failing after the claim (here: the database refuses the outcome) leaves the id in
    `unrecorded`; the abandoned-sends task settles it although its worker lives: re-sent with its
    random_id when keyed, else failed as unknown; the set is then empty."""
    host, account_id = await _logged_in(make_host, db, "+9996631113", "33333", redis)
    row = await _claimed(db, account_id, "host-a")
    await db.execute("ALTER TABLE messages ADD CONSTRAINT no_sent_yet CHECK (status <> 'sent') NOT VALID")
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await host.sender.send(row)
    finally:
        await db.execute("ALTER TABLE messages DROP CONSTRAINT no_sent_yet")
    assert host.sender.unrecorded == {row["id"]}
    assert await db.fetchval("SELECT status FROM messages WHERE id = $1", row["id"]) == "sending"

    await settle_abandoned_sends(db, host.sender.outbox, sends_random_id=keyed, self_identity="host-a",
                                 unrecorded=host.sender.unrecorded)
    stored = await db.fetchrow("SELECT status, error_class, error FROM messages WHERE id = $1", row["id"])
    assert stored["status"] == ("queued" if keyed else "failed") and stored["error_class"] == "unknown"
    assert "could not record" in stored["error"]
    assert not host.sender.unrecorded


async def test_a_send_whose_session_is_closed_under_it_is_requeued_not_failed(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, fresh_emulator: EmulatorHandle) -> None:
    """A send that has its account's session in hand when the session is closed (its lease lost
    when its host was cut off, a move) is put back `queued` as transient, not failed as a logged-out
    account's: Telegram saw nothing, and the account's next holder sends it."""
    host, account_id = await _logged_in(make_host, db, "+9996631115", "33333", redis)
    row = await _claimed(db, account_id, "host-a")
    hosted = await host.sessions.open_for_sending(account_id)
    async with hosted.send_lock:  # the send waits here, its session already in hand
        sending = asyncio.create_task(host.sender.send(row))
        await asyncio.sleep(0.2)
        assert not sending.done()
        await host.sessions.close_account(account_id)
    delay = await asyncio.wait_for(sending, 30)
    assert delay is not None and delay > 0
    stored = await db.fetchrow("SELECT status, error_class, error FROM messages WHERE id = $1", row["id"])
    assert stored["status"] == "queued" and stored["error_class"] == "transient", dict(stored)
    assert "auth_state=closed" in stored["error"]
    assert not fresh_emulator.telegram.received_by("@bob")


async def test_a_send_never_starts_a_login_for_an_account_whose_login_ended(
        make_host: HostFactory, db: asyncpg.Pool, fresh_emulator: EmulatorHandle) -> None:
    """An account stored as logged_out (or mid-login) and not open anywhere is refused for sending
    (NotAuthorized), and Telegram is asked for no login code; a message to it fails as such."""
    host = await make_host("host-a")
    account_id = int((await account_store.create_account(db, "+9996631114", None))["id"])
    await db.execute("UPDATE accounts SET auth_state = 'logged_out' WHERE id = $1", account_id)
    with pytest.raises(NotAuthorized):
        await host.sessions.open_for_sending(account_id)
    row = await _claimed(db, account_id, "host-a")
    assert await host.sender.send(row) is None
    stored = await db.fetchrow("SELECT status, error FROM messages WHERE id = $1", row["id"])
    assert stored["status"] == "failed" and "logged_out" in stored["error"], dict(stored)
    assert fresh_emulator.telegram.counters["code_requests"] == 0


async def test_set_aside_leaves_a_database_that_opens_to_a_live_session(
        make_host: HostFactory, db: asyncpg.Pool, fresh_emulator: EmulatorHandle) -> None:
    """Login again with set_aside_database on an account not open here answers as without the flag
    when its database opens to a session: a stored login resumes ready, an account with no login
    yet starts one; neither database is set aside."""
    host = await make_host("host-a")
    ready = int((await account_store.create_account(db, "+9996631115", None))["id"])
    await host.requests.handle_request({"op": "login", "account_id": ready})
    await host.requests.handle_request({"op": "code", "account_id": ready, "args": {"code": "33333"}})
    await host.sessions.close_account(ready)
    answer = await host.requests.handle_request({"op": "login_again", "account_id": ready,
                                        "args": {"set_aside_database": True}})
    assert answer["auth_state"] == "ready"
    assert (host.sessions.backend.database_dir(ready) / "session.bin").exists()
    assert not set_aside_copies(host.sessions.backend.database_dir(ready))

    fresh = int((await account_store.create_account(db, "+9996631116", None))["id"])
    answer = await host.requests.handle_request({"op": "login_again", "account_id": fresh,
                                        "args": {"set_aside_database": True}})
    assert answer["auth_state"] == "wait_code"
    assert not set_aside_copies(host.sessions.backend.database_dir(fresh))
    assert fresh_emulator.telegram.counters["code_requests"] == 2  # the first login's, and this one's

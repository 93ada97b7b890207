"""A host's accounts when its worker stops (worker/account_sessions.py `hand_off`, `aclose`), with two
in-process hosts of different TP_HOST_ID on the real PostgreSQL, Redis and emulator: handed to the
live host and waited for, kept by the only host, and a kept account left to its live host by the
others' orphan scans and resumes until that host is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import asyncpg
import redis.asyncio as aioredis
from support import EmulatorHandle, Host, HostFactory

from telegram_platform.queue import routing
from telegram_platform.queue.consumer import heartbeat
from telegram_platform.redis_keys import host_alive
from telegram_platform.settings import Settings
from telegram_platform.telegram.base import AuthState


def _on(settings: Settings, host_id: str) -> Settings:
    return dataclasses.replace(settings, host=dataclasses.replace(settings.host, id=host_id))


async def _live(db: asyncpg.Pool, redis: aioredis.Redis, host_id: str, worker: str) -> None:
    """The host up in PostgreSQL and alive in Redis, with one live worker child `worker`."""
    await db.execute("INSERT INTO hosts (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET last_seen = now()", host_id)
    await routing.mark_alive(redis, host_id)
    await heartbeat(redis, worker)


async def _logged_in(host: Host, db: asyncpg.Pool, phone: str) -> int:
    account_id = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ($1) RETURNING id", phone))
    requests = host.requests
    await requests.handle_request({"op": "login", "account_id": account_id})
    await requests.handle_request({"op": "code", "account_id": account_id, "args": {"code": phone[6] * 5}})
    return account_id


async def test_a_stopping_host_hands_every_account_to_the_live_host_and_waits_for_it(
        make_host: HostFactory, settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
        redis_url: str, fresh_emulator: EmulatorHandle) -> None:
    """host-a's hand-off gives both its accounts to host-b, which answers that it holds them open
    (READY, owned by host-b, no new login); host-a is no longer marked alive, and what it closes
    afterwards is nobody's (nothing is left)."""
    a = await make_host("host-a/w0-1", settings=_on(settings, "host-a"))
    b = await make_host("host-b/w0-2", settings=_on(settings, "host-b"))
    await _live(db, redis, "host-a", "host-a/w0-1")
    await _live(db, redis, "host-b", "host-b/w0-2")
    ids = [await _logged_in(a, db, f"+999662200{n}") for n in (1, 2)]
    logins = fresh_emulator.telegram.counters["logins"]
    listener = aioredis.Redis.from_url(redis_url)
    serving = asyncio.create_task(b.requests.serve_requests(listener))
    try:
        assert await a.sessions.hand_off(time.monotonic() + 20) == 2
    finally:
        b.requests.stop_taking_requests()
        await asyncio.wait_for(serving, 5)
        await listener.aclose()
    assert a.sessions.handing_off and a.sessions.leaving and a.sessions._accounts == {}
    assert set(b.sessions._accounts) == set(ids)
    assert all(b.sessions._accounts[i].session.auth_state is AuthState.READY for i in ids)
    assert dict(await db.fetch("SELECT id, owner_host FROM accounts")) == {i: "host-b" for i in ids}
    assert not await redis.exists(host_alive("host-a"))
    assert fresh_emulator.telegram.counters["logins"] == logins
    assert await a.sessions.resume_orphaned_accounts() == 0  # leaving: it opens nothing any more


async def test_the_only_host_keeps_its_accounts_and_the_others_leave_them_while_it_lives(
        make_host: HostFactory, settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle) -> None:
    """With no other live host a hand-off moves nothing, and the close keeps `owner_host`; a host
    joining then leaves the account to host-a (orphan scan and resume) while host-a is alive, and
    opens it, without a login, once host-a's mark of life is gone."""
    a = await make_host("host-a/w0-1", settings=_on(settings, "host-a"))
    await _live(db, redis, "host-a", "host-a/w0-1")
    account_id = await _logged_in(a, db, "+9996622003")
    assert await a.sessions.hand_off(time.monotonic() + 20) == 0
    assert not a.sessions.handing_off
    await a.sessions.aclose(time.monotonic() + 5, keep_ownership=not a.sessions.handing_off)
    assert await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account_id) == "host-a"

    b = await make_host("host-b/w0-2", settings=_on(settings, "host-b"))
    await _live(db, redis, "host-b", "host-b/w0-2")
    logins = fresh_emulator.telegram.counters["logins"]
    assert await b.sessions.resume_orphaned_accounts() == 0
    assert await b.sessions.resume_ready_accounts() == 0
    await redis.delete(host_alive("host-a"))  # host-a did not come back: its mark expired
    assert await b.sessions.resume_orphaned_accounts() == 1
    assert b.sessions._accounts[account_id].session.auth_state is AuthState.READY
    assert await db.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account_id) == "host-b"
    assert fresh_emulator.telegram.counters["logins"] == logins

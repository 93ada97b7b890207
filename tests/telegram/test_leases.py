"""One account, one live client in the whole deployment: two Telegram hosts on one Redis.

The hosts run in this process over the emulator backend; each is what a worker child runs.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from support import ApiClient, EmulatorHandle, Host, HostFactory, TcpProxy, eventually

from telegram_platform import events, redis_keys
from telegram_platform.metrics.definitions import create_metrics
from telegram_platform.queue import routing
from telegram_platform.queue.consumer import heartbeat
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import TELEGRAM_REQUESTS, account_lease, host_requests, request_reply
from telegram_platform.settings import Settings
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage.hosts import announce
from telegram_platform.telegram import rpc
from telegram_platform.telegram.base import AuthState, ConnectionState, ConnectionStateChanged, OwnedElsewhere
from telegram_platform.telegram.leases import LEASE_TTL_MS, LeaseManager
from telegram_platform.worker.child import CLOSE_SESSIONS_SECONDS


async def _account(db: asyncpg.Pool, phone: str) -> int:
    return int((await account_store.create_account(db, phone, None))["id"])


async def _reply(redis: aioredis.Redis, redis_auth: RedisAuth, request_id: str) -> dict[str, Any]:
    answer = await redis.blpop([request_reply(request_id)], timeout=5)
    assert answer is not None, "no reply"
    reply = redis_auth.open(answer[1], purpose=rpc.reply_purpose(request_id))
    assert reply is not None, "a reply not sealed for this request"
    return reply


async def test_a_second_host_is_told_owned_elsewhere_and_opens_nothing(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """Host B asking for host A's account gets OwnedElsewhere (409 owned_elsewhere), never a client."""
    a, b = await make_host("host-a"), await make_host("host-b")
    account_id = await _account(db, "+9996611111")
    assert (await a.requests.handle_request({"op": "login", "account_id": account_id}))["auth_state"] == "wait_code"

    with pytest.raises(OwnedElsewhere) as caught:
        await b.requests.handle_request({"op": "status", "account_id": account_id})
    assert caught.value.owner == "host-a"
    request = {"id": "r1", "op": "code", "account_id": account_id, "args": {"code": "11111"}}
    await b.requests._answer(request)
    reply = await _reply(redis, redis_auth, "r1")
    assert reply["error"]["status"] == 409 and reply["error"]["code"] == "owned_elsewhere"
    assert reply["error"]["details"] == {"owner": "host-a"}
    assert b.sessions.stats()["client_count"] == 0 and b.sessions.stats()["sessions_total"] == 0
    assert a.sessions.stats()["client_count"] == 1
    # A still owns it and completes the login.
    assert (await a.requests.handle_request(request))["auth_state"] == "ready"


async def test_requests_reach_the_owner(make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis,
                                        redis_auth: RedisAuth) -> None:
    """With A alive, a request goes to A's own list; one B takes from the shared list is forwarded to A."""
    a, b = await make_host("host-a"), await make_host("host-b")
    await heartbeat(redis, "host-a")
    account_id = await _account(db, "+9996622222")
    await a.requests.handle_request({"op": "login", "account_id": account_id})

    request = {"id": "r2", "op": "status", "account_id": account_id, "deadline": time.time() + 10}
    assert await rpc.submit(redis, redis_auth, request) == host_requests("host-a")
    await redis.delete(host_requests("host-a"))

    # B takes a request from the shared list (a race with the lease): it forwards, A answers.
    await redis.rpush(TELEGRAM_REQUESTS, redis_auth.seal(request, purpose=rpc.REQUEST_PURPOSE))
    serving = [asyncio.create_task(b.requests.serve_requests(redis))]
    await eventually(lambda: _llen(redis, host_requests("host-a")))
    serving.append(asyncio.create_task(a.requests.serve_requests(redis)))
    try:
        reply = await _reply(redis, redis_auth, "r2")
    finally:
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
    assert reply == {"result": {"auth_state": "wait_code", "connection_state": "ready"}}
    assert b.sessions.stats()["client_count"] == 0


async def test_the_api_answers_409_owned_elsewhere(make_host: HostFactory, api: ApiClient, admin_token: str,
                                                   db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """Through the API, an account leased by a process that is not a live host: 409 owned_elsewhere, at once."""
    b = await make_host("host-b")
    account_id = await _account(db, "+9996633333")
    await LeaseManager(redis, owner="elsewhere").acquire(account_id)
    serving = asyncio.create_task(b.requests.serve_requests(redis))
    try:
        started = time.monotonic()
        status, body = await api.call("POST", f"/api/accounts/{account_id}/auth/code", admin_token,
                                      json={"code": "33333"})
        assert time.monotonic() - started < 2
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    assert status == 409, body
    assert body["error"]["code"] == "owned_elsewhere"
    assert body["error"]["details"]["owner"] == "elsewhere"
    assert b.sessions.stats()["client_count"] == 0


async def test_a_host_that_stops_taking_requests_hands_its_own_back(make_host: HostFactory,
                                                                     redis: aioredis.Redis) -> None:
    """Told to stop, the request loop returns after its current wait (it is not cancelled mid-BLPOP);
    requests routed to the host after that go, in order, to the shared list for the next host."""
    host = await make_host("host-stopping")
    serving = asyncio.create_task(host.requests.serve_requests(redis))
    await asyncio.sleep(0.1)
    host.requests.stop_taking_requests()
    await asyncio.wait_for(serving, timeout=3)  # returned by itself
    own = host_requests("host-stopping")
    late = [json.dumps({"id": f"late-{i}", "op": "status", "account_id": 1}) for i in range(3)]
    await redis.rpush(own, *late)
    assert await host.requests.hand_back_requests(redis) == 3
    assert await redis.exists(own) == 0
    assert [item.decode() for item in await redis.lrange(TELEGRAM_REQUESTS, 0, -1)] == late


async def test_the_request_loop_outlives_a_redis_outage(make_host: HostFactory, db: asyncpg.Pool,
                                                         redis: aioredis.Redis, platform_env: dict[str, str],
                                                         redis_auth: RedisAuth) -> None:
    """Redis away (connections reset, new ones refused): the host's request loop retries instead of
    ending, skips an item that is not a request, and answers the next login once Redis is back."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    cut_off = aioredis.Redis.from_url(proxy.url, socket_connect_timeout=1)
    host = await make_host("host-outage")
    serving = asyncio.create_task(host.requests.serve_requests(cut_off))
    try:
        await asyncio.sleep(0.2)
        await proxy.cut()
        await asyncio.sleep(1.5)  # BLPOP and its retries fail meanwhile
        assert not serving.done()
        await proxy.start()
        await redis.rpush(TELEGRAM_REQUESTS, "not a request")
        account_id = await _account(db, "+9996611007")
        reply = await rpc.call_host(redis, redis_auth, "login", account_id, timeout=8)
        assert reply["auth_state"] == "wait_code"
    finally:
        host.requests.stop_taking_requests()
        await asyncio.wait_for(serving, timeout=10)
        await proxy.cut()
        await cut_off.aclose()


async def test_a_lease_is_taken_over_only_after_it_expires(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """B is refused while A's lease lives; after expiry B takes it with a higher fencing token and A,
    failing to renew, closes its client."""
    a = await make_host("host-a", lease_ttl_ms=600)
    b = await make_host("host-b", lease_ttl_ms=600)
    account_id = await _account(db, "+9996644444")
    await a.sessions.open(account_id)
    first_token = a.sessions._accounts[account_id].lease.token
    with pytest.raises(OwnedElsewhere):
        await b.sessions.open(account_id)
    await a.sessions.renew_leases()  # renewed: still A's after the first TTL
    await asyncio.sleep(0.4)
    with pytest.raises(OwnedElsewhere):
        await b.sessions.open(account_id)
    await asyncio.sleep(0.3)  # no renewal for 0.7 s > TTL: expired

    hosted = await b.sessions.open(account_id)
    assert hosted.lease.token > first_token
    assert (await redis.get(account_lease(account_id))) == f"host-b|{hosted.lease.token}".encode()
    await a.sessions.renew_leases()
    assert a.sessions.stats()["accounts_hosted"] == 0 and a.sessions.stats()["client_count"] == 0
    assert b.sessions.stats()["accounts_hosted"] == 1


async def test_leases_outlive_the_close_of_their_sessions(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """At shutdown the renewal task is gone: closing renews every lease first, so while the clients
    close no lease is about to expire and no other host can open the account meanwhile; a worker's
    close deadline is shorter than a lease."""
    a = await make_host("host-a", lease_ttl_ms=1_000)
    account_id = await _account(db, "+9996644449")
    await a.sessions.open(account_id)
    await asyncio.sleep(0.7)  # no renewal since the open: 0.3 s left
    left_when_closing: list[int] = []
    close_backend = a.sessions.backend.aclose

    async def observed_close(deadline: float) -> None:
        left_when_closing.append(await redis.pttl(account_lease(account_id)))
        await close_backend(deadline)

    a.sessions.backend.aclose = observed_close  # type: ignore[method-assign]
    await a.sessions.aclose(time.monotonic() + 5)
    assert left_when_closing and left_when_closing[0] > 600, left_when_closing  # renewed: ~1,000
    assert await redis.exists(account_lease(account_id)) == 0  # let go once closed
    assert CLOSE_SESSIONS_SECONDS < LEASE_TTL_MS / 1000


async def _account_state_events(redis: aioredis.Redis, redis_auth: RedisAuth,
                                pubsub: Any) -> list[dict[str, Any]]:
    """The account.state events published before a sentinel published now: every publish the hosts
    made has returned, so Redis delivers theirs first, and nothing is left to arrive later."""
    await events.publish(redis, redis_auth, "sentinel", {})
    seen = []
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, "the sentinel never came"
        # None also for the subscription's own confirmation.
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is None:
            continue
        text = events.open_published(redis_auth, message["data"])
        assert text is not None, "an event without a valid MAC"
        event = json.loads(text)
        if event["type"] == "sentinel":
            return seen
        if event["type"] == "account.state":
            seen.append(event["data"])


async def test_a_stale_owners_state_writes_are_refused(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A host that lost its lease without noticing (paused past the TTL) reports a state: the
    database refuses it and no event goes out, while the new owner's writes land; a host that takes
    the account after Redis lost every key still fences out the one before it. (The emulator's
    sessions never report these two states themselves.)"""
    stale, fresh = ConnectionState.WAITING_FOR_NETWORK, ConnectionState.UPDATING
    a = await make_host("host-a", lease_ttl_ms=300)
    b = await make_host("host-b", lease_ttl_ms=300)
    account_id = await _account(db, "+9996677777")
    await a.sessions.open(account_id)
    await asyncio.sleep(0.4)  # A is paused: no renewal, the lease expires
    await b.sessions.open(account_id)
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.EVENTS_CHANNEL)
    try:
        for old_owner, new_owner in ((a, b), (b, None)):
            if new_owner is None:
                await redis.flushdb()  # leases and their counters gone
                new_owner = await make_host("host-c")
                await new_owner.sessions.open(account_id)
            await old_owner.sessions.on_update(ConnectionStateChanged(account_id, stale))
            await new_owner.sessions.on_update(ConnectionStateChanged(account_id, fresh))
            assert (await account_store.get_account(db, account_id))["connection_state"] == fresh.value
            published = [event["connection_state"]
                         for event in await _account_state_events(redis, redis_auth, pubsub)
                         if event.get("connection_state") in (stale.value, fresh.value)]
            assert published == [fresh.value]
            await db.execute("UPDATE accounts SET connection_state = 'connecting' WHERE id = $1", account_id)
    finally:
        await pubsub.aclose()  # type: ignore[attr-defined]


async def test_a_restarted_host_waits_out_a_dead_owners_lease(
        make_host: HostFactory, db: asyncpg.Pool, fresh_emulator: EmulatorHandle) -> None:
    """After a crash (leases left behind), the next host resumes the account once the lease expired,
    without a new login."""
    crashed = await make_host("crashed", lease_ttl_ms=500)
    account_id = await _account(db, "+9996655555")
    await crashed.requests.handle_request({"op": "login", "account_id": account_id})
    await crashed.requests.handle_request({"op": "code", "account_id": account_id, "args": {"code": "55555"}})
    await crashed.sessions.backend.aclose(time.monotonic() + 5)  # sessions gone, leases not released
    assert (await account_store.get_account(db, account_id))["auth_state"] == "closed"

    successor = await make_host("successor")
    started = time.monotonic()
    assert await successor.sessions.resume_ready_accounts() == 1
    assert time.monotonic() - started < 3
    assert successor.sessions._accounts[account_id].session.auth_state is AuthState.READY
    assert fresh_emulator.telegram.counters["logins"] == 1


async def test_a_shorter_hold_never_shortens_a_longer_one(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A 429 "retry after 60" stored by the owner stays in force, with its words, when a shorter one
    follows from the owner or from a stale host; the events say the hold that is in force."""
    owner, stale = await make_host("owner"), await make_host("stale")
    account_id = await _account(db, "+9996644444")
    await owner.sessions.open(account_id)
    pubsub = redis.pubsub()
    await pubsub.subscribe(redis_keys.EVENTS_CHANNEL)
    try:
        started = time.time()
        await owner.sender._pause(account_id, 60, "FLOOD_WAIT: retry after 60")
        await stale.sender._pause(account_id, 5, "FLOOD_WAIT: retry after 5")  # not hosted there: the row only
        await owner.sender._pause(account_id, 5, "FLOOD_WAIT: retry after 5")
        row = await account_store.get_account(db, account_id)
        assert row["paused_until"].timestamp() - started == pytest.approx(60, abs=2)
        assert row["last_error"] == "FLOOD_WAIT: retry after 60"
        assert owner.sessions._accounts[account_id].paused_until - started == pytest.approx(60, abs=2)
        held = [event for event in await _account_state_events(redis, redis_auth, pubsub)
                if "paused_until" in event]
        assert len(held) == 3
        assert {event["last_error"] for event in held} == {"FLOOD_WAIT: retry after 60"}
        assert all(event["paused_until"] == pytest.approx(row["paused_until"].timestamp(), abs=0.01)
                   for event in held)
    finally:
        await pubsub.aclose()  # type: ignore[attr-defined]


async def _llen(redis: aioredis.Redis, key: str) -> int:
    return int(await redis.llen(key))


async def test_fencing_tokens_grow_and_renewal_is_one_round_trip(redis: aioredis.Redis, db: asyncpg.Pool) -> None:
    """Each new owner gets a higher token; renew_many says which leases are still held; release frees."""
    a = LeaseManager(redis, owner="a", ttl_ms=10_000)
    b = LeaseManager(redis, owner="b", ttl_ms=10_000)
    first, second = await a.acquire(1), await a.acquire(2)
    assert (await a.acquire(1)).token == first.token  # the owner again: same lease, extended
    await redis.delete(account_lease(2))  # lost (expired and taken would look the same to `a`)
    taken = await b.acquire(2)
    assert taken.token > second.token
    assert await a.renew_many([first, second]) == ["held", "lost"]
    await redis.delete(account_lease(1))  # gone, and nobody took it: set again
    assert await a.renew_many([first]) == ["retaken"]
    assert await a.owners_of([1, 2, 3]) == ["a", "b", None]
    assert 9 < await a.expires_in(1) <= 10
    await a.release(first)
    assert await a.expires_in(1) == 0 and await b.owner_of(1) is None
    assert (await b.acquire(1)).token > first.token


async def _logged_in(host: Host, db: asyncpg.Pool, phone: str) -> int:
    account_id = await _account(db, phone)
    await host.requests.handle_request({"op": "login", "account_id": account_id})
    code = phone[6] * 5  # test-DC convention: +99966XYYYY logs in with XXXXX
    await host.requests.handle_request({"op": "code", "account_id": account_id, "args": {"code": code}})
    assert host.sessions._accounts[account_id].session.auth_state is AuthState.READY
    return account_id


async def test_a_redis_that_lost_every_key_does_not_close_sessions(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """After FLUSHALL (or a restart without persistence) the host takes its leases back, as no
    other owner came between (PostgreSQL's owner token is still its own), and keeps its sessions."""
    a = await make_host("host-a")
    account_id = await _logged_in(a, db, "+9996611001")
    await redis.flushdb()
    await a.sessions.renew_leases()
    assert a.sessions.stats()["accounts_hosted"] == 1
    assert (await redis.get(account_lease(account_id))) == a.sessions._accounts[account_id].lease.value.encode()


async def test_a_lease_taken_back_is_given_up_when_another_owner_came_between(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """Redis lost A's lease, B took the account and let it go again: A's renewal finds the lease
    free, but PostgreSQL names a later owner, so A closes its session and frees the lease."""
    a, b = await make_host("host-a"), await make_host("host-b")
    account_id = await _logged_in(a, db, "+9996611002")
    await redis.flushdb()
    await b.sessions.open(account_id)
    await b.sessions.close_account(account_id)
    await a.sessions.renew_leases()
    assert a.sessions.stats()["accounts_hosted"] == 0 and a.sessions.stats()["client_count"] == 0
    assert await redis.get(account_lease(account_id)) is None


async def test_a_lease_taken_back_while_the_database_cannot_vouch_for_it_is_given_up(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, settings: Settings) -> None:
    """Redis lost the lease and PostgreSQL is unreachable when the host asks who owns the account:
    unanswered counts as lost (the next renewal would find the lease "held" and never ask again)."""
    a = await make_host("host-a")
    account_id = await _logged_in(a, db, "+9996611007")
    await redis.flushdb()
    unreachable = await asyncpg.create_pool(settings.database.url, min_size=0, max_size=1)
    await unreachable.close()
    a.sessions._pool = unreachable
    try:
        await a.sessions.renew_leases()
    finally:
        a.sessions._pool = db
    assert a.sessions.stats()["accounts_hosted"] == 0
    assert await redis.get(account_lease(account_id)) is None


async def test_a_host_that_cannot_reach_redis_closes_sessions_before_their_leases_can_expire(
        make_host: HostFactory, db: asyncpg.Pool, platform_env: dict[str, str]) -> None:
    """Renewals failing (connections reset, new ones refused): the sessions stay while the lease is
    surely alive, and close once it could expire before the next renewal (another host may then
    take the account); with Redis back, the next orphan scan opens them again."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    cut_off = aioredis.Redis.from_url(proxy.url, socket_connect_timeout=1)
    # TTL 5.5 s: a renewal that fails more than 0.5 s after the last one Redis confirmed closes (its
    # retry, 1 s later with up to 3 s of timeout, could come too late).
    metrics = create_metrics(None)
    a = await make_host("host-a", redis_client=cut_off, lease_ttl_ms=5_500, metrics=metrics)
    try:
        account_id = await _logged_in(a, db, "+9996611003")
        await a.sessions.renew_leases()
        await proxy.cut()
        with pytest.raises(redis.exceptions.ConnectionError):
            await a.sessions.renew_leases()
        assert a.sessions.stats()["accounts_hosted"] == 1  # confirmed just now: the lease lives on
        await asyncio.sleep(0.6)
        with pytest.raises(redis.exceptions.ConnectionError):
            await a.sessions.renew_leases()
        assert a.sessions.stats()["accounts_hosted"] == 0 and a.sessions.stats()["client_count"] == 0
        await proxy.start()
        await cut_off.delete(account_lease(account_id))  # as if it had expired meanwhile
        assert await a.sessions.resume_orphaned_accounts() == 1
        assert a.sessions._accounts[account_id].session.auth_state is AuthState.READY
        assert metrics.registry is not None  # in-process registry: no PROMETHEUS_MULTIPROC_DIR here
        sample = metrics.registry.get_sample_value
        assert sample("tp_lease_session_closures_total", {"reason": "unconfirmed"}) == 1
        assert sample("tp_lease_session_closures_total", {"reason": "lost"}) == 0
        assert sample("tp_orphaned_accounts_opened_total") == 1
    finally:
        await a.sessions.aclose(time.monotonic() + 5)  # its leases released while Redis is reachable
        await proxy.cut()
        await cut_off.aclose()


async def test_a_host_cut_off_from_redis_and_postgresql_closes_every_session_at_once(
        make_host: HostFactory, db: asyncpg.Pool, platform_env: dict[str, str]) -> None:
    """Both servers stop answering (a host cut off the network): once the leases could expire, every
    session is let go and its client closed together, none waiting on PostgreSQL (a closing client's
    last state write would hang there), so no client outlives its lease while another host may open
    its account; the states another owner may have written are left alone."""
    redis_proxy, pg_proxy = TcpProxy.before(platform_env["REDIS_URL"]), TcpProxy.before(platform_env["DATABASE_URL"])
    await redis_proxy.start()
    await pg_proxy.start()
    cut_off = aioredis.Redis.from_url(redis_proxy.url, socket_connect_timeout=1)
    stalled = await asyncpg.create_pool(pg_proxy.url, min_size=1, max_size=2, command_timeout=60)
    a = await make_host("host-a", redis_client=cut_off, lease_ttl_ms=6_500)
    try:
        ids = [await _logged_in(a, db, f"+999661101{n}") for n in range(3)]
        await a.sessions.renew_leases()
        a.sessions._pool = stalled
        redis_proxy.stall()
        pg_proxy.stall()
        # TTL 6.5 s: the renewal that fails now (3.6 s after the last one confirmed, its 3 s bound
        # included) closes them all, as its retry could come too late.
        await asyncio.sleep(0.6)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(20):  # not PostgreSQL's 60 s command timeout per session
                await a.sessions.renew_leases()
        assert time.monotonic() - started < 10  # the renewal's own 3 s bound, then the closes
        assert a.sessions.stats()["accounts_hosted"] == 0 and a.sessions.stats()["client_count"] == 0
        assert {r["auth_state"] for r in await db.fetch("SELECT auth_state FROM accounts WHERE id = ANY($1)",
                                                        ids)} == {"ready"}
    finally:
        a.sessions._pool = db
        await redis_proxy.cut()
        await pg_proxy.cut()
        await redis_proxy.start()
        await a.sessions.aclose(time.monotonic() + 5)
        await redis_proxy.cut()
        await cut_off.aclose()
        await stalled.close()


async def test_orphaned_accounts_are_opened_by_a_host_that_finds_them_free(
        make_host: HostFactory, db: asyncpg.Pool, settings: Settings, fresh_emulator: EmulatorHandle) -> None:
    """An account whose host let it go is opened by the next scan of another host, without a new
    login; accounts other hosts hold are left to them, and one that fails to open does not stop
    the others."""
    a, b = await make_host("host-a"), await make_host("host-b")
    kept, let_go, broken = [await _logged_in(a, db, f"+999661100{n}") for n in (4, 5, 6)]
    assert await b.sessions.resume_orphaned_accounts() == 0  # all three held by A
    for account_id in (let_go, broken):
        await a.sessions.close_account(account_id)
    # The broken one's stored login no longer decrypts (a changed ENCRYPTION_KEY, say).
    session_file = settings.tdlib.data_dir / "emulator" / str(broken) / "session.bin"
    assert session_file.exists()
    session_file.write_bytes(b"garbage")
    assert await b.sessions.resume_orphaned_accounts() == 1
    assert set(b.sessions._accounts) == {let_go} and set(a.sessions._accounts) == {kept}
    assert b.sessions._accounts[let_go].session.auth_state is AuthState.READY
    assert (await account_store.get_account(db, broken))["auth_state"] == "failed"
    assert fresh_emulator.telegram.counters["logins"] == 3  # resumed, not logged in again


async def test_orphans_are_shared_per_child_of_a_host(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, settings: Settings,
        fresh_emulator: EmulatorHandle) -> None:
    """Two worker children of one host, each publishing its load with its heartbeat: of four
    accounts nobody holds, the first child's orphan scan opens its share, two, and the second's the
    other two; none is opened twice and none needs a new login."""
    host_id = settings.host.id
    await announce(db, host_id)
    w0, w1 = [await make_host(f"{host_id}/tp-worker-w{i}-10{i}") for i in range(2)]
    accounts = [await _logged_in(w0, db, f"+999667100{n}") for n in range(4)]
    for account_id in accounts:
        await w0.sessions.close_account(account_id)  # let go: nobody holds it now
    for child in (w0, w1):
        await routing.mark_alive(redis, host_id, identity=child.sessions.worker_name,
                                 hosted=child.sessions.hosted_count())
    assert await w0.sessions.resume_orphaned_accounts() == 2
    assert await w1.sessions.resume_orphaned_accounts() == 2  # w0's load was published as it opened
    assert await w0.sessions.resume_orphaned_accounts() == 0
    assert set(w0.sessions._accounts) | set(w1.sessions._accounts) == set(accounts)
    assert not set(w0.sessions._accounts) & set(w1.sessions._accounts)
    assert fresh_emulator.telegram.counters["logins"] == 4


async def test_an_open_account_is_its_hosts_and_a_closed_one_nobodys(make_host: HostFactory, settings: Settings,
                                                                      db: asyncpg.Pool) -> None:
    """Opened, an account is owned by the opener's host (TP_HOST_ID, beside its fencing token);
    closed and its lease let go, by no host; opened again, by the opener's host again."""
    account_id = await _account(db, "+9996644444")
    host = await make_host("owner-test/w0-1")
    owner = "SELECT owner_host FROM accounts WHERE id = $1"
    await host.sessions.open(account_id)
    assert await db.fetchval(owner, account_id) == settings.host.id
    await host.sessions.close_account(account_id)
    assert await db.fetchval(owner, account_id) is None
    await host.sessions.open(account_id)
    assert await db.fetchval(owner, account_id) == settings.host.id

"""Account requests: the one table that turns Telegram's errors into the errors the API answers an
account request with; requests and replies that cross Redis sealed, refused when forged, altered,
replayed or expired; and no login secret in Redis in clear."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
from support import ApiClient, EmulatorHandle, Host, HostFactory, eventually

from telegram_platform.metrics.definitions import Metrics, create_metrics
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import TELEGRAM_REQUESTS, request_reply
from telegram_platform.settings import Settings
from telegram_platform.storage import accounts as account_store
from telegram_platform.tasks import cancel_and_wait
from telegram_platform.telegram import rpc
from telegram_platform.telegram.base import (
    AuthError,
    OwnedElsewhere,
    PermanentError,
    RequestTimeout,
    TelegramError,
    WrongDatabaseKey,
)
from telegram_platform.worker.account_requests import AccountRequests, platform_error


def _answer(exc: TelegramError, op: str) -> tuple[int, str, str, dict[str, object]]:
    error = platform_error(exc, op)
    return error.status, error.code, error.message, error.details


def test_each_telegram_error_answers_its_status_code_and_details() -> None:
    """Owned elsewhere and a wrong database key conflict (409), a refused step names its field (422),
    and any other Telegram error is a bad gateway, or unavailable when it is transient."""
    assert _answer(OwnedElsewhere(7, "host-a"), "code") == (
        409, "owned_elsewhere", "409: account 7 is owned by host-a", {"owner": "host-a"})
    status, code, message, details = _answer(WrongDatabaseKey(), "login_again")
    assert (status, code, details) == (409, "wrong_database_key", {"auth_state": "failed"})
    assert message.startswith("wrong database encryption key: ") and "set_aside_database=true" in message
    assert _answer(AuthError(400, "PHONE_CODE_INVALID"), "code") == (
        422, "auth_rejected", "PHONE_CODE_INVALID", {"field": "code"})
    assert _answer(AuthError(400, "FIRSTNAME_INVALID"), "register")[3] == {"field": "first_name"}
    assert _answer(AuthError(400, "PHONE_NUMBER_BANNED"), "login")[3] == {"field": "phone"}
    assert _answer(PermanentError(400, "PEER_ID_INVALID"), "status") == (
        502, "telegram_error", "PEER_ID_INVALID", {"error_class": "permanent"})
    assert _answer(RequestTimeout(), "login")[:2] == (503, "telegram_error")


# -- what crosses Redis: sealed requests (telegram/rpc.py), nothing in clear -------------------------


async def _logged_in(host: Host, db: asyncpg.Pool, phone: str) -> int:
    """An account of `phone` logged in on `host` with its emulator code (+99966XYYYY: XXXXX)."""
    account_id = int((await account_store.create_account(db, phone, None))["id"])
    await host.requests.handle_request({"op": "login", "account_id": account_id})
    await host.requests.handle_request({"op": "code", "account_id": account_id, "args": {"code": phone[6] * 5}})
    return account_id


def _refused(metrics: Metrics, kind: str) -> float:
    assert metrics.registry is not None
    return metrics.registry.get_sample_value("tp_redis_refused_total", {"kind": kind}) or 0.0


async def test_a_forged_logout_request_is_refused(make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis,
                                                  redis_auth: RedisAuth) -> None:
    """A logout pushed into Redis by someone without ENCRYPTION_KEY (in clear, or sealed with another
    key, or a sealed request altered) is refused, logged and counted: the account's database stays;
    the same logout sealed with the platform's key is carried out."""
    metrics = create_metrics(None)
    host = await make_host("host-forged", metrics=metrics)
    account_id = await _logged_in(host, db, "+9996644101")
    database = host.sessions.backend.database_dir(account_id)
    assert database.exists()
    logout = {"id": "forged-1", "op": "logout", "account_id": account_id, "args": {}, "deadline": time.time() + 30}
    genuine = bytearray(redis_auth.seal({**logout, "id": "altered"}, purpose=rpc.REQUEST_PURPOSE))
    genuine[-1] ^= 1
    forged = [json.dumps(logout).encode(), RedisAuth(bytes(range(32))).seal(logout, purpose=rpc.REQUEST_PURPOSE),
              bytes(genuine)]
    await redis.rpush(TELEGRAM_REQUESTS, *forged)
    serving = asyncio.create_task(host.requests.serve_requests(redis))
    try:
        await eventually(lambda: asyncio.sleep(0, _refused(metrics, "request") == 3), timeout=10)
        await asyncio.sleep(0.2)  # anything acted on would be under way by now
        assert database.exists() and host.sessions.hosted(account_id) is not None
        assert await redis.exists(request_reply("forged-1"), request_reply("altered")) == 0

        reply = await rpc.call_host(redis, redis_auth, "logout", account_id, timeout=10)
        assert reply["auth_state"] == "logged_out" and not database.exists()
    finally:
        host.requests.stop_taking_requests()
        await asyncio.wait_for(serving, timeout=5)


async def test_a_request_is_not_carried_out_twice_or_after_its_deadline(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """A genuine sealed request captured and pushed again is refused as a replay (one answer only);
    one pushed after its deadline is not carried out (a logout there leaves the database)."""
    metrics = create_metrics(None)
    host = await make_host("host-replayed", metrics=metrics)
    account_id = await _logged_in(host, db, "+9996644102")
    status = redis_auth.seal({"id": "twice", "op": "status", "account_id": account_id, "args": {},
                              "deadline": time.time() + 30}, purpose=rpc.REQUEST_PURPOSE)
    expired = redis_auth.seal({"id": "late", "op": "logout", "account_id": account_id, "args": {},
                               "deadline": time.time() - 1}, purpose=rpc.REQUEST_PURPOSE)
    await redis.rpush(TELEGRAM_REQUESTS, status, status, expired)
    serving = asyncio.create_task(host.requests.serve_requests(redis))
    try:
        await eventually(lambda: asyncio.sleep(0, _refused(metrics, "request") == 1), timeout=10)
        await eventually(lambda: _llen(redis, request_reply("twice")), timeout=10)
        await asyncio.sleep(0.2)
        assert await redis.llen(request_reply("twice")) == 1
        assert await redis.exists(TELEGRAM_REQUESTS) == 0
        assert host.sessions.backend.database_dir(account_id).exists()
        assert await redis.exists(request_reply("late")) == 0
    finally:
        host.requests.stop_taking_requests()
        await asyncio.wait_for(serving, timeout=5)


async def test_a_forged_reply_is_not_taken_for_the_hosts_answer(
        make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth,
        settings: Settings) -> None:
    """Replies pushed by someone else on a request's reply key (in clear, or another request's sealed
    reply) are refused and counted; the caller waits on and takes the host's own answer."""
    counted: list[str] = []
    caller = RedisAuth(settings.encryption_key, count_refused=counted.append)
    host = await make_host("host-replies")
    account_id = await _logged_in(host, db, "+9996644103")
    call = asyncio.create_task(rpc.call_host(redis, caller, "status", account_id, timeout=10))
    await eventually(lambda: _llen(redis, TELEGRAM_REQUESTS), timeout=5)
    pending = redis_auth.open((await redis.lrange(TELEGRAM_REQUESTS, 0, 0))[0], purpose=rpc.REQUEST_PURPOSE)
    assert pending is not None
    forged = [json.dumps({"result": {"auth_state": "logged_out"}}).encode(),
              redis_auth.seal({"result": {"auth_state": "logged_out"}}, purpose=rpc.reply_purpose("another"))]
    await redis.rpush(request_reply(pending["id"]), *forged)
    await eventually(lambda: asyncio.sleep(0, len(counted) == 2), timeout=5)
    serving = asyncio.create_task(host.requests.serve_requests(redis))
    try:
        assert await call == {"auth_state": "ready", "connection_state": "ready"}
        assert counted == ["reply", "reply"]
    finally:
        host.requests.stop_taking_requests()
        await asyncio.wait_for(serving, timeout=5)


async def _llen(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.llen(key))


async def test_no_login_code_or_password_is_in_redis_in_clear(
        api: ApiClient, admin_token: str, make_host: HostFactory, db: asyncpg.Pool, redis: aioredis.Redis,
        fresh_emulator: EmulatorHandle, settings: Settings) -> None:
    """An account logs in through the API with a code and a 2FA password: neither is in any command
    Redis receives meanwhile (MONITOR), nor in any key or value of any type while the password step
    waits in Redis for a host, nor after the login."""
    phone, code, password = "+9996655345", "55555", "tp-2fa-" + secrets.token_hex(8)
    fresh_emulator.telegram.user_for_phone(phone).password = password
    host = await make_host("host-secrets")
    commands = bytearray()
    started = asyncio.Event()
    monitor = asyncio.create_task(_monitor(settings.redis.url, commands, started))
    await asyncio.wait_for(started.wait(), 5)
    try:
        async with _serving(AccountRequests(host.sessions, db, redis), redis):
            status, account = await api.call("POST", "/api/accounts", admin_token, json={"phone": phone})
            assert status == 201 and account["auth_state"] == "wait_code", account
            path = f"/api/accounts/{account['id']}/auth"
            status, body = await api.call("POST", f"{path}/code", admin_token, json={"code": code})
            assert status == 200 and body["auth_state"] == "wait_password", body
        step = asyncio.create_task(api.call("POST", f"{path}/password", admin_token, json={"password": password}))
        await eventually(lambda: _llen(redis, TELEGRAM_REQUESTS), timeout=5)
        waiting = await _everything_in(redis)  # the password step, waiting for a host
        async with _serving(AccountRequests(host.sessions, db, redis), redis):
            status, body = await step
        assert status == 200 and body["auth_state"] == "ready", body
        after = await _everything_in(redis)
    finally:
        await cancel_and_wait([monitor])
    for where, seen in (("the commands", bytes(commands)), ("the keys and values while waiting", waiting),
                        ("the keys and values after", after)):
        assert password.encode() not in seen, f"the 2FA password in clear in {where}"
        assert not re.search(rb"(?<![0-9.])" + code.encode() + rb"(?![0-9])", seen), f"the code in clear in {where}"
    assert len(commands) > 0 and len(waiting) > 0


@contextlib.asynccontextmanager
async def _serving(requests: AccountRequests, redis: aioredis.Redis) -> AsyncIterator[None]:
    """A host's request loop, running for the block."""
    serving = asyncio.create_task(requests.serve_requests(redis))
    try:
        yield
    finally:
        requests.stop_taking_requests()
        await asyncio.wait_for(serving, timeout=5)


async def _monitor(url: str, commands: bytearray, started: asyncio.Event) -> None:
    """Every command Redis receives (MONITOR), as Redis prints it, into `commands` until cancelled."""
    client = aioredis.Redis.from_url(url)
    connection = await client.connection_pool.get_connection()
    try:
        await connection.send_command("MONITOR")
        await connection.read_response()
        started.set()
        while True:
            line = await connection.read_response()
            commands += line if isinstance(line, bytes) else str(line).encode()
            commands += b"\n"
    finally:
        await connection.disconnect()
        await client.aclose()


async def _everything_in(redis: aioredis.Redis) -> bytes:
    """Every key of the database and every value under it, whatever its type, as bytes."""
    found = bytearray()
    async for key in redis.scan_iter(count=1000):
        found += key + b"\n"
        kind = (await redis.type(key)).decode()
        if kind == "string":
            found += await redis.get(key) or b""
        elif kind == "list":
            found += b"\n".join(await redis.lrange(key, 0, -1))
        elif kind == "hash":
            found += b"\n".join(k + b"=" + v for k, v in (await redis.hgetall(key)).items())
        elif kind == "set":
            found += b"\n".join(await redis.smembers(key))
        elif kind == "zset":
            found += b"\n".join(member for member, _ in await redis.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                found += entry_id + b"\n" + b"\n".join(k + b"=" + v for k, v in fields.items())
        else:
            raise AssertionError(f"a Redis type this scan does not read: {kind}")
        found += b"\n"
    return bytes(found)

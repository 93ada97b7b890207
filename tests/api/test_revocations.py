"""Token revocation: a demoted or disabled user's access tokens are refused at once, everywhere."""

from __future__ import annotations

import time

import aiohttp
import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis
from conftest import TEST_JWT_SECRET
from support import ApiClient, another_api, eventually

from telegram_platform.api.keys import METRICS, REDIS_AUTH
from telegram_platform.api.revocations import REVOCATIONS
from telegram_platform.api.security import Principal, TokenService
from telegram_platform.errors import Unauthorized
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import AUTH_REVOCATIONS

PASSWORD = "vera-password-1"


async def _vera(api: ApiClient, admin_token: str) -> tuple[int, str]:
    """An operator, and an access token of theirs."""
    status, user = await api.call("POST", "/api/users", admin_token,
                                  json={"username": "vera", "password": PASSWORD, "role": "operator"})
    assert status == 201
    status, tokens = await api.call("POST", "/api/auth/login", json={"username": "vera", "password": PASSWORD})
    assert status == 200
    return int(user["id"]), str(tokens["access_token"])


async def _status(session: aiohttp.ClientSession, url: str, token: str) -> int:
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status


def test_revoke_forgets_verified_tokens_and_refuses_older_versions() -> None:
    """A verified (cached) token is refused once its version is revoked; a newer one is not; a
    token without a version counts as version 0, and a malformed version is refused."""
    tokens = TokenService(TEST_JWT_SECRET, 600)
    old = tokens.issue_access(Principal(7, "vera", "operator", 0))
    assert tokens.verify_access(old).role == "operator"  # now cached
    now = int(time.time())
    unversioned = jwt.encode({"sub": "7", "role": "operator", "typ": "access", "iat": now, "exp": now + 600},
                             TEST_JWT_SECRET, algorithm="HS256")
    assert tokens.verify_access(unversioned).token_version == 0
    assert tokens.revoke(7, 1) and not tokens.revoke(7, 1)
    for token in (old, unversioned):
        with pytest.raises(Unauthorized, match="revoked"):
            tokens.verify_access(token)
    new = tokens.issue_access(Principal(7, "vera", "viewer", 1))
    assert tokens.verify_access(new) == Principal(7, "vera", "viewer", 1)
    assert tokens.verify_access(tokens.issue_access(Principal(8, "other", "viewer", 0))).user_id == 8
    odd = jwt.encode({"sub": "8", "role": "viewer", "typ": "access", "ver": "1", "iat": now, "exp": now + 600},
                     TEST_JWT_SECRET, algorithm="HS256")
    with pytest.raises(Unauthorized, match="invalid"):
        tokens.verify_access(odd)


async def test_a_changed_user_is_refused_here_at_once_and_in_another_process(
    api: ApiClient, admin_token: str, platform_env: dict[str, str],
) -> None:
    """After a demotion, the user's token is refused by the process that made it before the PATCH
    returns, and by another process moments later; a fresh login carries the new role."""
    vera_id, token = await _vera(api, admin_token)
    async with another_api(platform_env) as other, aiohttp.ClientSession() as session:
        me = str(other.make_url("/api/users/me"))
        assert await _status(session, me, token) == 200  # verified and cached over there
        status, changed = await api.call("PATCH", f"/api/users/{vera_id}", admin_token, json={"role": "viewer"})
        assert status == 200 and changed["role"] == "viewer"
        status, body = await api.call("GET", "/api/users/me", token)
        assert status == 401 and "revoked" in body["error"]["message"]
        await eventually(lambda: _refused(session, me, token), timeout=5)
        status, tokens = await api.call("POST", "/api/auth/login", json={"username": "vera", "password": PASSWORD})
        assert status == 200
        assert await _status(session, me, tokens["access_token"]) == 200
        status, body = await api.call("POST", "/api/messages", tokens["access_token"],
                                      json={"account_id": 1, "peer": "@x", "text": "hi"})
        assert status == 403


async def _refused(session: aiohttp.ClientSession, url: str, token: str) -> bool:
    return await _status(session, url, token) == 401


async def test_a_process_started_later_refuses_the_old_token(
    api: ApiClient, admin_token: str, platform_env: dict[str, str],
) -> None:
    """A process that starts after a disabling loads the versions before its first request."""
    vera_id, token = await _vera(api, admin_token)
    status, _ = await api.call("PATCH", f"/api/users/{vera_id}", admin_token, json={"disabled": True})
    assert status == 200
    async with another_api(platform_env) as other, aiohttp.ClientSession() as session:
        assert await _status(session, str(other.make_url("/api/users/me")), token) == 401


async def test_a_new_password_or_more_rights_leave_access_tokens_alone(api: ApiClient, admin_token: str,
                                                                       db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """A password change or a promotion revokes refresh tokens only: an admin who changes their own
    password keeps working with the token they did it with, nobody's version moves, and nothing is
    announced to the other processes; the demotion after them is."""
    vera_id, token = await _vera(api, admin_token)
    admin_id = await db.fetchval("SELECT id FROM users WHERE username = 'admin'")
    pubsub = redis.pubsub()
    await pubsub.subscribe(AUTH_REVOCATIONS)
    try:
        for user_id, change in ((admin_id, {"password": "admin-new-password"}), (vera_id, {"role": "admin"}),
                                (vera_id, {"password": "vera-new-password"})):
            status, _ = await api.call("PATCH", f"/api/users/{user_id}", admin_token, json=change)
            assert status == 200, change
        assert (await api.call("GET", "/api/users/me", token))[0] == 200
        assert await db.fetchval("SELECT max(token_version) FROM users") == 0
        status, _ = await api.call("PATCH", f"/api/users/{vera_id}", admin_token, json={"role": "operator"})
        assert status == 200 and (await api.call("GET", "/api/users/me", token))[0] == 401
        announced = []
        while (message := await pubsub.get_message(timeout=1)) is not None:
            if message["type"] == "message":
                announced.append(message["data"])
        text = f"{vera_id}:1"
        assert announced == [f"{text}:{api.app[REDIS_AUTH].revocation_mac(text)}".encode()]
    finally:
        await pubsub.aclose()  # type: ignore[attr-defined]


async def test_an_announcement_applies_and_garbage_on_the_channel_is_ignored(
    api: ApiClient, admin_token: str, redis: aioredis.Redis, redis_auth: RedisAuth,
) -> None:
    """The listener survives a malformed message and applies the next well-formed one."""
    vera_id, token = await _vera(api, admin_token)
    assert await api.app[REVOCATIONS].subscribed.wait()
    await redis.publish(AUTH_REVOCATIONS, "not:a-revocation")
    await redis.publish(AUTH_REVOCATIONS, f"{vera_id}:3:{redis_auth.revocation_mac(f'{vera_id}:3')}")
    await eventually(lambda: _call_refused(api, token), timeout=5)


async def test_a_forged_announcement_locks_nobody_out(
    api: ApiClient, admin_token: str, redis: aioredis.Redis,
) -> None:
    """A revocation pushed into Redis without a MAC is ignored, one with a MAC made with another key
    or made up is refused and counted: the user's token keeps working."""
    vera_id, token = await _vera(api, admin_token)
    assert await api.app[REVOCATIONS].subscribed.wait()
    other_key = RedisAuth(bytes(range(32)))
    for forged in (f"{vera_id}:99", f"{vera_id}:99:{other_key.revocation_mac(f'{vera_id}:99')}",
                   f"{vera_id}:99:{'0' * 32}"):
        await redis.publish(AUTH_REVOCATIONS, forged)
    registry = api.app[METRICS].registry
    assert registry is not None

    async def all_refused() -> bool:
        return registry.get_sample_value("tp_redis_refused_total", {"kind": "revocation"}) == 2

    await eventually(all_refused, timeout=5)
    assert (await api.call("GET", "/api/users/me", token))[0] == 200


async def _call_refused(api: ApiClient, token: str) -> bool:
    status, _ = await api.call("GET", "/api/users/me", token)
    return status == 401


async def test_a_missed_announcement_is_caught_up_by_the_reload(
    api: ApiClient, admin_token: str, db: asyncpg.Pool,
) -> None:
    """A version changed in the database with no announcement (Redis was away) takes effect at the
    next reload, which every process runs periodically and after each resubscription."""
    vera_id, token = await _vera(api, admin_token)
    assert (await api.call("GET", "/api/users/me", token))[0] == 200
    await db.execute("UPDATE users SET token_version = token_version + 1 WHERE id = $1", vera_id)
    assert (await api.call("GET", "/api/users/me", token))[0] == 200  # not yet known here
    await api.app[REVOCATIONS].reload()
    assert (await api.call("GET", "/api/users/me", token))[0] == 401


async def test_a_disabled_users_websocket_is_closed_and_others_stay(api: ApiClient, admin_token: str) -> None:
    """Disabling a user closes their WebSocket with 1008; the admin's own stays open."""
    vera_id, token = await _vera(api, admin_token)
    async with (
        api.client.ws_connect(f"/api/ws?token={token}") as vera_ws,
        api.client.ws_connect(f"/api/ws?token={admin_token}") as admin_ws,
    ):
        for ws in (vera_ws, admin_ws):
            assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
        status, _ = await api.call("PATCH", f"/api/users/{vera_id}", admin_token, json={"disabled": True})
        assert status == 200
        message = await vera_ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008, message
        await admin_ws.send_json({"action": "ping"})
        assert (await admin_ws.receive_json(timeout=5))["type"] == "pong"

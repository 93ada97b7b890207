"""Auth: login, refresh, and every way a token can be wrong."""

from __future__ import annotations

import time

import asyncpg
import jwt
from conftest import TEST_JWT_SECRET
from support import ApiClient


async def test_login_gives_tokens_that_open_routes(api: ApiClient, db: asyncpg.Pool) -> None:
    """A user made in the database logs in and the access token opens a protected route."""
    token = await api.user_token("alice", "viewer", db)
    status, body = await api.call("GET", "/api/accounts", token)
    assert status == 200 and body == {"items": []}


async def test_bad_password_is_401_in_the_error_shape(api: ApiClient, db: asyncpg.Pool) -> None:
    """Wrong credentials give 401 with the contract's error shape."""
    await api.user_token("bob", "viewer", db)
    status, body = await api.call("POST", "/api/auth/login", json={"username": "bob", "password": "nope"})
    assert status == 401
    assert body["error"]["code"] == "unauthorized"
    status, _ = await api.call("POST", "/api/auth/login", json={"username": "ghost", "password": "nope"})
    assert status == 401


async def test_refresh_token_works_once(api: ApiClient, db: asyncpg.Pool) -> None:
    """A refresh token yields new tokens once; reusing it is refused."""
    password = "pw-" + "x" * 12
    await api.user_token("carol", "operator", db, password)
    _, tokens = await api.call("POST", "/api/auth/login", json={"username": "carol", "password": password})
    status, fresh = await api.call("POST", "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert status == 200 and fresh["token_type"] == "bearer" and fresh["access_token"]
    status, _ = await api.call("POST", "/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert status == 401


async def test_forged_tokens_are_refused(api: ApiClient, db: asyncpg.Pool) -> None:
    """`alg: none`, another key, an expired token and garbage all get 401; the expired one says so
    (a client then refreshes instead of asking for the password)."""
    now = int(time.time())
    claims = {"sub": "1", "role": "admin", "typ": "access", "iat": now, "exp": now + 600}
    forged = [
        jwt.encode(claims, None, algorithm="none"),
        jwt.encode(claims, "another-key-another-key-another-key", algorithm="HS256"),
        jwt.encode({**claims, "exp": now - 10}, TEST_JWT_SECRET, algorithm="HS256"),
        "not-a-token",
    ]
    for token in forged:
        status, body = await api.call("GET", "/api/accounts", token)
        assert status == 401, token
        assert body["error"]["code"] == "unauthorized"
        assert ("expired" in body["error"]["message"]) == (token == forged[2]), body
    status, _ = await api.call("GET", "/api/accounts")
    assert status == 401


async def test_viewer_may_not_send(api: ApiClient, db: asyncpg.Pool) -> None:
    """A viewer reads but gets 403 on a send."""
    token = await api.user_token("vera", "viewer", db)
    status, body = await api.call("POST", "/api/messages", token, json={"account_id": 1, "peer": "@x", "text": "hi"})
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_login_attempts_are_rate_limited(api: ApiClient, db: asyncpg.Pool) -> None:
    """After ten failures for one username, further attempts get 429 with Retry-After."""
    await api.user_token("dave", "viewer", db)
    for _ in range(10):
        status, _ = await api.call("POST", "/api/auth/login", json={"username": "dave", "password": "wrong"})
        assert status == 401
    async with api.client.post("/api/auth/login", json={"username": "dave", "password": "wrong"}) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) > 0

"""Auth: login, refresh, and every way a token can be wrong."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import aiohttp
import asyncpg
import jwt
import pytest
from conftest import TEST_ENCRYPTION_KEY, TEST_JWT_SECRET
from support import ApiClient, another_api

from telegram_platform.api.security import Passwords
from telegram_platform.settings import ConfigError, Settings
from telegram_platform.storage import users

BASE_ENV = {"DATABASE_URL": "postgresql://localhost/x", "REDIS_URL": "redis://localhost",
            "JWT_SECRET": TEST_JWT_SECRET, "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY}


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
        jwt.encode({**claims, "exp": now - 60}, TEST_JWT_SECRET, algorithm="HS256"),
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
    """After five failures for one username from one address, the next attempt (even with the right
    password) waits: 429 with Retry-After, doubling after each further failure."""
    password = "pw-" + "x" * 12
    await api.user_token("dave", "viewer", db, password)
    for _ in range(5):
        status, _ = await api.call("POST", "/api/auth/login", json={"username": "dave", "password": "wrong"})
        assert status == 401
    async with api.client.post("/api/auth/login", json={"username": "dave", "password": password}) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) > 0
        assert (await response.json())["error"]["code"] == "too_many_requests"
    await asyncio.sleep(1.1)  # the first wait is a second
    status, _ = await api.call("POST", "/api/auth/login", json={"username": "dave", "password": "wrong"})
    assert status == 401
    async with api.client.post("/api/auth/login", json={"username": "dave", "password": password}) as response:
        assert response.status == 429 and int(response.headers["Retry-After"]) >= 2


async def test_concurrent_bad_logins_each_count(api: ApiClient, db: asyncpg.Pool) -> None:
    """Twenty bad logins at once: each attempt is counted before its password is checked, so only
    the five free ones are tried (401) and the others wait (429)."""
    await api.user_token("erin", "viewer", db)
    answers = await asyncio.gather(*(api.call("POST", "/api/auth/login", json={"username": "erin", "password": "bad"})
                                     for _ in range(20)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [401] * 5 + [429] * 15


async def test_a_user_held_back_at_one_address_logs_in_from_another(platform_env: dict[str, str],
                                                                    db: asyncpg.Pool) -> None:
    """Behind a trusted proxy the client's address comes from X-Forwarded-For (its right-most
    untrusted entry): an attacker's failures hold back only the attacker's address, and the user
    logs in from their own."""
    password = "pw-" + "y" * 12
    await users.create_user(db, "frank", await Passwords().hash(password), "admin")
    async with (another_api(platform_env, TP_TRUSTED_PROXIES="127.0.0.0/8, 10.0.0.1") as server,
                aiohttp.ClientSession(base_url=server.make_url("/")) as http):

        async def login(forwarded: str, secret: str) -> int:
            async with http.post("/api/auth/login", json={"username": "frank", "password": secret},
                                 headers={"X-Forwarded-For": forwarded}) as response:
                return response.status

        for _ in range(5):
            assert await login("203.0.113.9, 10.0.0.1", "wrong") == 401
        assert await login("203.0.113.9", password) == 429
        # Spoofing a left-most entry does not help: the right-most untrusted one is the client.
        assert await login("198.51.100.7, 203.0.113.9", password) == 429
        assert await login("198.51.100.7", password) == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(api: ApiClient, db: asyncpg.Pool) -> None:
    """Without TP_TRUSTED_PROXIES, X-Forwarded-For is the client's own say and changes nothing."""
    await api.user_token("gina", "viewer", db)
    for n in range(5):
        status, _ = await api.call("POST", "/api/auth/login", json={"username": "gina", "password": "wrong"},
                                   headers={"X-Forwarded-For": f"198.51.100.{n}"})
        assert status == 401
    status, _ = await api.call("POST", "/api/auth/login", json={"username": "gina", "password": "wrong"},
                               headers={"X-Forwarded-For": "198.51.100.99"})
    assert status == 429


async def test_password_checks_are_bounded_per_process() -> None:
    """At most `max_concurrent` Argon2 verifications run at once; the others wait their turn."""
    passwords = Passwords(max_concurrent=2)
    stored = await passwords.hash("right-password")
    running, peak = 0, 0
    lock = threading.Lock()
    real = passwords._hasher

    class CountingHasher:
        def verify(self, password_hash: str, password: str) -> bool:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            try:
                time.sleep(0.05)
                return real.verify(password_hash, password)
            finally:
                with lock:
                    running -= 1

    passwords._hasher = CountingHasher()  # type: ignore[assignment]
    results = await asyncio.gather(*(passwords.verify(stored, "right-password") for _ in range(6)))
    assert results == [True] * 6 and peak == 2


def test_trusted_proxies_setting_is_validated() -> None:
    """TP_TRUSTED_PROXIES takes addresses and CIDRs; a bad entry stops the start naming the variable."""
    settings = Settings.from_env({**BASE_ENV, "TP_TRUSTED_PROXIES": "10.0.0.0/8 ::1,192.0.2.1"})
    assert [str(n) for n in settings.api.trusted_proxies] == ["10.0.0.0/8", "::1/128", "192.0.2.1/32"]
    with pytest.raises(ConfigError) as error:
        Settings.from_env({**BASE_ENV, "TP_TRUSTED_PROXIES": "10.0.0.0/8,proxy.local"})
    assert error.value.variable == "TP_TRUSTED_PROXIES"


async def test_clocks_a_little_apart_are_tolerated(api: ApiClient, db: asyncpg.Pool) -> None:
    """A token from a host whose clock runs a few seconds ahead (issued "in the future") or that
    expired seconds ago by this host's clock is accepted; a minute past expiry is not."""
    await api.user_token("hugo", "viewer", db)
    user_id = await db.fetchval("SELECT id FROM users WHERE username = 'hugo'")
    now = int(time.time())
    base = {"sub": str(user_id), "name": "hugo", "role": "viewer", "typ": "access", "ver": 0}
    for claims, expected in (({"iat": now + 20, "nbf": now + 20, "exp": now + 600}, 200),
                             ({"iat": now - 600, "exp": now - 10}, 200),
                             ({"iat": now - 600, "exp": now - 60}, 401)):
        token = jwt.encode({**base, **claims}, TEST_JWT_SECRET, algorithm="HS256")
        status, body = await api.call("GET", "/api/accounts", token)
        assert status == expected, (claims, body)


async def test_a_spent_refresh_token_used_again_revokes_its_family(api: ApiClient, db: asyncpg.Pool) -> None:
    """Refresh tokens are stored as SHA-256 hashes only; reusing a spent one (a thief's copy, or
    the victim's after the thief used it) revokes every token descended from that login, and no
    other login's."""
    password = "pw-" + "z" * 12
    await api.user_token("ivy", "viewer", db, password)
    _, first = await api.call("POST", "/api/auth/login", json={"username": "ivy", "password": password})
    _, other_login = await api.call("POST", "/api/auth/login", json={"username": "ivy", "password": password})
    stored = await db.fetch("SELECT * FROM refresh_tokens")
    for token in (first["refresh_token"], other_login["refresh_token"]):
        assert all(token not in str(dict(row)) for row in stored)
        assert await db.fetchval("SELECT count(*) FROM refresh_tokens WHERE token_hash = $1",
                                 hashlib.sha256(token.encode()).digest()) == 1
    status, second = await api.call("POST", "/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert status == 200
    status, body = await api.call("POST", "/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, _ = await api.call("POST", "/api/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert status == 401  # descended from the reused one: revoked with it
    status, _ = await api.call("POST", "/api/auth/refresh", json={"refresh_token": other_login["refresh_token"]})
    assert status == 200

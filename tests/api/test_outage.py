"""A database or Redis outage: 503 in the error shape with Retry-After, fast, never a hang or a trace."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from conftest import free_port
from support import ApiClient, TcpProxy

from telegram_platform import outages
from telegram_platform.api.app import create_app
from telegram_platform.api.keys import DB
from telegram_platform.devstack.servers import ThrowawayRedis
from telegram_platform.settings import Settings

# Well under any client's patience; the point is that nothing waits on a dead peer for long.
FAST = 3.0


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[TestServer, ClientSession]]:
    server = TestServer(create_app(settings), port=free_port())
    await server.start_server()
    try:
        async with ClientSession(base_url=server.make_url("/")) as session:
            yield server, session
    finally:
        await server.close()


async def _expect_503(session: ClientSession, path: str, token: str) -> None:
    started = time.monotonic()
    async with session.get(path, headers={"Authorization": f"Bearer {token}"}) as response:
        elapsed = time.monotonic() - started
        body = await response.json()
    assert response.status == 503, (path, response.status, body)
    assert body["error"]["code"] == "service_unavailable"
    assert int(response.headers["Retry-After"]) > 0 and response.headers["X-Request-ID"]
    assert elapsed < FAST, (path, elapsed)


async def test_redis_outage_gives_503(platform_env: dict[str, str], admin_token: str, tmp_path: Path) -> None:
    """With its Redis stopped, routes that need Redis answer 503 with Retry-After at once; liveness
    and database routes still answer."""
    with ThrowawayRedis(tmp_path / "redis") as own_redis:
        settings = Settings.from_env({**platform_env, "REDIS_URL": own_redis.url}, app_mode="api")
        async with serve(settings) as (_, session):
            headers = {"Authorization": f"Bearer {admin_token}"}
            async with session.get("/api/queues", headers=headers) as response:
                assert response.status == 200
            own_redis.stop()
            await _expect_503(session, "/api/queues", admin_token)
            await _expect_503(session, "/api/tdlib/health", admin_token)
            async with session.get("/api/health") as response:
                assert response.status == 200
            async with session.get("/api/messages", headers=headers) as response:
                assert response.status == 200


async def test_database_outage_gives_503(platform_env: dict[str, str], admin_token: str,
                                         db: asyncpg.Pool) -> None:
    """With the database gone (connections reset, new ones refused), database routes answer 503 at
    once, every time, and serve again when it is back."""
    proxy = TcpProxy.before(platform_env["DATABASE_URL"])
    await proxy.start()
    settings = Settings.from_env({**platform_env, "DATABASE_URL": proxy.url}, app_mode="api")
    async with serve(settings) as (_, session):
        headers = {"Authorization": f"Bearer {admin_token}"}
        async with session.get("/api/messages", headers=headers) as response:
            assert response.status == 200
        await proxy.cut()
        for path in ("/api/messages", "/api/messages/1", "/api/accounts", "/api/users/me"):
            await _expect_503(session, path, admin_token)
        async with session.get("/api/health") as response:
            assert response.status == 200
        async with session.get("/api/health/detailed", headers=headers) as response:
            assert response.status == 503 and (await response.json())["database"]["status"] == "down"
        await proxy.start()
        async with session.get("/api/messages", headers=headers) as response:
            assert response.status == 200


async def test_writes_committed_before_a_redis_outage_answer_accepted(
        platform_env: dict[str, str], admin_token: str, db: asyncpg.Pool, tmp_path: Path) -> None:
    """With Redis stopped, what PostgreSQL committed is accepted (the reconciler or the webhook sweep
    enqueues it later), never a 503 that a retrying client would turn into a duplicate: a message
    (202, retried with its key: the same one), a campaign start and resume, a webhook test delivery, a
    new account (201, saying its login waits). A requeue, which writes Redis only, still answers 503."""
    account_id = int(await db.fetchval("INSERT INTO accounts (phone) VALUES ('+9996681234') RETURNING id"))
    with ThrowawayRedis(tmp_path / "redis") as own_redis:
        settings = Settings.from_env({**platform_env, "REDIS_URL": own_redis.url}, app_mode="api")
        async with serve(settings) as (_, session):
            headers = {"Authorization": f"Bearer {admin_token}"}
            campaign_body = {"name": "c", "account_ids": [account_id], "template": "hi",
                             "recipients": [{"peer": "@a"}]}
            async with session.post("/api/campaigns", headers=headers, json=campaign_body) as response:
                assert response.status == 201
                campaign = await response.json()
            async with session.post("/api/webhooks", headers=headers,
                                    json={"url": "http://127.0.0.1:9/x", "events": ["*"]}) as response:
                assert response.status == 201
                hook = await response.json()
            own_redis.stop()

            message = {"account_id": account_id, "peer": "@bob", "text": "once"}
            ids = []
            for _ in range(2):
                async with session.post("/api/messages", headers={**headers, "Idempotency-Key": "outage-1"},
                                        json=message) as response:
                    body = await response.json()
                    assert response.status == 202, body
                    ids.append(body["id"])
            assert ids[0] == ids[1]
            assert await db.fetchval("SELECT count(*) FROM messages WHERE campaign_id IS NULL") == 1

            for action, status in (("start", "running"), ("pause", "paused"), ("resume", "running")):
                async with session.post(f"/api/campaigns/{campaign['id']}/{action}", headers=headers) as response:
                    body = await response.json()
                    assert response.status == 200 and body["status"] == status, (action, body)

            async with session.post(f"/api/webhooks/{hook['id']}/test", headers=headers) as response:
                body = await response.json()
                assert response.status == 202 and body["status"] == "pending", body

            async with session.post("/api/queues/default/failed/some-job/requeue", headers=headers) as response:
                assert response.status == 503

            # A new account: its row is committed before its login is asked of a worker.
            async with session.post("/api/accounts", headers=headers, json={"phone": "+9996685555"}) as response:
                created = await response.json()
                assert response.status == 201 and created["auth_state"] == "wait_phone", created
                assert "login has not started" in created["last_error"]
            async with session.post("/api/accounts", headers=headers, json={"phone": "+9996685555"}) as response:
                assert response.status == 409  # a retry finds it: one account, not two
            assert await db.fetchval("SELECT count(*) FROM accounts WHERE phone = '+9996685555'") == 1


async def _expect_503_on(session: ClientSession, method: str, path: str, **kwargs: object) -> None:
    async with session.request(method, path, **kwargs) as response:  # type: ignore[arg-type]
        body = await response.json()
    assert response.status == 503, (method, path, response.status, body)
    assert body["error"]["code"] == "service_unavailable" and int(response.headers["Retry-After"]) > 0


async def test_a_redis_that_refuses_writes_gives_503(platform_env: dict[str, str], tmp_path: Path) -> None:
    """A Redis out of memory (OOM) or turned read-only (READONLY) answers 503 with Retry-After, not 500."""
    login = {"json": {"username": "nobody", "password": "x" * 12}}
    with ThrowawayRedis(tmp_path / "redis") as own_redis:
        settings = Settings.from_env({**platform_env, "REDIS_URL": own_redis.url}, app_mode="api")
        control = aioredis.Redis.from_url(own_redis.url)
        async with serve(settings) as (_, session):
            try:
                await control.config_set("maxmemory", "1")
                await _expect_503_on(session, "POST", "/api/auth/login", **login)
                await control.config_set("maxmemory", "0")
                await control.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
                await _expect_503_on(session, "POST", "/api/auth/login", **login)
            finally:
                await control.config_set("maxmemory", "0")
                await control.execute_command("REPLICAOF", "NO", "ONE")
                await control.aclose()


async def test_a_read_only_database_gives_503(api: ApiClient, admin_token: str, db: asyncpg.Pool) -> None:
    """Writes to a database that became read-only (a failover, a full disk's safety switch) answer
    503 with Retry-After, not 500."""
    name = await db.fetchval("SELECT current_database()")
    pool = api.app[DB]
    try:
        await db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await pool.expire_connections()
        status, body = await api.call("POST", "/api/users", admin_token,
                                      json={"username": "ro-user", "password": "x" * 12, "role": "viewer"})
        assert status == 503 and body["error"]["code"] == "service_unavailable", body
    finally:
        await db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await pool.expire_connections()


def test_each_outage_error_is_answered_as_one() -> None:
    """Errors of a server going away or refusing writes count as outages (503), others do not."""
    for exc in (asyncpg.AdminShutdownError("terminating connection due to administrator command"),
                asyncpg.CrashShutdownError("crash"), asyncpg.ReadOnlySQLTransactionError("read-only"),
                asyncpg.DiskFullError("no space"), ConnectionResetError(104, "reset"), BrokenPipeError(),
                redis.exceptions.BusyLoadingError("loading"), redis.exceptions.ReadOnlyError("replica"),
                redis.exceptions.OutOfMemoryError("command not allowed"),
                redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
                redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'")):
        assert outages.is_outage(exc), exc
    for exc in (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), asyncpg.DataError("bad"),
                FileNotFoundError(2, "gone"), ValueError("x")):
        assert not outages.is_outage(exc), exc

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import servers  # tests/servers.py: the logic behind the server fixtures
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support import ApiClient, EmulatorHandle, Host, HostFactory, TcpProxy, WorkerProcess, build_host, free_port

from telegram_platform.api.app import create_app
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.settings import Settings
from telegram_platform.storage.db import open_pool
from telegram_platform.storage.migrations import migrate
from telegram_platform.storage.redis import open_redis
from telegram_platform.telegram.base import Update
from telegram_platform.telegram.emulator.http import create_emulator_app
from telegram_platform.telegram.emulator.model import EmulatorConfig, TelegramEmulator
from telegram_platform.telegram.factory import create_backend


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a fresh database for this session (dropped at the end), on a throwaway server
    unless TEST_DATABASE_URL names one."""
    with (
        servers.postgres_server(tmp_path_factory.mktemp("postgres")) as server_url,
        servers.fresh_database(server_url) as url,
    ):
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the test Redis: TEST_REDIS_URL, or a throwaway server for this session."""
    with servers.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    """The test Redis URL, with its database flushed (FLUSHDB) before the test."""
    servers.flush_redis(redis_url)
    return redis_url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.ThrowawayRadosgw]:
    """Ceph's radosgw, a real S3 server, for the whole session; skipped when Ceph is not installed."""
    missing = servers.missing_ceph_binaries()
    if missing:
        pytest.skip(f"radosgw not installed ({', '.join(missing)} missing): apt-get install {servers.CEPH_PACKAGES} "
                    "(scripts/test does, as root)")
    with servers.ThrowawayRadosgw(tmp_path_factory.mktemp("radosgw")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: servers.ThrowawayRadosgw) -> str:
    """A new, empty bucket of the session's radosgw."""
    bucket = f"tp-test-{secrets.token_hex(6)}"
    s3_server.create_bucket(bucket)
    return bucket


@pytest.fixture(params=["postgres", "s3"])
def file_store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """TP_FILE_STORE and its variables, once per store: PostgreSQL, then a fresh bucket of radosgw."""
    if request.param == "postgres":
        return {}
    server: servers.ThrowawayRadosgw = request.getfixturevalue("s3_server")
    return server.env(request.getfixturevalue("s3_bucket"))


# -- the platform's own parts, built with the same factories the programs use -------------------

TEST_JWT_SECRET = "test-jwt-secret-0123456789abcdef-0123456789"
TEST_ENCRYPTION_KEY = "5" * 64
ADMIN_PASSWORD = "admin-password-123"


@pytest.fixture(scope="session")
async def emulator() -> AsyncIterator[EmulatorHandle]:
    """An emulated Telegram served on a free local port for the whole session."""
    telegram = TelegramEmulator(EmulatorConfig(latency_ms=1.0))
    runner = web.AppRunner(create_emulator_app(telegram))
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield EmulatorHandle(telegram, f"http://127.0.0.1:{port}")
    await runner.cleanup()


@pytest.fixture
def fresh_emulator(emulator: EmulatorHandle) -> EmulatorHandle:
    """The session's emulator, reset to a clean state with its default configuration."""
    emulator.telegram.reset(EmulatorConfig(latency_ms=1.0))
    return emulator


@pytest.fixture
def platform_env(database_url: str, redis_url: str, emulator: EmulatorHandle,
                 tmp_path: Path) -> dict[str, str]:
    """The environment a real deployment would give the programs, pointing at the test servers."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "TP_EMULATOR_URL": emulator.url,
        "TP_VAR_DIR": str(tmp_path / "var"),
        "TP_LOG_FORMAT": "json",
        "TP_WORKER_DRAIN_SECONDS": "10",
        "TP_API_DRAIN_SECONDS": "5",
        "PORT": str(free_port()),
        # The tests' webhook receivers listen on loopback, which deliveries refuse unless allowed.
        "TP_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
    }


@pytest.fixture
def settings(platform_env: dict[str, str]) -> Settings:
    return Settings.from_env(platform_env, app_mode="api")


@pytest.fixture
async def db(settings: Settings, clean_redis: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database with every table emptied, and a flushed Redis."""
    async with open_pool(settings, min_size=1, max_size=4) as pool:
        async with pool.acquire() as conn:
            await migrate(conn)
            await conn.execute("TRUNCATE users, refresh_tokens, accounts, messages, incoming_messages, hosts, files "
                               "RESTART IDENTITY CASCADE")
            # The files' bytes (large objects) are not rows: a truncate leaves them behind.
            await conn.execute("SELECT lo_unlink(oid) FROM pg_largeobject_metadata")
        yield pool


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    async with open_redis(settings.redis) as client:
        yield client


@pytest.fixture
def redis_auth(settings: Settings) -> RedisAuth:
    """MACs and seals with the tests' ENCRYPTION_KEY, as the platform's processes make them."""
    return RedisAuth(settings.encryption_key)


@pytest.fixture
async def api(settings: Settings, db: asyncpg.Pool) -> AsyncIterator[ApiClient]:
    """The real application from `create_app(settings)`, served on a local port."""
    app = create_app(settings)
    async with TestServer(app, port=free_port()) as server, TestClient(server) as client:
        yield ApiClient(client, app)


@pytest.fixture
async def admin_token(api: ApiClient, db: asyncpg.Pool) -> str:
    return await api.user_token("admin", "admin", db)


@pytest.fixture
def worker(platform_env: dict[str, str], db: asyncpg.Pool) -> Iterator[WorkerProcess]:
    """A real `tp-worker` (pool and child) process, stopped with SIGTERM at the end."""
    process = WorkerProcess.start(platform_env)
    yield process
    process.stop()


@pytest.fixture
async def make_host(settings: Settings, db: asyncpg.Pool, redis: aioredis.Redis,
                    fresh_emulator: EmulatorHandle) -> AsyncIterator[HostFactory]:
    """Builds Telegram hosts as worker children do (emulator backend); all closed at the end."""
    hosts: list[Host] = []

    async def make(name: str, *, redis_client: aioredis.Redis | None = None, settings: Settings = settings,
                   **kwargs: Any) -> Host:
        """`settings`: another host's (its own TP_HOST_ID), where a test needs several."""
        ref: list[Host] = []

        async def on_update(update: Update) -> None:
            await ref[0].sessions.on_update(update)

        host = build_host(settings, db, redis_client or redis, create_backend(settings, on_update=on_update),
                          worker_name=name, **kwargs)
        ref.append(host)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        await host.sessions.aclose(time.monotonic() + 5)


@pytest.fixture
async def redis_proxy(platform_env: dict[str, str]) -> AsyncIterator[tuple[TcpProxy, aioredis.Redis]]:
    """A Redis client through a proxy a test can cut; listed before `make_host`, it outlives the hosts."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    client = aioredis.Redis.from_url(proxy.url, socket_connect_timeout=1, socket_timeout=1)
    yield proxy, client
    await client.aclose()
    await proxy.cut()

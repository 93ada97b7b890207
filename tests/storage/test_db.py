"""The per-process PostgreSQL pool on a DATABASE_URL naming several hosts (libpq's form, which
asyncpg reads): a dead host first is passed over, and with target_session_attrs=read-write so is a
server that only takes reads (an old primary come back as a standby, a read-only replica)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from support import free_port

from telegram_platform.ops.check import check_database, load_context
from telegram_platform.settings import Settings
from telegram_platform.storage import hosts as host_store
from telegram_platform.storage.db import open_pool
from telegram_platform.storage.migrations import ensure_schema
from telegram_platform.worker.liveness import Liveness, alive


def _several_hosts(live_url: str, first: str, *, read_write: bool = True) -> str:
    """The live server's URL with `first` (host:port) named before it."""
    parts = urlsplit(live_url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    query = "?target_session_attrs=read-write" if read_write else ""
    return f"{parts.scheme}://{userinfo}{first},{parts.hostname}:{parts.port}{parts.path}{query}"


async def test_a_dead_host_named_first_is_passed_over(platform_env: dict[str, str], database_url: str) -> None:
    """DATABASE_URL=postgresql://...@dead:port,live:port/db?target_session_attrs=read-write passes
    the settings, and the pool, the worker's liveness lock and `tp check` all reach the live server."""
    live_port = urlsplit(database_url).port
    url = _several_hosts(database_url, f"127.0.0.1:{free_port()}")
    env = {**platform_env, "DATABASE_URL": url}
    settings = Settings.from_env(env, app_mode="worker")
    async with open_pool(settings, wait_seconds=5) as pool:
        assert await pool.fetchval("SELECT inet_server_port()") == live_port
        async with pool.acquire() as conn:
            await ensure_schema(conn, auto_migrate=True)
        await host_store.announce(pool, "multi-host-test")
        liveness = Liveness(settings.database.url, "multi-host-test/w0-1")
        await liveness.hold()
        try:
            assert await alive(pool, ["multi-host-test/w0-1"]) == {"multi-host-test/w0-1"}
        finally:
            await liveness.close()
        await pool.execute("DELETE FROM hosts WHERE id = 'multi-host-test'")
    assert (await check_database(load_context(env))).endswith("reachable, schema up to date")


async def test_read_write_passes_over_a_server_that_only_takes_reads(platform_env: dict[str, str],
                                                                    database_url: str, tmp_path: Path) -> None:
    """A real second server that refuses writes, named first: with target_session_attrs=read-write
    the pool writes on the live server; without it, it lands on the read-only one and a write fails."""
    from telegram_platform.devstack.servers import ThrowawayPostgres

    database = urlsplit(database_url).path.lstrip("/")
    with ThrowawayPostgres(tmp_path / "read-only") as other:
        conn = await asyncpg.connect(other.url)
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
            await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        first = f"127.0.0.1:{other.port}"
        live_port = urlsplit(database_url).port
        settings = Settings.from_env({**platform_env, "DATABASE_URL": _several_hosts(database_url, first)})
        async with open_pool(settings, wait_seconds=5) as pool:
            assert await pool.fetchval("SELECT inet_server_port()") == live_port
            await pool.execute("CREATE TEMPORARY TABLE written (n int); INSERT INTO written VALUES (1)")
        plain = Settings.from_env({**platform_env, "DATABASE_URL": _several_hosts(database_url, first,
                                                                                   read_write=False)})
        async with open_pool(plain, wait_seconds=5, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("SELECT inet_server_port()") == other.port
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await pool.execute("CREATE TABLE written (n int)")


async def test_a_connection_goes_back_to_the_pool_without_a_reset_query(settings: Settings, db: asyncpg.Pool) -> None:
    """Releasing a pooled connection sends nothing (asyncpg's default sends a reset query, a round
    trip and a transaction per use): the session's last statement is still the caller's. An open
    transaction is still rolled back on release."""
    async with open_pool(settings, min_size=1, max_size=1) as pool:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.fetchval("SELECT 41 AS released_without_reset")
        seen = await db.fetchrow("SELECT query, state FROM pg_stat_activity WHERE pid = $1", pid)
        assert seen["query"] == "SELECT 41 AS released_without_reset" and seen["state"] == "idle", dict(seen)
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("CREATE TABLE left_open (x int)")
        assert not await db.fetchval("SELECT to_regclass('left_open') IS NOT NULL")
        assert await pool.fetchval("SELECT to_regclass('left_open') IS NULL")

"""Migrations: applied once, in order, safely from concurrent processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import asyncpg

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import users
from telegram_platform.storage.migrations import available_migrations, migrate, pending_migrations


async def _fresh_database(database_url: str, name: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url.rsplit("/", 1)[0] + f"/{name}"


async def test_migrate_applies_every_version_once(database_url: str) -> None:
    """A new database gets every migration; a second run applies nothing."""
    url = await _fresh_database(database_url, "tp_migrate_once")
    conn = await asyncpg.connect(url)
    try:
        assert await pending_migrations(conn) == [m.version for m in available_migrations()]
        applied = await migrate(conn)
        assert applied == [m.version for m in available_migrations()]
        assert await migrate(conn) == []
        assert await pending_migrations(conn) == []
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"users", "accounts", "messages", "refresh_tokens", "schema_migrations"} <= tables
    finally:
        await conn.close()


async def test_concurrent_migrations_do_not_race(database_url: str) -> None:
    """Five processes' worth of connections migrating at once: each version applied exactly once."""
    url = await _fresh_database(database_url, "tp_migrate_race")
    conns = [await asyncpg.connect(url) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [v for r in results for v in r]
        assert sorted(applied) == [m.version for m in available_migrations()]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(available_migrations())
    finally:
        for c in conns:
            await c.close()


async def _migrated_before(conn: asyncpg.Connection, name: str) -> None:
    """The database as it was just before the migration called `name`."""
    version = next(m.version for m in available_migrations() if m.name == name)
    await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                       "applied_at timestamptz NOT NULL DEFAULT now())")
    for migration in available_migrations():
        if migration.version < version:
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)


async def test_refresh_tokens_in_clear_are_hashed_by_the_migration(database_url: str) -> None:
    """Tokens issued before hashing (the token was the row id) are stored hashed afterwards, under a
    new id, and keep working; each is a family of its own."""
    url = await _fresh_database(database_url, "tp_migrate_tokens")
    conn = await asyncpg.connect(url)
    try:
        await _migrated_before(conn, "refresh_token_families")
        user_id = await conn.fetchval("INSERT INTO users (username, password_hash, role) "
                                      "VALUES ('old', 'x', 'viewer') RETURNING id")
        token = uuid.uuid4()
        await conn.execute("INSERT INTO refresh_tokens (id, user_id, expires_at) VALUES ($1, $2, now() + '1 day')",
                           token, user_id)
        await migrate(conn)
        row = await conn.fetchrow("SELECT * FROM refresh_tokens")
        assert row["id"] != token and row["token_hash"] == hashlib.sha256(str(token).encode()).digest()
        assert row["family_id"] is not None
        assert await users.consume_refresh_token(conn, str(token)) == (user_id, row["family_id"])
    finally:
        await conn.close()


async def test_stored_service_notifications_are_deleted_by_the_migration(database_url: str) -> None:
    """Login codes stored as incoming messages before they were kept out are deleted; other
    messages stay."""
    url = await _fresh_database(database_url, "tp_migrate_service")
    conn = await asyncpg.connect(url)
    try:
        await _migrated_before(conn, "forget_service_notifications")
        account_id = await conn.fetchval("INSERT INTO accounts (phone) VALUES ('+9996611234') RETURNING id")
        for chat_id, message_id, sender, text in ((777000, 1, "777000", "Login code: 12345"),
                                                  (42, 2, "@eve", "hello")):
            await conn.execute("INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text) "
                               "VALUES ($1, $2, $3, $4, $5)", account_id, chat_id, message_id, sender, text)
        await migrate(conn)
        assert [r["text"] for r in await conn.fetch("SELECT text FROM incoming_messages")] == ["hello"]
    finally:
        await conn.close()


async def test_proxy_credentials_in_clear_are_moved_out_and_sealed(database_url: str) -> None:
    """A proxy password stored in clear before sealing is out of the readable proxy after the
    migration, sealed by the first process that holds the key, and still reaches the session."""
    key = bytes.fromhex("5" * 64)
    url = await _fresh_database(database_url, "tp_migrate_proxy")
    conn = await asyncpg.connect(url)
    try:
        await _migrated_before(conn, "seal_proxy_credentials")
        account_id = await conn.fetchval(
            "INSERT INTO accounts (phone, proxy) VALUES ('+9996611235', $1::jsonb) RETURNING id",
            json.dumps({"type": "http", "server": "p.example", "port": 8080, "username": "u",
                        "password": "old-clear-pw", "secret": None, "http_only": True}))
        await migrate(conn)
        account = await account_store.get_account(conn, account_id)
        assert "password" not in account["proxy"] and account["proxy"]["has_password"] is True
        assert await account_store.seal_clear_proxy_credentials(conn, key) == 1
        assert "old-clear-pw" not in repr(dict(await conn.fetchrow("SELECT * FROM accounts")))
        assert (await account_store.session_proxy(conn, key, account_id) or {})["password"] == "old-clear-pw"
    finally:
        await conn.close()

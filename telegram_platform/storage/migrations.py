"""Versioned SQL migrations, applied in order under a PostgreSQL advisory lock.

Every process may call `migrate` at start: the lock makes concurrent starts wait for the first one
instead of racing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
import structlog

from ..settings import ConfigError

log = structlog.get_logger(__name__)

# An arbitrary, fixed 64-bit key: "tp-migr" in ASCII.
ADVISORY_LOCK_KEY = 0x74702D6D69677200
_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("telegram_platform.storage").joinpath("migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration; returns the versions applied by this call."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
            log.info("migration applied", version=migration.version, name=migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    return applied_now


async def pending_migrations(conn: asyncpg.Connection) -> list[int]:
    """Versions not yet applied (`tp check`, and `ensure_schema` at each process's start)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m.version for m in available_migrations() if m.version not in done]


async def ensure_schema(conn: asyncpg.Connection, *, auto_migrate: bool) -> None:
    """At a process's start: migrate (TP_AUTO_MIGRATE), or refuse a schema behind the code. Code
    newer than its schema would fail in some routes and jobs only, as 500s and failed jobs."""
    if auto_migrate:
        await migrate(conn)
    elif pending := await pending_migrations(conn):
        raise ConfigError("DATABASE_URL", f"the schema lacks migrations {', '.join(map(str, pending))}: "
                          "run `tp migrate` first (or set TP_AUTO_MIGRATE=true)")

"""The API process at start: a database schema behind the code stops it with one line."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from telegram_platform.storage.migrations import available_migrations


async def test_tp_api_refuses_a_schema_behind_the_code(platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """With TP_AUTO_MIGRATE=false and a migration not applied, `tp-api` exits 2 with one line
    naming DATABASE_URL and `tp migrate`, instead of serving routes that would fail."""
    latest = available_migrations()[-1]
    row = await db.fetchrow("DELETE FROM schema_migrations WHERE version = $1 RETURNING *", latest.version)
    assert row is not None
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from telegram_platform.cli.api import main; main()",
            env={**platform_env, "TP_AUTO_MIGRATE": "false"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        await db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                         row["version"], row["name"], row["applied_at"])
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 2, stderr.decode()
    assert len(lines) == 1 and "DATABASE_URL" in lines[0] and "tp migrate" in lines[0], lines
    assert f"migrations {latest.version}" in lines[0]

"""The API process at start: a database schema behind the code stops it with one line."""

from __future__ import annotations

import asyncpg
from support import run_to_exit, schema_behind

from telegram_platform.settings import EXIT_CONFIG


async def test_tp_api_refuses_a_schema_behind_the_code(platform_env: dict[str, str], db: asyncpg.Pool) -> None:
    """With TP_AUTO_MIGRATE=false and a migration not applied, `tp-api` exits 78 (EX_CONFIG) with one line
    naming DATABASE_URL and `tp migrate`, instead of serving routes that would fail."""
    async with schema_behind(db) as missing:
        status, _, stderr = await run_to_exit("from telegram_platform.cli.api import main; main()",
                                              {**platform_env, "TP_AUTO_MIGRATE": "false"})
    lines = stderr.strip().splitlines()
    assert status == EXIT_CONFIG, stderr
    assert len(lines) == 1 and "DATABASE_URL" in lines[0] and "tp migrate" in lines[0], lines
    assert f"migrations {missing}" in lines[0]

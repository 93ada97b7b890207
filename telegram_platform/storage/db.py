"""The per-process asyncpg pool, opened and closed as one resource."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg
import structlog

from ..outages import POSTGRES_DOWN
from ..settings import Settings

log = structlog.get_logger(__name__)



async def keep_session(conn: asyncpg.Connection) -> None:
    """A connection going back to the pool keeps its session as it is: no reset query.

    asyncpg's default runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on
    every release: one more round trip and one more server transaction for each use of the pool,
    about half of all the statements a send makes. The platform leaves nothing in a pooled session
    for it to clear: no session settings (`SET`), no LISTEN (the pool's listeners are removed by
    asyncpg itself), no cursor outside a transaction (an open transaction is still rolled back by
    asyncpg before this is called), and the one session-level advisory lock taken on a pooled
    connection (worker/retention.py) is released by its holder, which closes the connection when
    that fails. The liveness lock has a connection of its own (worker/liveness.py)."""


@asynccontextmanager
async def open_pool(
    settings: Settings, *, wait_seconds: float = 30.0, min_size: int | None = None, max_size: int | None = None,
    command_timeout: float = 30.0, connect_timeout: float = 60.0,
) -> AsyncIterator[asyncpg.Pool]:
    """Open a pool, waiting up to `wait_seconds` for the server (it may start beside us).

    `connect_timeout` bounds opening a connection, `command_timeout` every query: a server that
    stops answering costs a caller at most that long (asyncio.TimeoutError), never a hang."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.1
    while True:
        try:
            pool = await asyncpg.create_pool(
                settings.database.url,
                min_size=settings.database.pool_min if min_size is None else min_size,
                max_size=settings.database.pool_max if max_size is None else max_size,
                command_timeout=command_timeout,
                timeout=connect_timeout,
                server_settings={"application_name": f"telegram-platform:{settings.app_mode}"},
                reset=keep_session,
            )
            break
        except POSTGRES_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.info("database not ready, retrying", error=type(exc).__name__, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), timeout=10)


class Queryable(Protocol):
    """What the stores need: an asyncpg Pool or Connection."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: Any) -> Any: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...

    async def execute(self, query: str, *args: Any) -> str: ...

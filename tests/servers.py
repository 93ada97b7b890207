"""Test servers: TEST_DATABASE_URL / TEST_REDIS_URL when set, else throwaway local instances.

The fixtures in conftest.py are thin wrappers around the context managers here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from telegram_platform.devstack.servers import ThrowawayPostgres, ThrowawayRedis

_T = TypeVar("_T")


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion in a thread of its own (never touches pytest-asyncio's loop)."""
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="test-servers")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def with_database(url: str, database: str) -> str:
    """The same server URL, naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


@contextmanager
def postgres_server(tmp_dir: Path) -> Iterator[str]:
    """A PostgreSQL server URL: TEST_DATABASE_URL, or a throwaway instance stopped at the end."""
    external = os.environ.get("TEST_DATABASE_URL", "").strip()
    if external:
        yield external
        return
    with ThrowawayPostgres(tmp_dir) as server:
        yield server.url


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """Create a uniquely named database on the server; yield its URL; drop it afterwards."""
    name = f"tp_test_{os.getpid()}_{secrets.token_hex(4)}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(server_url, timeout=30)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    run_async(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_url, name)
    finally:
        run_async(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def redis_server(tmp_dir: Path) -> Iterator[str]:
    """A Redis URL: TEST_REDIS_URL, or a throwaway instance stopped at the end."""
    external = os.environ.get("TEST_REDIS_URL", "").strip()
    if external:
        yield external
        return
    with ThrowawayRedis(tmp_dir) as server:
        yield server.url


def flush_redis(url: str) -> None:
    """FLUSHDB on the database the URL names."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()

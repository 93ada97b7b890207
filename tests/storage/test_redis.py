"""The per-process Redis client: bounded when Redis stops answering, transparent when a pooled
connection was closed under it."""

from __future__ import annotations

import time

import pytest
import redis.exceptions
from support import TcpProxy

from telegram_platform.settings import RedisSettings
from telegram_platform.storage.redis import open_redis


async def test_a_redis_that_stops_answering_fails_a_command_after_its_timeout(platform_env: dict[str, str]) -> None:
    """No retry after a timeout: a Redis that stops answering costs one socket_timeout per command."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    try:
        async with open_redis(RedisSettings(url=proxy.url), socket_timeout=0.5) as client:
            await client.set("tp:test:k", "v")
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(redis.exceptions.TimeoutError):
                await client.get("tp:test:k")
            assert time.monotonic() - started < 1.5
    finally:
        await proxy.cut()


async def test_a_pooled_connection_the_server_closed_is_replaced_once(platform_env: dict[str, str]) -> None:
    """Redis restarted (its connections reset) while the client sat idle: the next command gets a
    fresh connection instead of the error (redis-py's from_url retries nothing by default)."""
    proxy = TcpProxy.before(platform_env["REDIS_URL"])
    await proxy.start()
    try:
        async with open_redis(RedisSettings(url=proxy.url), socket_timeout=2) as client:
            await client.set("tp:test:k", "v")
            await proxy.cut()
            await proxy.start()
            assert await client.get("tp:test:k") == b"v"
    finally:
        await proxy.cut()

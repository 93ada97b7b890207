"""The per-process Redis client, opened and closed as one resource: the one factory every Redis
connection of the platform goes through, to one server (REDIS_URL) or to the master a set of
Sentinels names (REDIS_SENTINELS + REDIS_SENTINEL_SERVICE, docs/configuration.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..outages import REDIS_DOWN
from ..settings import RedisSettings

log = structlog.get_logger(__name__)


def _sentinel_client(settings: RedisSettings, options: dict[str, Any]) -> tuple[aioredis.Redis, Sentinel]:
    """A client of the master the sentinels name. redis-py's SentinelConnectionPool asks them for
    the master's address on every new connection and drops connections to a demoted master, so a
    failover costs the commands in flight, then the next connection reaches the new master."""
    assert settings.url is not None and settings.sentinel_service is not None
    # REDIS_URL's credentials, database and TLS; its address is Sentinel's to give.
    from_url: dict[str, Any] = {k: v for k, v in parse_url(settings.url).items() if k not in ("host", "port", "path")}
    if from_url.pop("connection_class", None) is SSLConnection:
        from_url["ssl"] = True
    sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
    if settings.sentinel_password:
        sentinel_options["password"] = settings.sentinel_password
    sentinel = Sentinel(list(settings.sentinels), sentinel_kwargs=sentinel_options)
    client: aioredis.Redis = sentinel.master_for(settings.sentinel_service, **from_url, **options)
    return client, sentinel


def redis_client(settings: RedisSettings, *, socket_timeout: float | None = None,
                 socket_connect_timeout: float = 5.0) -> tuple[aioredis.Redis, Sentinel | None]:
    """The client (and, with Sentinel, the sentinels' own clients, to close with it). A command is
    tried again once after a broken connection (one the server closed while it sat in the pool:
    after a Redis restart or a failover, the first command on each pooled connection used to fail),
    and never after a timeout, so a Redis that stops answering costs one `socket_timeout` per command."""
    options: dict[str, Any] = {
        "health_check_interval": 30, "socket_connect_timeout": socket_connect_timeout, "socket_keepalive": True,
        "socket_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    }
    if settings.uses_sentinel:
        return _sentinel_client(settings, options)
    assert settings.url is not None
    return aioredis.Redis.from_url(settings.url, **options), None


@asynccontextmanager
async def open_redis(
    settings: RedisSettings, *, wait_seconds: float = 30.0, socket_timeout: float | None = None
) -> AsyncIterator[aioredis.Redis]:
    """Connect and PING, waiting up to `wait_seconds` for the server (it may start beside us).

    `socket_timeout` bounds every command (it must exceed the longest blocking command's wait)."""
    client, sentinel = redis_client(settings, socket_timeout=socket_timeout)
    deadline = time.monotonic() + wait_seconds
    delay = 0.1
    try:
        while True:
            try:
                await client.ping()
                break
            except REDIS_DOWN as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("redis not ready, retrying", error=type(exc).__name__, delay=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        yield client
    finally:
        await client.aclose()
        if sentinel is not None:
            await sentinel.aclose()

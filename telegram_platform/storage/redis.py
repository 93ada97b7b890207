"""The per-process Redis client, opened and closed as one resource."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..outages import REDIS_DOWN

log = structlog.get_logger(__name__)


@asynccontextmanager
async def open_redis(
    url: str, *, wait_seconds: float = 30.0, socket_timeout: float | None = None
) -> AsyncIterator[aioredis.Redis]:
    """Connect and PING, waiting up to `wait_seconds` for the server (it may start beside us).

    `socket_timeout` bounds every command (it must exceed the longest blocking command's wait).
    A command is tried again once after a broken connection (one the server closed while it sat in
    the pool: after a Redis restart, the first command on each pooled connection used to fail), and
    never after a timeout, so a Redis that stops answering costs one `socket_timeout` per command."""
    client = aioredis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5,
                                     socket_keepalive=True, socket_timeout=socket_timeout,
                                     retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)))
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

"""Platform events (`message.status`, `account.state`, ...) published on Redis for every API process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

log = structlog.get_logger(__name__)

EVENTS_CHANNEL = "tp:events"
CANCEL_RETRY = 0.5


def encode_event(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "data": data, "ts": time.time()}, default=str)


async def publish(redis: aioredis.Redis, event_type: str, data: dict[str, Any]) -> None:
    await redis.publish(EVENTS_CHANNEL, encode_event(event_type, data))


async def stop_listening(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel a `listen` task (and its companions) and await them; cancel again while one still
    runs. Python 3.11's asyncio.wait_for, which redis-py (and asyncpg) use while connecting, loses
    a cancellation that lands just as what it waits for completes (python/cpython#86296, fixed in
    3.12): the task then runs on, and a shutdown that awaited it once would hang."""
    pending = tasks
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=CANCEL_RETRY)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("listener failed", task=task.get_name(), exc_info=task.exception())


async def listen(client: aioredis.Redis, handle: Callable[[bytes | str], Awaitable[None]], *, listener: str,
                 subscribed: asyncio.Event | None = None, channel: str = EVENTS_CHANNEL,
                 on_subscribed: Callable[[], Awaitable[None]] | None = None) -> None:
    """Hand every message of `channel` (the events, unless told) to `handle` until cancelled. A lost
    Redis connection is retried with back-off; messages published meanwhile are lost, as pub/sub
    keeps nothing: `on_subscribed`, awaited after each (re)subscription, can catch up from where
    the state is kept. `subscribed` is set while this process is subscribed and cleared while not."""
    delay = 0.1
    while True:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if on_subscribed is not None:
                await on_subscribed()
            if subscribed is not None:
                subscribed.set()
            delay = 0.1
            async for message in pubsub.listen():
                if message["type"] == "message":
                    await handle(message["data"])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            if subscribed is not None:
                subscribed.clear()
            log.warning(f"{listener} subscription lost, retrying", error=type(exc).__name__, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

"""Platform events (`message.status`, `account.state`, ...) published on Redis for every API process.

Each event also goes into a capped Redis stream, the event log, whose entry id becomes the event's
`id`: one Lua call appends it and publishes it, so every listener receives the same text, ids grow
in publishing order, and a WebSocket client that reconnects with the last id it saw is sent what it
missed from the log (api/ws.py) instead of losing it to pub/sub, which keeps nothing.

Each event carries a MAC (redis_auth.py) over its text as encoded (without the id, which Redis
assigns): the log entry holds it in the field `m`, the published message starts with it. Readers take
events through `open_published` and `log_after`, which pass on only genuine ones, as the text as
published; a forged or altered event is logged, counted and dropped there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from .batching import Coalescer
from .outages import REDIS_DOWN
from .redis_auth import MAC_LENGTH, RedisAuth
from .redis_keys import EVENTS_CHANNEL, EVENTS_LOG
from .settings import DEFAULT_EVENT_LOG_LENGTH

log = structlog.get_logger(__name__)

# A message an account received was edited, or messages of its chats were deleted (by their sender,
# or for everyone): the stored rows changed (worker/updates.py).
MESSAGE_EDITED = "message.edited"
MESSAGE_DELETED = "message.deleted"
# Telegram's service notifications for an account (login codes, new-login notices), codes masked.
SERVICE_NOTIFICATION = "account.service_notification"
# A webhook's circuit breaker opened (its deliveries are held) and closed again (worker/webhooks.py).
WEBHOOK_PAUSED = "webhook.paused"
WEBHOOK_RESUMED = "webhook.resumed"
# Events for admins alone: the WebSocket sends them to admin clients only (api/ws.py), webhooks
# never post them (worker/webhooks.py).
ADMIN_ONLY_EVENTS: frozenset[str] = frozenset({SERVICE_NOTIFICATION})
LogEntries = list[tuple[bytes | str, dict[Any, bytes | str]]]

# KEYS: log, channel. ARGV: the log's length, then each event's JSON object and its MAC.
# Appends and publishes the events in order; returns their ids. Called by its SHA: the script's text
# (~300 bytes) crosses the network only when Redis does not know it yet.
_APPEND_AND_PUBLISH = """
local ids = {}
for i = 2, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i], 'm', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[2], ARGV[i + 1] .. '{"id":"' .. id .. '",' .. string.sub(ARGV[i], 2))
  ids[#ids + 1] = id
end
return ids
"""
_APPEND_AND_PUBLISH_SHA = hashlib.sha1(_APPEND_AND_PUBLISH.encode()).hexdigest()
_ID_START = '{"id":"'
# Events one call carries at most (one Lua call must stay short); the rest go in the next.
BATCH_MAX = 256



def encode_event(event_type: str, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "data": data, "ts": time.time()}, default=str)


def with_id(event_id: str, encoded: str) -> str:
    """An event of the log as it was published: its id first in the object (as the script does)."""
    return f'{{"id":"{event_id}",{encoded[1:]}'


def without_id(published: str) -> str | None:
    """The event as encoded (what its MAC covers) from its text as published; None if it has no id."""
    if not published.startswith(_ID_START):
        return None
    end = published.find('",', len(_ID_START))
    # Only a stream id (`<ms>-<seq>`) may stand before the encoded event, nothing a MAC leaves uncovered.
    ms, dash, seq = published[len(_ID_START):end].partition("-")
    if end < 0 or not (dash and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    return "{" + published[end + 2:]


def open_published(auth: RedisAuth, message: bytes | str) -> str | None:
    """The text of a message of the events channel as published (without its MAC), if genuine;
    a forged or altered one is refused (logged, counted) and None."""
    raw = _text(message)
    mac, text = raw[:MAC_LENGTH], raw[MAC_LENGTH:]
    encoded = without_id(text)
    if encoded is None or not auth.event_genuine(encoded, mac):
        auth.refused("event", "an event without a valid MAC was dropped", size=len(raw))
        return None
    return text


def parse_id(event_id: bytes | str) -> tuple[int, int]:
    """A log id (`<ms>-<seq>`) as a sortable pair."""
    ms, _, seq = _text(event_id).partition("-")
    return int(ms), int(seq or 0)


async def publish(redis: aioredis.Redis, auth: RedisAuth, event_type: str, data: dict[str, Any], *,
                  log_length: int = DEFAULT_EVENT_LOG_LENGTH) -> str:
    """Append the event to the log (kept to about `log_length` events) and publish it, with its MAC;
    returns its id."""
    encoded = encode_event(event_type, data)
    return (await _append_and_publish(redis, [encoded, auth.event_mac(encoded)], log_length))[0]


async def _append_and_publish(client: aioredis.Redis, events_and_macs: list[str], log_length: int) -> list[str]:
    """One call for events already encoded and MAC'd (event, MAC, event, MAC, ...): their ids."""
    args: list[str | int] = [log_length, *events_and_macs]
    try:
        ids = await client.evalsha(_APPEND_AND_PUBLISH_SHA, 2, EVENTS_LOG, EVENTS_CHANNEL, *args)
    except redis.exceptions.NoScriptError:  # a Redis restarted or failed over: EVAL loads it again
        ids = await client.eval(_APPEND_AND_PUBLISH, 2, EVENTS_LOG, EVENTS_CHANNEL, *args)
    return [_text(i) for i in ids]


class Publisher:
    """Publishes events as `publish` does, those published while a call is on its way together in
    the next call: one Redis round trip (one socket write) for the events of many concurrent sends,
    not one each, and no wait added (the first event of a batch goes on the loop's next turn).

    Each event keeps its own MAC and id, and the events are appended and published in the order
    they were handed over. A caller's await ends when its event is in Redis (its id), or with the
    error the call met (REDIS_DOWN included, as `publish` raises it)."""

    def __init__(self, redis: aioredis.Redis, auth: RedisAuth, *, log_length: int = DEFAULT_EVENT_LOG_LENGTH) -> None:
        self._redis = redis
        self._auth = auth
        self._log_length = log_length
        self._batches: Coalescer[tuple[str, str], str] = Coalescer(self._append, max_batch=BATCH_MAX,
                                                                    name="events-publisher")

    @property
    def calls(self) -> int:
        """Redis calls made (what a test or a benchmark reads)."""
        return self._batches.calls

    async def publish(self, event_type: str, data: dict[str, Any]) -> str:
        encoded = encode_event(event_type, data)
        return await self._batches.submit((encoded, self._auth.event_mac(encoded)))

    async def _append(self, batch: list[tuple[str, str]]) -> list[str]:
        return await _append_and_publish(self._redis, [x for pair in batch for x in pair], self._log_length)


async def log_reaches(redis: aioredis.Redis, after: str) -> bool:
    """Whether the log still holds every event published after `after` (False: some were trimmed
    before they could be read; a client reads the state from the REST API)."""
    oldest = cast(LogEntries, await redis.xrange(EVENTS_LOG, count=1))
    return not oldest or parse_id(oldest[0][0]) <= parse_id(after)


async def log_after(redis: aioredis.Redis, auth: RedisAuth, after: str,
                    page_size: int) -> AsyncIterator[tuple[str, str]]:
    """Every genuine event of the log published after `after`, oldest first, as (id, text as
    published), read `page_size` at a time; an entry without a valid MAC is refused (logged, counted)."""
    while True:
        page = cast(LogEntries, await redis.xrange(EVENTS_LOG, min=f"({after}", max="+", count=page_size))
        for entry_id, fields in page:
            after = _text(entry_id)
            encoded = _text(fields.get(b"e", fields.get("e", b"")))
            if not auth.event_genuine(encoded, _text(fields.get(b"m", fields.get("m", b"")))):
                auth.refused("event", "an event of the log without a valid MAC was skipped", event_id=after)
                continue
            yield after, with_id(after, encoded)
        if len(page) < page_size:
            return


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


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
        except REDIS_DOWN as exc:
            if subscribed is not None:
                subscribed.clear()
            log.warning(f"{listener} subscription lost, retrying", error=type(exc).__name__, delay=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await asyncio.shield(pubsub.aclose())

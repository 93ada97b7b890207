"""Outbound webhook deliveries, performed by the worker.

Every worker child listens to `tp:events`; for each event and each active webhook that wants it, it
records a delivery (the first child to insert wins: one delivery per event and webhook, however many
children) and enqueues a `deliver` job on the `default` queue. The job POSTs the event, signed:

    X-TP-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    X-TP-Event: <type>    X-TP-Delivery: <delivery id>

Only public addresses are reached, unless allowed by TP_WEBHOOK_ALLOW_NETWORKS, with the address
checked being the one connected to (worker/webhook_addresses.py); redirects are not followed and a
receiver's body is never read or stored, only its status and reason phrase.

A 2xx answer delivers it; anything else (or no answer within 10 s) is retried with exponential
back-off (`TP_WEBHOOK_RETRY_SECONDS`, doubling, capped at an hour, with jitter) until
`TP_WEBHOOK_MAX_ATTEMPTS`, then the delivery is `failed`.

Events published while no worker listens (all children restarting, Redis reconnecting) are not lost
to pub/sub, which keeps nothing: the children keep the id of the latest event handled in Redis
(`tp:webhooks:cursor`, saved at most every second), and a child that (re)subscribes first reads the
event log (events.py) from there. Events handled twice make one delivery each (the first insert
wins). Only as far back as the log reaches: past it, the gap is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
import structlog
from yarl import URL

from .. import events
from ..outages import REDIS_DOWN
from ..queue.consumer import JobContext, Retry
from ..queue.jobs import JOB_PREFIX, Enqueuer
from ..queue.registry import DELIVER_WEBHOOK, WEBHOOK_QUEUE, webhook_delivery_job_id
from ..redis_auth import RedisAuth
from ..redis_keys import WEBHOOKS_CURSOR
from ..settings import Settings
from ..states import WebhookDeliveryStatus
from ..storage import webhooks as store
from .webhook_addresses import AddressRefused, PublicOnlyResolver, address_refusal, literal_address

log = structlog.get_logger(__name__)

REQUEST_TIMEOUT = 10.0
HOOKS_CACHE_SECONDS = 2.0
MAX_RETRY_DELAY = 3600.0
MAX_ERROR_TEXT = 200
# A pending delivery this overdue has lost its job (workers promote due jobs within seconds).
SWEEP_GRACE_SECONDS = 120
CURSOR_SAVE_SECONDS = 1.0
CATCH_UP_PAGE = 500


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-TP-Signature header's value for this body."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: check the signature and that it is recent (against replays)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={parts.get('v1', '')}")


async def record_and_enqueue(pool: asyncpg.Pool, enqueuer: Enqueuer, webhook_id: int, key: bytes,
                             event_type: str, event: dict[str, Any]) -> int | None:
    """Record one delivery and enqueue its job; None if it was recorded already. The recorded row is
    the truth: a job Redis does not take now is enqueued by the sweep (`WebhookService.sweep`)."""
    delivery_id = await store.add_delivery(pool, webhook_id, key, event_type, event)
    if delivery_id is not None:
        try:
            await enqueuer.enqueue(WEBHOOK_QUEUE, DELIVER_WEBHOOK, [delivery_id],
                                   job_id=webhook_delivery_job_id(delivery_id))
        except REDIS_DOWN as exc:
            log.warning("webhook delivery recorded while Redis is unreachable: the sweep will enqueue it",
                        delivery_id=delivery_id, error=type(exc).__name__)
    return delivery_id


class WebhookService:
    """One per worker child: the event listener and the `deliver` job handler."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._auth = auth
        self._enqueuer = Enqueuer(redis)
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PublicOnlyResolver | None = None
        self._hooks: list[dict[str, Any]] = []
        self._hooks_loaded = 0.0
        self._rng = random.Random()
        self.subscribed = asyncio.Event()
        self._handled: str | None = None  # the id of the latest event handled here
        self._cursor_saved_at = 0.0

    # -- events -> deliveries -----------------------------------------------------------------------

    async def listen(self) -> None:
        """Record deliveries for every event, until cancelled; reconnects to Redis with back-off,
        and catches up from the event log after each (re)subscription."""
        await events.listen(self._redis, self._on_event_logged, listener="webhook event",
                            subscribed=self.subscribed, on_subscribed=self._catch_up)

    async def _on_event_logged(self, raw: bytes | str) -> None:
        text = events.open_published(self._auth, raw)  # a forged event makes no delivery
        if text is None:
            return
        try:
            await self.on_event(text.encode())
        except (asyncpg.PostgresError, OSError, redis.exceptions.RedisError) as exc:
            log.error("webhook dispatch failed", error=f"{type(exc).__name__}: {exc}")

    async def _catch_up(self) -> None:
        """The events of the log after the latest one handled (here, else by any child)."""
        try:
            after = self._handled
            if after is None:
                saved = await self._redis.get(WEBHOOKS_CURSOR)
                if saved is None:
                    return  # nothing handled yet, anywhere: start from now
                after = saved.decode() if isinstance(saved, bytes) else saved
            if not await events.log_reaches(self._redis, after):
                log.warning("webhook events missed: the event log no longer reaches back to the last handled",
                            after=after)
            made = 0
            async for _, text in events.log_after(self._redis, self._auth, after, CATCH_UP_PAGE):
                made += await self.on_event(text.encode())
        except (asyncpg.PostgresError, OSError, redis.exceptions.RedisError) as exc:
            log.error("webhook catch-up failed", error=f"{type(exc).__name__}: {exc}")
            return
        if made:
            log.info("webhook deliveries caught up from the event log", deliveries=made)

    async def _handled_up_to(self, event_id: str) -> None:
        self._handled = event_id
        if time.monotonic() - self._cursor_saved_at >= CURSOR_SAVE_SECONDS:
            self._cursor_saved_at = time.monotonic()
            await self._redis.set(WEBHOOKS_CURSOR, event_id)

    async def _active_hooks(self) -> list[dict[str, Any]]:
        # A short cache: a busy platform publishes many events, webhooks change rarely.
        if time.monotonic() - self._hooks_loaded > HOOKS_CACHE_SECONDS:
            self._hooks = await store.active_webhooks(self._pool)
            self._hooks_loaded = time.monotonic()
        return self._hooks

    async def on_event(self, raw: bytes | str) -> int:
        """Record (and enqueue) the deliveries this event calls for; returns how many this call made.
        `raw` is an event as published, its MAC checked (events.open_published, events.log_after)."""
        data = raw.encode() if isinstance(raw, str) else raw
        try:
            event = json.loads(data)
            event_type = str(event["type"])
        except (ValueError, KeyError, TypeError):
            return 0
        if event_type in events.ADMIN_ONLY_EVENTS:
            hooks = []  # never posted to a receiver, whatever its patterns (`*` included)
        else:
            hooks = [h for h in await self._active_hooks() if store.matches(list(h["events"]), event_type)]
        # The event as its publisher made it, without the id Redis gave it: a genuine event someone
        # appends to the log again (under a new id) is the same delivery, not a second one.
        key = store.event_key((events.without_id(data.decode()) or data.decode()).encode())
        made = 0
        for hook in hooks:
            if await record_and_enqueue(self._pool, self._enqueuer, hook["id"], key, event_type, event) is not None:
                made += 1
        if isinstance(event.get("id"), str):
            await self._handled_up_to(event["id"])
        return made

    async def sweep(self) -> int:
        """Re-enqueue pending deliveries whose job is gone from Redis (lost with a flushed or failed
        Redis); returns how many."""
        overdue = await self._pool.fetch(
            """SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at < now() - make_interval(secs => $1)
               ORDER BY next_attempt_at LIMIT 500""", SWEEP_GRACE_SECONDS)
        requeued = 0
        for row in overdue:
            job_id = webhook_delivery_job_id(row["id"])
            if not await self._redis.exists(JOB_PREFIX + job_id):
                await self._enqueuer.enqueue(WEBHOOK_QUEUE, DELIVER_WEBHOOK, [row["id"]], job_id=job_id)
                requeued += 1
        if requeued:
            log.warning("webhook deliveries re-enqueued", count=requeued)
        return requeued

    # -- the job --------------------------------------------------------------------------------------

    def _retry_delay(self, attempts: int) -> float:
        base = self._settings.webhooks.retry_seconds * 2 ** max(0, attempts - 1)
        return float(min(base, MAX_RETRY_DELAY) * self._rng.uniform(0.8, 1.2))

    async def deliver(self, ctx: JobContext, delivery_id: int) -> None:
        delivery = await store.delivery_for_attempt(self._pool, delivery_id)
        if delivery is None:
            return  # delivered, failed for good, or deleted with its webhook
        structlog.contextvars.bind_contextvars(delivery_id=delivery_id, webhook_id=delivery["webhook_id"])
        if not delivery["active"]:
            await store.record_attempt(self._pool, delivery_id, status=WebhookDeliveryStatus.FAILED,
                                       response_status=None, error="webhook disabled", retry_in=None)
            return
        secret = store.open_secret(self._settings.encryption_key, delivery["secret_sealed"])
        payload = delivery["payload"]
        body = json.dumps({"id": str(delivery_id), "type": delivery["event_type"],
                           "data": payload.get("data", {}), "ts": payload.get("ts")},
                          separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "telegram-platform-webhooks/1",
                   "X-TP-Event": delivery["event_type"], "X-TP-Delivery": str(delivery_id),
                   "X-TP-Signature": sign(secret, int(time.time()), body)}
        status, error = await self.attempt(delivery["url"], body, headers)
        attempts = delivery["attempts"] + 1
        if error is None:
            await store.record_attempt(self._pool, delivery_id, status=WebhookDeliveryStatus.DELIVERED,
                                       response_status=status, error=None, retry_in=None)
            log.info("webhook delivered", attempts=attempts, response_status=status)
            return
        if attempts >= self._settings.webhooks.max_attempts:
            await store.record_attempt(self._pool, delivery_id, status=WebhookDeliveryStatus.FAILED,
                                       response_status=status, error=error, retry_in=None)
            log.warning("webhook delivery failed for good", attempts=attempts, error=error)
            return
        delay = self._retry_delay(attempts)
        await store.record_attempt(self._pool, delivery_id, status=WebhookDeliveryStatus.PENDING,
                                   response_status=status, error=error, retry_in=delay)
        raise Retry(delay, f"webhook attempt {attempts} failed: {error}")

    async def attempt(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
        """POST one delivery: the receiver's status (None without an answer) and, unless 2xx, why it
        failed. Only a public address, or one in TP_WEBHOOK_ALLOW_NETWORKS, is connected to
        (worker/webhook_addresses.py); redirects are not followed, and the answer's body is never
        read: what is stored is the status and the reason phrase, sanitised and bounded."""
        allowed = self._settings.webhooks.allow_networks
        try:
            literal = literal_address(URL(url).raw_host or "")
        except ValueError as exc:
            return None, _reason(f"{type(exc).__name__}: {exc}")
        if literal is not None and (refusal := address_refusal(literal, allowed)) is not None:
            return None, _reason(f"refused: {refusal}")  # before any connection
        try:
            async with self._client().post(url, data=body, headers=headers, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return response.status, None
                return response.status, _reason(f"HTTP {response.status} {response.reason or ''}")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return None, _reason(f"refused: {exc.os_error}")
            return None, _reason(f"{type(exc).__name__}: {exc}")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return None, _reason(f"{type(exc).__name__}: {exc}")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            resolver = PublicOnlyResolver(self._settings.webhooks.allow_networks)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
            self._resolver = resolver
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


def _reason(text: str) -> str:
    """What is stored and shown of a failure: printable characters only, at most MAX_ERROR_TEXT."""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_ERROR_TEXT].strip()

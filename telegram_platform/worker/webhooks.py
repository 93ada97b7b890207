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

One slow receiver must not take every worker's slots from the others: at most
`TP_WEBHOOK_CONCURRENCY` deliveries are in flight to one webhook across every worker and host,
counted in Redis as leases that expire (`tp:webhook:slots:<id>`: a worker that dies gives its slot
back within a lease). A job that finds its webhook's slots taken is put back to run a little later,
backing off as it keeps finding them taken: no attempt is counted and no worker slot is held.

A receiver failing for long is paused by its circuit breaker (`TP_WEBHOOK_BREAKER_*`, the state in
its webhooks row, `webhook.paused` published once committed): its deliveries stay pending, held,
with no attempt made, and their jobs end. After the cool-down one probe delivery is tried
(half-open); its success, or an admin's `POST /api/webhooks/{id}/resume`, closes the breaker
(`webhook.resumed`) and the held deliveries are enqueued again (`WebhookService.breakers`).

Events published while no worker listens (all children restarting, Redis reconnecting) are not lost
to pub/sub, which keeps nothing: the children keep the id of the latest event handled in Redis
(`tp:webhooks:cursor`, saved at most every second), and a child that (re)subscribes first reads the
event log (events.py) from there. Events handled twice make one delivery each (the first insert
wins). Only as far back as the log reaches: past it, the gap is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
import uuid
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
from ..queue.job_status import JobStatus
from ..queue.jobs import JOB_PREFIX, Enqueuer
from ..queue.registry import DELIVER_WEBHOOK, WEBHOOK_QUEUE, webhook_delivery_job_id
from ..redis_auth import RedisAuth
from ..redis_keys import WEBHOOKS_CURSOR, webhook_slots
from ..settings import Settings
from ..states import WebhookBreakerState, WebhookDeliveryStatus
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
# A slot's lease outlives the longest attempt (the request's timeout, then recording its outcome):
# a worker that dies holding one gives it back when it expires.
SLOT_LEASE_SECONDS = REQUEST_TIMEOUT + 20.0
# A job that finds its webhook's slots taken runs again after this, doubling each time it finds
# them taken again, up to the cap: a backlog behind a slow receiver costs few wake-ups.
DEFER_FIRST_SECONDS = 0.25
DEFER_MAX_SECONDS = 15.0
DEFERRALS_FIELD = "webhook_deferrals"
# A half-open webhook's probe not heard of within this is given up as lost, and another one tried.
PROBE_WINDOW_SECONDS = REQUEST_TIMEOUT + SLOT_LEASE_SECONDS + 30.0
RELEASE_PAGE = 500
# How often a child looks for breakers to probe and held deliveries to release.
BREAKERS_EVERY_SECONDS = 2.0

# KEYS: the webhook's slots, the job's hash. ARGV: slots, this lease's token, lease ms, deferrals field.
# Takes a slot (1), or counts a deferral in the job's hash (if it has one: no stray hash without a
# TTL) and returns how many it has had, negated.
# Expired leases (their worker died) are dropped first; Redis's clock is every worker's clock.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('HDEL', KEYS[2], ARGV[4])
  return 1
end
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
return -redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
"""


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
        self._take_slot = redis.register_script(_TAKE_SLOT)
        self._breaker = store.Breaker(settings.webhooks.breaker_failures, settings.webhooks.breaker_seconds,
                                      settings.webhooks.breaker_cooldown_seconds)
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
        """Re-enqueue pending deliveries whose job will not run again (lost with a flushed or failed
        Redis, or ended while its webhook was paused); returns how many."""
        overdue = await self._pool.fetch(  # a paused webhook's deliveries are held, not lost
            """SELECT d.id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id
               WHERE d.status = 'pending' AND d.next_attempt_at < now() - make_interval(secs => $1)
                 AND w.breaker_state = 'closed'
               ORDER BY d.next_attempt_at LIMIT 500""", SWEEP_GRACE_SECONDS)
        requeued = await self._enqueue_idle([row["id"] for row in overdue])
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
        webhook_id = delivery["webhook_id"]
        structlog.contextvars.bind_contextvars(delivery_id=delivery_id, webhook_id=webhook_id)
        if not delivery["active"]:
            await store.record_attempt(self._pool, delivery_id, status=WebhookDeliveryStatus.FAILED,
                                       response_status=None, error="webhook disabled", retry_in=None)
            return
        if await self._held(delivery):
            return  # pending, released when the breaker closes
        token = await self._slot(ctx, webhook_id)
        try:
            await self._attempt_delivery(delivery)
        finally:
            with contextlib.suppress(*REDIS_DOWN):
                await self._redis.zrem(webhook_slots(webhook_id), token)

    async def _held(self, delivery: dict[str, Any]) -> bool:
        """Whether the webhook's breaker holds this delivery: paused, or half-open with another
        delivery as its probe."""
        state = delivery["breaker_state"]
        if state == WebhookBreakerState.OPEN:
            return True
        if state == WebhookBreakerState.HALF_OPEN:
            return not await store.claim_probe(self._pool, delivery["webhook_id"], delivery["id"])
        return False

    async def _slot(self, ctx: JobContext, webhook_id: int) -> str:
        """Take one of the webhook's slots (its token, to give back), or put the job back for later."""
        token = uuid.uuid4().hex
        taken = int(await self._take_slot(
            keys=[webhook_slots(webhook_id), JOB_PREFIX + ctx.job_id],
            args=[self._settings.webhooks.concurrency, token, int(SLOT_LEASE_SECONDS * 1000), DEFERRALS_FIELD]))
        if taken < 0:
            delay = min(DEFER_FIRST_SECONDS * 2 ** (-taken - 1), DEFER_MAX_SECONDS) * self._rng.uniform(0.8, 1.2)
            raise Retry(delay, f"webhook {webhook_id} has {self._settings.webhooks.concurrency} deliveries "
                               "in flight: deferred, not attempted")
        return token

    async def _attempt_delivery(self, delivery: dict[str, Any]) -> None:
        delivery_id = delivery["id"]
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
            await self._record(delivery, WebhookDeliveryStatus.DELIVERED, status, None, None)
            log.info("webhook delivered", attempts=attempts, response_status=status)
            return
        if attempts >= self._settings.webhooks.max_attempts:
            await self._record(delivery, WebhookDeliveryStatus.FAILED, status, error, None)
            log.warning("webhook delivery failed for good", attempts=attempts, error=error)
            return
        delay = self._retry_delay(attempts)
        await self._record(delivery, WebhookDeliveryStatus.PENDING, status, error, delay)
        raise Retry(delay, f"webhook attempt {attempts} failed: {error}")

    async def _record(self, delivery: dict[str, Any], status: WebhookDeliveryStatus, response_status: int | None,
                      error: str | None, retry_in: float | None) -> None:
        """The attempt's outcome and the breaker's, committed together; then the breaker's event."""
        changed = await store.record_outcome(self._pool, delivery["id"], delivery["webhook_id"], status=status,
                                             response_status=response_status, error=error, retry_in=retry_in,
                                             breaker=self._breaker)
        if changed is None:
            return
        if changed["transition"] == "paused":
            log.warning("webhook paused: its receiver keeps failing", failures=changed["consecutive_failures"],
                        probe_at=str(changed["paused_until"]))
            await self._publish(events.WEBHOOK_PAUSED, {
                "webhook_id": changed["id"], "consecutive_failures": changed["consecutive_failures"],
                "failing_since": changed["failing_since"], "probe_at": changed["paused_until"]})
        else:
            log.info("webhook resumed: its receiver answered")
            await self._publish(events.WEBHOOK_RESUMED, {"webhook_id": changed["id"], "by": "probe"})

    async def _publish(self, event_type: str, data: dict[str, Any]) -> None:
        try:
            await events.publish(self._redis, self._auth, event_type, data,
                                 log_length=self._settings.events.log_length)
        except REDIS_DOWN as exc:
            # The breaker's state is in PostgreSQL (the API shows it); only the event is lost.
            log.warning("webhook breaker event not published: Redis unreachable", event_type=event_type,
                        error=type(exc).__name__)

    # -- the breakers ---------------------------------------------------------------------------------

    async def breakers(self) -> tuple[int, int]:
        """Probe the paused webhooks whose cool-down is over, and enqueue again the deliveries held
        for webhooks whose breaker closed; returns (probes, deliveries released)."""
        probes = 0
        for webhook_id in await store.probes_due(self._pool, PROBE_WINDOW_SECONDS):
            oldest = await store.pending_ids(self._pool, webhook_id, after_id=0, limit=1)
            probes += await self._enqueue_idle(oldest)
        released = 0
        for webhook_id in await store.take_releases(self._pool):
            after = 0
            while page := await store.pending_ids(self._pool, webhook_id, after_id=after, limit=RELEASE_PAGE):
                released += await self._enqueue_idle(page)
                after = page[-1]
        if released:
            log.info("held webhook deliveries released", count=released)
        return probes, released

    async def _enqueue_idle(self, delivery_ids: list[int]) -> int:
        """Enqueue the deliveries whose job will not run again by itself (gone, finished or failed):
        one queued, scheduled or running already would run the delivery twice."""
        if not delivery_ids:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for delivery_id in delivery_ids:
                pipe.hget(JOB_PREFIX + webhook_delivery_job_id(delivery_id), "status")
            statuses = await pipe.execute()
        idle = [d for d, st in zip(delivery_ids, statuses, strict=True)
                if (st.decode() if isinstance(st, bytes) else st) not in JobStatus.LIVE]
        for delivery_id in idle:
            await self._enqueuer.enqueue(WEBHOOK_QUEUE, DELIVER_WEBHOOK, [delivery_id],
                                         job_id=webhook_delivery_job_id(delivery_id))
        return len(idle)

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

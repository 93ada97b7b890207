"""Access tokens refused as soon as an admin takes their user's rights away, in every API process.

A demotion or disabling increments the user's token version in PostgreSQL (storage/users.py). The
process that made it applies it at once and announces it on Redis (`tp:auth:revocations`). Every API
process listens, and also reads every user's version from the database when it starts, after each
(re)subscription, and every RELOAD_INTERVAL: an announcement lost to a Redis outage is caught up
within that. Applying a version makes `TokenService` forget the verified tokens it covers, so the
per-request path (its cache) checks nothing; only a token not yet verified meets the version check.
The user's WebSockets opened with an older token are closed (1008). An announcement carries a MAC
(redis_auth.py): one without it would let whoever writes to Redis lock a user out of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from .. import events
from ..outages import ANSWERED_UNAVAILABLE, REDIS_DOWN
from ..redis_auth import RedisAuth
from ..redis_keys import AUTH_REVOCATIONS
from ..storage import users
from ..tasks import cancel_and_wait
from .keys import DB, REDIS, REDIS_AUTH, TOKENS
from .security import TokenService
from .ws import HUB, EventHub

log = structlog.get_logger(__name__)

RELOAD_INTERVAL = 30.0
SUBSCRIBE_WAIT = 5.0


class Revocations:
    """This process's view of every user's token version, kept current from Redis and PostgreSQL."""

    def __init__(self, tokens: TokenService, db: asyncpg.Pool, redis: aioredis.Redis, hub: EventHub | None,
                 auth: RedisAuth) -> None:
        self._tokens = tokens
        self._db = db
        self._redis = redis
        self._auth = auth
        self._hub = hub
        self.subscribed = asyncio.Event()

    def apply(self, user_id: int, version: int) -> None:
        if self._tokens.revoke(user_id, version):
            closed = self._hub.close_revoked(user_id, version) if self._hub is not None else 0
            log.info("access tokens revoked", user_id=user_id, token_version=version, websockets_closed=closed)

    async def announce(self, user_id: int, version: int) -> None:
        """After a user's change is committed: here at once, in the other processes within
        milliseconds (or RELOAD_INTERVAL, when Redis cannot take the announcement). A version
        already known here is no news: the change took no rights away."""
        if version <= self._tokens.version_of(user_id):
            return
        self.apply(user_id, version)
        try:
            text = f"{user_id}:{version}"
            await self._redis.publish(AUTH_REVOCATIONS, f"{text}:{self._auth.revocation_mac(text)}")
        except REDIS_DOWN as exc:
            log.warning("token revocation not announced; other processes apply it at their next reload",
                        user_id=user_id, error=type(exc).__name__, reload_interval_s=RELOAD_INTERVAL)

    async def reload(self) -> None:
        """Every version from the database; an outage leaves the versions known so far."""
        try:
            versions = await users.token_versions(self._db)
        except ANSWERED_UNAVAILABLE as exc:
            log.warning("token versions not reloaded", error=type(exc).__name__)
            return
        for user_id, version in versions.items():
            self.apply(user_id, version)

    async def _on_message(self, raw: bytes | str) -> None:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        announced, _, mac = text.rpartition(":")
        user_id, _, version = announced.partition(":")
        if not (user_id.isascii() and user_id.isdigit() and version.isascii() and version.isdigit()):
            log.warning("malformed token revocation ignored", size=len(text))
            return
        if not self._auth.revocation_genuine(announced, mac):
            self._auth.refused("revocation", "a token revocation without a valid MAC was ignored", size=len(text))
            return
        self.apply(int(user_id), int(version))

    async def listen(self) -> None:
        await events.listen(self._redis, self._on_message, listener="token revocation", channel=AUTH_REVOCATIONS,
                            subscribed=self.subscribed, on_subscribed=self.reload)

    async def reload_periodically(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            await self.reload()


REVOCATIONS = web.AppKey("revocations", Revocations)


async def revocations(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context, after the database, Redis and the event hub: the versions are loaded and
    the announcements listened to before the first request, and kept current until the end."""
    state = app[REVOCATIONS] = Revocations(app[TOKENS], app[DB], app[REDIS], app.get(HUB), app[REDIS_AUTH])
    tasks = [asyncio.create_task(state.listen(), name="token-revocations"),
             asyncio.create_task(state.reload_periodically(), name="token-versions-reload")]
    # Subscribed means loaded: the listener reads the versions once subscribed (no announcement
    # can fall between the two).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.subscribed.wait(), SUBSCRIBE_WAIT)
    if not state.subscribed.is_set():  # Redis away: load them here; the periodic reload goes on
        await state.reload()
    yield
    await cancel_and_wait(tasks)

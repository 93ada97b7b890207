"""Which worker processes are alive, as PostgreSQL sees it (not Redis, which may be flushed).

Every worker child holds, for its whole life, a session-level advisory lock keyed by its identity
on a connection of its own. The kernel closes a killed process's sockets and PostgreSQL drops its
locks with them, so "the lock is gone" means "the process is gone" — exactly what deciding the fate
of a message claimed by that process needs. A Redis heartbeat can vanish with a FLUSHALL while its
worker is alive; this cannot.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterable

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..redis_keys import account_lease
from ..storage.db import Queryable

log = structlog.get_logger(__name__)

# pg_advisory_lock(key1, key2): key1 names the platform's worker identities ("tp" in ASCII).
LOCK_CLASS = 0x7470


def identity_key(identity: str) -> int:
    return zlib.crc32(identity.encode()) & 0x7FFFFFFF


class Liveness:
    """Holds this process's lock; reconnects (and re-takes it) if the connection drops."""

    def __init__(self, database_url: str, identity: str) -> None:
        self._url = database_url
        self.identity = identity
        self._conn: asyncpg.Connection | None = None

    async def hold(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        conn = await asyncpg.connect(self._url, server_settings={"application_name": f"tp-worker:{self.identity}"})
        await conn.execute("SELECT pg_advisory_lock($1::int, $2::int)", LOCK_CLASS, identity_key(self.identity))
        self._conn = conn

    async def keep(self, interval: float = 2.0) -> None:
        """Check the connection every `interval` seconds until cancelled."""
        while True:
            try:
                if self._conn is not None:
                    await self._conn.fetchval("SELECT 1")
                await self.hold()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("liveness lock lost, retaking", error=type(exc).__name__)
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close(timeout=2)
            self._conn = None


async def alive(conn: Queryable, identities: Iterable[str]) -> set[str]:
    """The subset of `identities` whose process still holds its lock."""
    wanted = {identity_key(i): i for i in identities}
    if not wanted:
        return set()
    rows = await conn.fetch(
        """SELECT objid::text::bigint AS key FROM pg_locks
           WHERE locktype = 'advisory' AND objsubid = 2 AND granted AND classid = $1::int::oid""",
        LOCK_CLASS)
    held = {r["key"] for r in rows}
    return {identity for key, identity in wanted.items() if key in held}


# KEYS: lease. ARGV: the value seen. Deletes the lease only if nobody changed it meanwhile.
_DROP_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class DeadLeases:
    """Frees account leases whose owner is a worker process that is gone (PostgreSQL says so twice,
    a round apart: a live worker whose connection blipped re-takes its lock within seconds).

    A dead process holds no TDLib database open, so its accounts may be opened at once instead of
    after the lease's TTL: a restarted worker resumes its accounts in seconds."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, *, self_identity: str) -> None:
        self._pool = pool
        self._redis = redis
        self._self = self_identity
        self._suspects: set[str] = set()
        self._drop = redis.register_script(_DROP_IF_UNCHANGED)

    async def sweep(self) -> int:
        keys = [k async for k in self._redis.scan_iter(match=account_lease(0).rsplit(":", 1)[0] + ":*", count=500)]
        if not keys:
            self._suspects.clear()
            return 0
        values = await self._redis.mget(keys)
        held = {k: _text(v) for k, v in zip(keys, values, strict=True) if v}
        owners = {v.split("|", 1)[0] for v in held.values()} - {self._self}
        dead = owners - await alive(self._pool, owners)
        confirmed, self._suspects = dead & self._suspects, dead
        freed = 0
        for key, value in held.items():
            if value.split("|", 1)[0] in confirmed:
                freed += int(await self._drop(keys=[key], args=[value]))
        if freed:
            log.warning("leases of stopped workers freed", count=freed, owners=sorted(confirmed))
        return freed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""The platform's hosts as `GET /api/hosts` and `tp hosts` show them: what PostgreSQL remembers
(storage/hosts.py: state, first and last heartbeat, accounts owned) with what each host's worker
children publish in Redis while they live (their Telegram clients and memory, the stats that
/api/tdlib/health reads, which expire with the process)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from ..redis_keys import TDLIB_STATS_PREFIX
from ..states import HostState
from ..storage import hosts as host_store


async def live_stats(redis: aioredis.Redis) -> dict[str, list[dict[str, Any]]]:
    """The published stats of every live worker child, by the host it names."""
    keys = [key async for key in redis.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=200)]
    by_host: dict[str, list[dict[str, Any]]] = {}
    for raw in await redis.mget(keys) if keys else []:
        if raw:
            stats = json.loads(raw)
            if stats.get("host"):
                by_host.setdefault(str(stats["host"]), []).append(stats)
    return by_host


async def hosts_overview(pool: asyncpg.Pool, redis: aioredis.Redis, *, gone_after: float) -> dict[str, Any]:
    """Every host ever seen, by id, with its live figures (none for a host whose children are gone)."""
    rows = await host_store.list_hosts(pool, gone_after=gone_after)
    live = await live_stats(redis)
    items = []
    for row in rows:
        # A killed child's stats outlive it by their TTL: a host judged gone has no live figures.
        children = live.get(row["id"], []) if row["state"] != HostState.GONE else []
        memory = [c["rss_bytes"] for c in children if isinstance(c.get("rss_bytes"), int)]
        items.append({
            "id": row["id"], "state": row["state"], "accounts_owned": int(row["accounts_owned"]),
            "telegram_clients": sum(int(c.get("client_count", 0)) for c in children),
            "memory_bytes": sum(memory) if memory else None,
            "workers": sorted(str(c.get("worker")) for c in children),
            "first_seen": row["first_seen"], "last_heartbeat": row["last_seen"],
            "heartbeat_age_seconds": round(max(0.0, row["heartbeat_age_seconds"]), 3),
            "draining_since": row["draining_since"],
        })
    return {"items": items, "gone_after_seconds": gone_after}

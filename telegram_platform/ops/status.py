"""What the platform knows about its own health, shared by /api/health/detailed and `tp check`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from ..queue.consumer import WORKER_KEY_PREFIX
from ..queue.jobs import failed_key, queue_key, scheduled_key
from ..settings import QUEUE_NAMES

TDLIB_STATS_PREFIX = "tp:tdlib:stats:"
CHECK_TIMEOUT = 2.0


async def database_status(pool: asyncpg.Pool) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), CHECK_TIMEOUT)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def redis_status(redis: aioredis.Redis) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(redis.ping(), CHECK_TIMEOUT)
    except (OSError, TimeoutError, aioredis.RedisError) as exc:
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def queue_status(redis: aioredis.Redis) -> dict[str, Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for queue in QUEUE_NAMES:
            pipe.llen(queue_key(queue))
            pipe.zcard(scheduled_key(queue))
            pipe.zcard(failed_key(queue))
        counts = await pipe.execute()
    queues = {
        queue: {"depth": counts[i * 3], "scheduled": counts[i * 3 + 1], "failed": counts[i * 3 + 2]}
        for i, queue in enumerate(QUEUE_NAMES)
    }
    workers = [key.decode()[len(WORKER_KEY_PREFIX):]
               async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100)]
    return {"queues": queues, "workers": sorted(workers)}


async def tdlib_status(redis: aioredis.Redis) -> dict[str, Any]:
    """Merge the stats every Telegram host publishes (they expire if the host dies)."""
    keys = [key async for key in redis.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=100)]
    values = await redis.mget(keys) if keys else []
    hosts = [json.loads(v) for v in values if v]
    merged: dict[str, Any] = {"hosts": len(hosts), "clients": {}, "connection": {},
                              "accounts_paused": 0, "receive_loop_lag_seconds": 0.0}
    for host in hosts:
        merged["backend"] = host.get("backend")
        merged["version"] = host.get("version")
        for field in ("clients", "connection"):
            for state, count in host.get(field, {}).items():
                merged[field][state] = merged[field].get(state, 0) + count
        merged["accounts_paused"] += host.get("accounts_paused", 0)
        merged["receive_loop_lag_seconds"] = max(merged["receive_loop_lag_seconds"],
                                                 host.get("receive_loop_lag_seconds", 0.0))
    merged["active_clients"] = sum(merged["clients"].values())
    return merged

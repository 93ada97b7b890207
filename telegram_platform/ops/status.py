"""What the platform knows about its own health, shared by /api/health/detailed and `tp check`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from ..queue.jobs import failed_key, queue_key, scheduled_key
from ..queue.registry import QUEUE_NAMES
from ..queue.routing import host_queues
from ..redis_keys import TDLIB_STATS_PREFIX, WORKER_HEARTBEAT_PREFIX

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
    queues_named = [*QUEUE_NAMES, *await host_queues(redis)]  # and every host's own (queue/routing.py)
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues_named:
            pipe.llen(queue_key(queue))
            pipe.zcard(scheduled_key(queue))
            pipe.zcard(failed_key(queue))
        counts = await pipe.execute()
    queues = {
        queue: {"depth": counts[i * 3], "scheduled": counts[i * 3 + 1], "failed": counts[i * 3 + 2]}
        for i, queue in enumerate(queues_named)
    }
    workers = [key.decode()[len(WORKER_HEARTBEAT_PREFIX):]
               async for key in redis.scan_iter(match=WORKER_HEARTBEAT_PREFIX + "*", count=100)]
    return {"queues": queues, "workers": sorted(workers)}


async def tdlib_status(redis: aioredis.Redis) -> dict[str, Any]:
    """Merge the stats every Telegram host publishes (they expire if the host dies).

    Counts add up over the hosts; the lag is the worst host's; `stalled` when any host's receive
    loop (its event loop, for the emulator) lagged over 0.25 s in the last minute.
    """
    keys = [key async for key in redis.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=100)]
    values = await redis.mget(keys) if keys else []
    hosts = [json.loads(v) for v in values if v]
    merged: dict[str, Any] = {
        "backend": None, "version": None, "hosts": len(hosts), "clients": {}, "connection": {},
        "errors_total": {}, "paused_accounts": [], "peer_flood_accounts": [],
        "receive_loop_lag_seconds": 0.0, "stalled": False,
    }
    summed = ("sessions_total", "requests_total", "pending_requests", "updates_queued", "queue_depth",
              "accounts_hosted", "accounts_paused", "accounts_peer_flood")
    for name in summed:
        merged[name] = 0
    # The sealed size of the hosted accounts' state snapshots (worker/tdstate.py): in all, the largest.
    merged["state_snapshot_bytes"] = 0
    merged["state_snapshot_max_bytes"] = 0
    backends: set[str] = set()
    versions: set[str] = set()
    workers = []
    for host in hosts:
        backends.add(str(host.get("backend")))
        versions.add(str(host.get("version")))
        for field in ("clients", "connection", "errors_total"):
            for state, count in host.get(field, {}).items():
                merged[field][state] = merged[field].get(state, 0) + count
        for name in summed:
            merged[name] += host.get(name, 0)
        merged["paused_accounts"].extend(host.get("paused_accounts", []))
        merged["peer_flood_accounts"].extend(host.get("peer_flood_accounts", []))
        state = host.get("state_snapshots", {})
        merged["state_snapshot_bytes"] += state.get("bytes", 0)
        merged["state_snapshot_max_bytes"] = max(merged["state_snapshot_max_bytes"], state.get("max_bytes", 0))
        lag = host.get("receive_loop_lag_seconds", 0.0)
        merged["receive_loop_lag_seconds"] = max(merged["receive_loop_lag_seconds"], lag)
        merged["stalled"] = merged["stalled"] or bool(host.get("stalled", False))
        workers.append({"worker": host.get("worker"), "backend": host.get("backend"),
                        "client_count": host.get("client_count", 0), "receive_loop_lag_seconds": lag,
                        "stalled": bool(host.get("stalled", False)), "published_at": host.get("published_at"),
                        "state_snapshots": host.get("state_snapshots")})
    # One backend and version in a sound deployment; several (mid-migration) are listed.
    merged["backend"] = next(iter(backends)) if len(backends) == 1 else sorted(backends) or None
    merged["version"] = next(iter(versions)) if len(versions) == 1 else sorted(versions) or None
    merged["active_clients"] = sum(merged["clients"].values())
    merged["workers"] = sorted(workers, key=lambda w: str(w["worker"]))
    return merged

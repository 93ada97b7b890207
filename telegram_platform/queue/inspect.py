"""What operators see of the queues: depths, workers, failed jobs, and requeueing a failed job.

Reads RQ's own keys (`rq:queue:*`, `rq:scheduled:*`, `rq:failed:*`, `rq:job:*`) plus the platform's
per-worker active lists and heartbeats, so it shows exactly what `rq info` and the consumers see.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from rq.utils import utcformat

from ..redis_keys import WORKER_HEARTBEAT_PREFIX, active_jobs
from .jobs import JOB_PREFIX, QUEUES_SET, decode_job_data, failed_key, queue_key, scheduled_key

MAX_EXC_INFO = 4000
_JOB_FIELDS = ("data", "status", "description", "enqueued_at", "ended_at", "exc_info")

# KEYS: failed registry, queue list, job hash, queues set. ARGV: job id, enqueued_at.
# Returns 1 when requeued, 0 when the job is not in the failed registry, -1 when its hash expired.
_REQUEUE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
redis.call('PERSIST', KEYS[3])
redis.call('HDEL', KEYS[3], 'exc_info', 'ended_at', 'started_at', 'worker_name')
redis.call('HSET', KEYS[3], 'status', 'queued', 'enqueued_at', ARGV[2])
redis.call('SADD', KEYS[4], KEYS[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None


async def overview(redis: aioredis.Redis, queues: tuple[str, ...]) -> dict[str, Any]:
    """Per queue: waiting, scheduled, started (taken by a worker, not finished) and failed jobs;
    and every live worker with its heartbeat's remaining life."""
    active: dict[str, list[bytes]] = {queue: [] for queue in queues}
    for queue in queues:
        active[queue] = [key async for key in redis.scan_iter(match=active_jobs(queue, "*"), count=200)]
    worker_keys = sorted([key async for key in redis.scan_iter(match=WORKER_HEARTBEAT_PREFIX + "*", count=200)])
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue_key(queue))
            pipe.zcard(scheduled_key(queue))
            pipe.zcard(failed_key(queue))
            for key in active[queue]:
                pipe.llen(key)
        for key in worker_keys:
            pipe.get(key)
            pipe.ttl(key)
        counts = await pipe.execute()
    result: dict[str, Any] = {}
    i = 0
    for queue in queues:
        depth, scheduled, failed = counts[i:i + 3]
        i += 3
        started = sum(counts[i:i + len(active[queue])])
        i += len(active[queue])
        result[queue] = {"depth": depth, "scheduled": scheduled, "started": started, "failed": failed}
    workers = []
    for key in worker_keys:
        info, ttl = counts[i], counts[i + 1]
        i += 2
        if info is not None:
            workers.append({"name": key.decode()[len(WORKER_HEARTBEAT_PREFIX):], "info": _text(info) or "",
                            "expires_in": max(0, int(ttl))})
    return {"queues": result, "workers": workers}


def _exc_text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        text = zlib.decompress(raw).decode("utf-8", "replace")
    except zlib.error:
        text = raw.decode("utf-8", "replace")
    return text[-MAX_EXC_INFO:]


async def failed_jobs(redis: aioredis.Redis, queue: str, *, offset: int, limit: int) -> tuple[list[dict[str, Any]],
                                                                                               int | None]:
    """Failed jobs, newest first (by their expiry in the registry); returns (jobs, next offset)."""
    entries = cast(list[tuple[bytes, float]],
                   await redis.zrevrange(failed_key(queue), offset, offset + limit, withscores=True))
    page = entries[:limit]
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _ in page:
            pipe.hmget(JOB_PREFIX + job_id.decode(), list(_JOB_FIELDS))
        rows = await pipe.execute()
    jobs = []
    for (job_id, expires_at), values in zip(page, rows, strict=True):
        fields = dict(zip(_JOB_FIELDS, values, strict=True))
        func: str | None = None
        args: list[Any] | None = None
        if fields["data"]:
            try:
                func, args = decode_job_data(fields["data"])
            except (zlib.error, ValueError, TypeError):
                func, args = None, None
        jobs.append({
            "id": job_id.decode(), "queue": queue, "func": func, "args": args,
            "status": _text(fields["status"]), "description": _text(fields["description"]),
            "enqueued_at": _text(fields["enqueued_at"]), "ended_at": _text(fields["ended_at"]),
            "exc_info": _exc_text(fields["exc_info"]), "expires_at": float(expires_at),
        })
    return jobs, (offset + limit if len(entries) > limit else None)


async def requeue_failed(redis: aioredis.Redis, queue: str, job_id: str) -> int:
    """Move a failed job back to the end of its queue (1), or say it is not failed (0) or expired (-1)."""
    script = redis.register_script(_REQUEUE)
    result = await script(keys=[failed_key(queue), queue_key(queue), JOB_PREFIX + job_id, QUEUES_SET],
                          args=[job_id, utcformat(datetime.now(UTC))])
    return int(result)

"""Jobs on Redis in RQ's own format, enqueued from asyncio.

A job is an RQ `Job` (hash `rq:job:<id>`, its id pushed on `rq:queue:<name>`, JSON-serialized so
nothing in Redis is ever unpickled), so `rq info` and RQ's registries see the platform's work.
Enqueueing builds the job with RQ's class and writes it with one pipelined round trip.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from .job_status import JobStatus

QUEUES_SET = "rq:queues"
JOB_PREFIX = "rq:job:"
DEFAULT_TIMEOUT = 180
RESULT_TTL = 300
FAILURE_TTL = 7 * 86_400

# KEYS: the job's hash, its queue, RQ's set of queues. ARGV: the job id, then the hash's fields and
# values. A job that will still run (or runs) is left alone; otherwise it is written anew and queued.
_ENQUEUE_UNLESS_LIVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'scheduled' or status == 'deferred' or status == 'started' then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[3], KEYS[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


def queue_key(queue: str) -> str:
    return f"rq:queue:{queue}"


def scheduled_key(queue: str) -> str:
    return f"rq:scheduled:{queue}"


def failed_key(queue: str) -> str:
    return f"rq:failed:{queue}"


def finished_key(queue: str) -> str:
    return f"rq:finished:{queue}"


class Enqueuer:
    """Writes RQ jobs from asyncio code (the API, the worker's own follow-up jobs)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        # RQ's Job wants a connection object; it is never used for I/O here.
        self._rq_connection = Redis()

    def build(

        self, queue: str, func: str, args: Sequence[Any], *, job_id: str | None = None,
        timeout: int = DEFAULT_TIMEOUT, description: str | None = None,
    ) -> tuple[str, dict[str, bytes | str | int | float]]:
        job = Job.create(
            func, args=list(args), connection=self._rq_connection, serializer=JSONSerializer,
            id=job_id or uuid.uuid4().hex, origin=queue, timeout=timeout, result_ttl=RESULT_TTL,
            failure_ttl=FAILURE_TTL, description=description or func.rsplit(".", 1)[-1],
        )
        mapping = job.to_dict()
        mapping["status"] = JobStatus.QUEUED
        mapping["enqueued_at"] = utcformat(datetime.now(UTC))
        return job.id, {k: v for k, v in mapping.items() if v is not None}

    async def enqueue(
        self, queue: str, func: str, args: Sequence[Any], *, job_id: str | None = None,
        at: float | None = None, timeout: int = DEFAULT_TIMEOUT,
    ) -> str:
        """Enqueue now, or at unix time `at` (RQ's scheduled registry)."""
        jid, mapping = self.build(queue, func, args, job_id=job_id, timeout=timeout)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(QUEUES_SET, queue_key(queue))
            if at is not None and at > time.time():
                mapping["status"] = JobStatus.SCHEDULED
                pipe.hset(JOB_PREFIX + jid, mapping=cast(Any, mapping))
                pipe.zadd(scheduled_key(queue), {jid: at})
            else:
                pipe.hset(JOB_PREFIX + jid, mapping=cast(Any, mapping))
                pipe.rpush(queue_key(queue), jid)
            await pipe.execute()
        return jid

    async def enqueue_unless_live(self, queue: str, func: str, args: Sequence[Any], *, job_id: str,
                                  timeout: int = DEFAULT_TIMEOUT) -> bool:
        """Enqueue the job unless a job of that id is queued, scheduled or running (JobStatus.LIVE),
        in one atomic step: asked again and again (a campaign's fan-out, every round), it is queued
        once, never pushed twice beside itself. True when it was enqueued now."""
        jid, mapping = self.build(queue, func, args, job_id=job_id, timeout=timeout)
        fields = [item for pair in mapping.items() for item in pair]
        done = await self._redis.eval(_ENQUEUE_UNLESS_LIVE, 3, JOB_PREFIX + jid, queue_key(queue), QUEUES_SET,
                                      jid, *fields)
        return bool(done)


def decode_job_data(data: bytes) -> tuple[str, list[Any]]:
    """RQ's `data` field: zlib-compressed (func_name, instance, args, kwargs)."""
    func, _instance, args, _kwargs = JSONSerializer.loads(zlib.decompress(data))  # type: ignore[no-untyped-call]
    return str(func), list(args)

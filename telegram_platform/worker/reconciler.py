"""The outbox reconciler: PostgreSQL owns the messages, Redis only carries work.

Any queued message that is due and has no live job (Redis restarted, keys flushed, a job lost in
flight) gets a new one. Extra jobs are harmless: a send claims its row before it goes out.
"""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..queue.jobs import JOB_PREFIX, Enqueuer
from .jobs import SEND_MESSAGE, message_job_id

log = structlog.get_logger(__name__)

LIVE_STATUSES = {b"queued", b"started", b"scheduled", b"deferred"}
GRACE_SECONDS = 5


async def reconcile_outbox(pool: asyncpg.Pool, redis: aioredis.Redis, *, limit: int = 5000) -> int:
    rows = await pool.fetch(
        """SELECT id FROM messages
           WHERE status = 'queued' AND not_before <= now() - make_interval(secs => $1)
           ORDER BY not_before LIMIT $2""",
        GRACE_SECONDS, limit,
    )
    if not rows:
        return 0
    ids = [row["id"] for row in rows]
    async with redis.pipeline(transaction=False) as pipe:
        for message_id in ids:
            pipe.hget(JOB_PREFIX + message_job_id(message_id), "status")
        statuses = await pipe.execute()
    enqueuer = Enqueuer(redis)
    missing = [mid for mid, status in zip(ids, statuses, strict=True) if status not in LIVE_STATUSES]
    for message_id in missing:
        await enqueuer.enqueue("messages", SEND_MESSAGE, [message_id], job_id=message_job_id(message_id))
    if missing:
        log.warning("outbox reconciled: re-enqueued messages without a live job", count=len(missing))
    return len(missing)

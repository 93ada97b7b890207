"""The reconciler: PostgreSQL owns the messages and campaigns, Redis only carries work.

Any queued message that is due and has no live job (Redis restarted, keys flushed, a job lost in
flight) gets a new one; so does any running campaign none of whose jobs (the shared one, or a
member's on its host queue: worker/campaigns.py) is live, and a scheduled campaign whose time has
come is started. Extra jobs are harmless: a send claims its row before it goes out, and a campaign's
member runs once per process. Campaign messages are not the outbox's: their campaign's members
send them at its accounts' pace.
"""

from __future__ import annotations

from collections.abc import Collection

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..queue.job_status import JobStatus
from ..queue.jobs import JOB_PREFIX, Enqueuer
from ..queue.registry import CAMPAIGNS_QUEUE, RUN_CAMPAIGN, base_queue, campaign_job_id, message_job_id
from ..queue.routing import enqueue_send, host_queues
from ..storage import campaigns as campaign_store
from . import liveness

log = structlog.get_logger(__name__)

# As Redis returns them.
LIVE_STATUSES = frozenset(status.encode() for status in JobStatus.LIVE)
STARTED_STATUS = JobStatus.STARTED.encode()
GRACE_SECONDS = 5


async def _without_live_job(pool: asyncpg.Pool, redis: aioredis.Redis, job_ids: list[str]) -> list[bool]:
    """True for each job that is gone, finished, failed, or started by a worker that is dead (as
    PostgreSQL sees it: worker/liveness.py), so its work is not left waiting for the rescue."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(JOB_PREFIX + job_id, ["status", "worker_name"])
        found = await pipe.execute()
    owners = {w.decode() for status, w in found if status == STARTED_STATUS and w}
    living = await liveness.alive(pool, owners) if owners else set()
    return [status not in LIVE_STATUSES or (status == STARTED_STATUS and (w or b"").decode() not in living)
            for status, w in found]


async def reconcile_outbox(pool: asyncpg.Pool, redis: aioredis.Redis, *, limit: int = 5000) -> int:
    rows = await pool.fetch(
        """SELECT id, account_id FROM messages
           WHERE status = 'queued' AND campaign_id IS NULL
             AND not_before <= now() - make_interval(secs => $1)
           ORDER BY not_before LIMIT $2""",
        GRACE_SECONDS, limit,
    )
    if not rows:
        return 0
    ids = [row["id"] for row in rows]
    lost = await _without_live_job(pool, redis, [message_job_id(i) for i in ids])
    missing = [(row["id"], row["account_id"]) for row, gone in zip(rows, lost, strict=True) if gone]
    enqueuer = Enqueuer(redis)
    for message_id, account_id in missing:  # to the account's owner host (queue/routing.py)
        await enqueue_send(enqueuer, redis, pool, message_id, account_id)
    if missing:
        log.warning("outbox reconciled: re-enqueued messages without a live job", count=len(missing))
    return len(missing)


async def reconcile_campaigns(pool: asyncpg.Pool, redis: aioredis.Redis, *,
                              running_here: Collection[int] = ()) -> int:
    """Start due scheduled campaigns; give every running campaign without a live job a new one (the
    shared job, which fans out to the hosts owning its accounts). A campaign whose member job on
    some host's queue is live is left to it: its runner fans out again every round."""
    started = await campaign_store.start_due(pool)
    if started:
        log.info("scheduled campaigns started", campaign_ids=started)
    ids = [i for i in await campaign_store.running_ids(pool) if i not in running_here]
    if not ids:
        return 0
    queues = [CAMPAIGNS_QUEUE, *(q for q in await host_queues(redis) if base_queue(q) == CAMPAIGNS_QUEUE)]
    lost = await _without_live_job(pool, redis, [campaign_job_id(i, q) for i in ids for q in queues])
    missing = [cid for n, cid in enumerate(ids) if all(lost[n * len(queues):(n + 1) * len(queues)])]
    enqueuer = Enqueuer(redis)
    for campaign_id in missing:
        await enqueuer.enqueue(CAMPAIGNS_QUEUE, RUN_CAMPAIGN, [campaign_id], job_id=campaign_job_id(campaign_id))
    if missing and not set(missing) <= set(started):
        log.warning("campaigns reconciled: enqueued running campaigns without a live job", campaign_ids=missing)
    return len(missing)

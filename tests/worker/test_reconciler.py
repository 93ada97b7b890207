"""The reconciler against the real PostgreSQL and Redis (worker/reconciler.py): a running campaign
gets a new shared job only when none of its jobs, shared or a member's, is live."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from telegram_platform.queue.jobs import JOB_PREFIX, Enqueuer, queue_key
from telegram_platform.queue.registry import CAMPAIGNS_QUEUE, RUN_CAMPAIGN, campaign_job_id, host_queue
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import campaigns as campaign_store
from telegram_platform.worker.reconciler import reconcile_campaigns


async def test_a_campaign_with_a_live_member_job_is_left_to_it(db: asyncpg.Pool, redis: aioredis.Redis) -> None:
    """While a member's job on its host queue is queued, the running campaign gets no shared job;
    once that job finished, the reconciler enqueues the shared one (which fans out again)."""
    account = await account_store.create_account(db, "+9996631301", None)
    campaign, _ = await campaign_store.create_campaign(
        db, name="c", template="hi", account_ids=[account["id"]], schedule_at=None, recipients=[("@one", {})],
        idempotency_key=None, created_by=None)
    await campaign_store.transition(db, campaign["id"], "start")
    member_queue = host_queue(CAMPAIGNS_QUEUE, "host-a")
    member = campaign_job_id(campaign["id"], member_queue)
    assert await Enqueuer(redis).enqueue_unless_live(member_queue, RUN_CAMPAIGN, [campaign["id"]], job_id=member)

    assert await reconcile_campaigns(db, redis) == 0
    assert await redis.llen(queue_key(CAMPAIGNS_QUEUE)) == 0
    await redis.hset(JOB_PREFIX + member, "status", "finished")
    assert await reconcile_campaigns(db, redis) == 1
    assert await redis.lrange(queue_key(CAMPAIGNS_QUEUE), 0, -1) == [campaign_job_id(campaign["id"]).encode()]
    assert await reconcile_campaigns(db, redis) == 0  # the shared job is queued now: live

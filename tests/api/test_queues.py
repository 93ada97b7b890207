"""Queues: depth and failed jobs as the consumers leave them in Redis; a failed job requeued runs again."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from support import ApiClient, eventually

from telegram_platform.queue.consumer import JobContext, QueueConsumer, heartbeat
from telegram_platform.queue.jobs import Enqueuer

FLAKY = "tests.flaky_job"


async def test_failed_job_is_listed_and_requeued(api: ApiClient, admin_token: str, redis: aioredis.Redis) -> None:
    """A job that failed shows in /api/queues and its failed list; requeued, it runs and succeeds."""
    calls: list[int] = []

    async def flaky(ctx: JobContext, n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("first run fails")

    enqueuer = Enqueuer(redis)
    await enqueuer.enqueue("default", FLAKY, [7], job_id="flaky-1")
    await enqueuer.enqueue("messages", FLAKY, [8], job_id="waiting-1")  # nobody consumes messages here
    status, overview = await api.call("GET", "/api/queues", admin_token)
    assert status == 200 and overview["queues"]["messages"]["depth"] == 1

    consumer = QueueConsumer(redis, "default", worker="test-worker", concurrency=1, handlers={FLAKY: flaky})
    await heartbeat(redis, "test-worker")
    task = asyncio.create_task(consumer.run())
    try:
        async def failed_count() -> Any:
            _, body = await api.call("GET", "/api/queues", admin_token)
            return body["queues"]["default"]["failed"] == 1 and body

        overview = await eventually(failed_count)
        assert "test-worker" in {w["name"] for w in overview["workers"]}
        status, page = await api.call("GET", "/api/queues/default/failed", admin_token)
        assert status == 200 and [j["id"] for j in page["items"]] == ["flaky-1"]
        job = page["items"][0]
        assert job["func"] == FLAKY and job["args"] == [7] and "first run fails" in job["exc_info"]

        status, body = await api.call("POST", "/api/queues/default/failed/flaky-1/requeue", admin_token)
        assert status == 202 and body == {"id": "flaky-1", "queue": "default", "status": "queued"}
        await eventually(lambda: asyncio.sleep(0, len(calls) == 2))
        status, page = await api.call("GET", "/api/queues/default/failed", admin_token)
        assert page["items"] == []
        status, body = await api.call("POST", "/api/queues/default/failed/flaky-1/requeue", admin_token)
        assert status == 404 and body["error"]["code"] == "not_found"
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 5)


async def test_unknown_queue_and_bad_job_id_are_named(api: ApiClient, admin_token: str) -> None:
    """An unknown queue or a malformed job id gives 422 naming the path parameter."""
    status, body = await api.call("GET", "/api/queues/nope/failed", admin_token)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "queue"
    status, body = await api.call("POST", "/api/queues/default/failed/bad%20id/requeue", admin_token)
    assert status == 422 and body["error"]["details"]["errors"][0]["field"] == "job_id"

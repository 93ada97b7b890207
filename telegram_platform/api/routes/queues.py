"""Queues: depth, scheduled, started and failed jobs per queue, live workers; failed jobs and requeue.

Requeueing is safe for message sends: a send job only acts on a message still `queued` in the
outbox, so requeueing the job of a message that failed for good sends nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from ...errors import Conflict, NotFound
from ...queue import inspect
from ...queue.job_status import JobStatus
from ...queue.registry import QUEUE_NAMES
from ..endpoints import Api, Call
from ..keys import REDIS
from ..schemas.queues import FailedJobPage, FailedJobQuery, JobId, QueueOverview, RequeuedJob

api = Api()

# The queues the worker consumes, as an enumeration in the OpenAPI document.
QueueName = Literal[QUEUE_NAMES]  # type: ignore[valid-type]


@api.route("GET", "/api/queues", summary="Depth, scheduled, started and failed jobs per queue; live workers",
           response=QueueOverview, tags=("queues",))
async def queues_overview(request: web.Request, call: Call[None, None]) -> Any:
    return await inspect.overview(request.app[REDIS], QUEUE_NAMES)


@api.route("GET", "/api/queues/{queue}/failed", summary="Failed jobs of a queue, newest first",
           query=FailedJobQuery, response=FailedJobPage, tags=("queues",), path_params={"queue": QueueName})
async def list_failed(request: web.Request, call: Call[None, FailedJobQuery]) -> Any:
    jobs, next_cursor = await inspect.failed_jobs(request.app[REDIS], call.path["queue"],
                                                  offset=call.query.cursor, limit=call.query.limit)
    return {"items": jobs, "next_cursor": next_cursor}


@api.route("POST", "/api/queues/{queue}/failed/{job_id}/requeue", summary="Put a failed job back on its queue",
           role="admin", response=RequeuedJob, status=202, tags=("queues",), errors=(404, 409),
           path_params={"queue": QueueName, "job_id": JobId})
async def requeue_failed(request: web.Request, call: Call[None, None]) -> Any:
    queue, job_id = call.path["queue"], call.path["job_id"]
    outcome = await inspect.requeue_failed(request.app[REDIS], queue, job_id)
    if outcome == 0:
        raise NotFound(f"job {job_id!r} is not among the failed jobs of queue {queue!r}")
    if outcome < 0:
        raise Conflict(f"job {job_id!r} expired: its data is gone, so it cannot run again",
                       details={"job_id": job_id})
    return RequeuedJob(id=job_id, queue=queue, status=JobStatus.QUEUED)

"""The job queues as operators see them: depths, workers, failed jobs (`api/routes/queues.py`)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


class QueueStats(msgspec.Struct):
    depth: int
    scheduled: int
    started: int
    failed: int


class QueueWorker(msgspec.Struct):
    name: str
    info: str
    expires_in: int


class QueueOverview(msgspec.Struct):
    queues: dict[str, QueueStats]
    workers: list[QueueWorker]


class FailedJob(msgspec.Struct):
    id: str
    queue: str
    func: str | None
    args: list[Any] | None
    status: str | None
    description: str | None
    enqueued_at: str | None
    ended_at: str | None
    exc_info: str | None
    expires_at: float


class FailedJobQuery(msgspec.Struct, forbid_unknown_fields=True):
    cursor: Annotated[int, msgspec.Meta(ge=0, le=10**9)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class FailedJobPage(msgspec.Struct):
    items: list[FailedJob]
    next_cursor: int | None


class RequeuedJob(msgspec.Struct):
    id: str
    queue: str
    status: str

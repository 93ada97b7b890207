"""The statuses a job's hash (`rq:job:<id>`) holds: RQ's vocabulary, the ones this queue writes or
reads (RQ's `rq.job.JobStatus` is a `str, Enum` mixin, whose `str()` is the member's name; a
`StrEnum` member is its plain value everywhere, Redis included). Lua scripts keep their literals.
A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class JobStatus(StrEnum):
    """A job: queued (or scheduled, or deferred) → started → finished | failed."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    DEFERRED = "deferred"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"

    # The job will still run, or is running (the reconciler leaves its work alone).
    LIVE: ClassVar[frozenset[JobStatus]]


JobStatus.LIVE = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED})

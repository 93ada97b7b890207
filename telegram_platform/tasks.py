"""Stopping background tasks for sure.

A cancellation can be lost: Python 3.11's asyncio.wait_for, which redis-py and asyncpg use while
connecting, drops one that lands just as what it waits for completes (python/cpython#86296, fixed
in 3.12), and redis-py 8 drops one that lands during a read with a socket timeout (redis-py#2028).
The task then runs on, and a shutdown that cancelled and awaited it once hangs until a supervisor
kills the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog

log = structlog.get_logger(__name__)

CANCEL_RETRY = 0.5


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and await them, cancelling again every CANCEL_RETRY seconds while one still
    runs; a task that failed rather than stopped is logged."""
    pending = list(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=CANCEL_RETRY)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", task=task.get_name(), exc_info=task.exception())

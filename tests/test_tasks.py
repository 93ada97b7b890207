"""Stopping background tasks for sure, even when a cancellation is lost."""

from __future__ import annotations

import asyncio

from telegram_platform.tasks import cancel_and_wait


async def test_a_swallowed_cancellation_is_repeated_until_the_task_stops() -> None:
    """A task that loses its first cancellation (as Python 3.11's wait_for can) is still stopped."""
    lost = 0

    async def stubborn() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # swallowed once, like wait_for when its awaitable completed meanwhile

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task]), 5)
    assert task.cancelled() and lost == 1

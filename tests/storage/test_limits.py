"""Per-account sending limits in PostgreSQL: concurrent partial changes."""

from __future__ import annotations

import asyncio

import asyncpg

from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import limits as limits_store


async def test_two_changes_at_once_to_different_fields_both_stay(db: asyncpg.Pool) -> None:
    """PUTs of per_second and of per_day that run together keep both, whichever writes last, and
    each returns the row as stored."""
    account = await account_store.create_account(db, "+9996610101", None)
    for round_number in range(1, 21):
        (first, _), (second, _) = await asyncio.gather(
            limits_store.set_limits(db, account["id"], {"per_second": float(round_number)}),
            limits_store.set_limits(db, account["id"], {"per_day": 1000 + round_number}))
        stored, _, custom = await limits_store.get_limits(db, account["id"])
        assert custom and stored.per_second == round_number and stored.per_day == 1000 + round_number
        assert first.per_second == round_number and second.per_day == 1000 + round_number

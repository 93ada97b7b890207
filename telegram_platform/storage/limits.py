"""Per-account sending limits: what the campaign engine paces each account to.

Telegram publishes no limits for user accounts, so the defaults are conservative: one message a
second (no burst), a second between two messages to one chat, 500 a day, and a new account ramps
from 20 a day to its daily limit over its first 14 days. An operator raises them per account
(`PUT /api/accounts/{id}/limits`) once an account has proven itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import NotFound
from .db import Queryable

_FIELDS = ("per_second", "burst", "per_chat_seconds", "per_day", "warmup_days", "warmup_start_per_day",
           "warmup_from")


@dataclass(frozen=True, slots=True)
class Limits:
    per_second: float = 1.0
    burst: int = 1
    per_chat_seconds: float = 1.0
    per_day: int = 500
    warmup_days: int = 14
    warmup_start_per_day: int = 20
    # The ramp's start; None: when the account was added.
    warmup_from: dt.datetime | None = None

    def daily_cap(self, account_created: dt.datetime, now: dt.datetime) -> int:
        """The day's limit on the warm-up ramp: linear from `warmup_start_per_day` to `per_day`."""
        if self.warmup_days <= 0:
            return self.per_day
        start = self.warmup_from or account_created
        age_days = max(0.0, (now - start).total_seconds() / 86_400)
        if age_days >= self.warmup_days:
            return self.per_day
        low = min(self.warmup_start_per_day, self.per_day)
        return int(low + (self.per_day - low) * age_days / self.warmup_days)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_LIMITS = Limits()


async def get_limits(conn: Queryable, account_id: int) -> tuple[Limits, dt.datetime, bool]:
    """(limits, account created_at, customised) — the defaults when none were set."""
    row = await conn.fetchrow(
        f"""SELECT a.created_at, l.account_id IS NOT NULL AS custom, {', '.join('l.' + f for f in _FIELDS)}
            FROM accounts a LEFT JOIN account_limits l ON l.account_id = a.id WHERE a.id = $1""",
        account_id)
    if row is None:
        raise NotFound(f"account {account_id} not found")
    if not row["custom"]:
        return DEFAULT_LIMITS, row["created_at"], False
    return Limits(**{f: row[f] for f in _FIELDS}), row["created_at"], True


async def get_many_limits(conn: Queryable, account_ids: list[int]) -> dict[int, tuple[Limits, dt.datetime]]:
    """(limits, created_at) of each account of `account_ids` that still exists, in one query."""
    rows = await conn.fetch(
        f"""SELECT a.id, a.created_at, l.account_id IS NOT NULL AS custom, {', '.join('l.' + f for f in _FIELDS)}
            FROM accounts a LEFT JOIN account_limits l ON l.account_id = a.id WHERE a.id = ANY($1::bigint[])""",
        account_ids)
    return {row["id"]: (Limits(**{f: row[f] for f in _FIELDS}) if row["custom"] else DEFAULT_LIMITS,
                        row["created_at"]) for row in rows}


async def set_limits(conn: Queryable, account_id: int, changes: dict[str, Any]) -> tuple[Limits, dt.datetime]:
    """Apply `changes` over the account's current limits (fields left out keep their value). An
    existing row gets only the changed fields, so two changes at once to different fields both stay;
    the limits returned are the row as stored."""
    current, created, _ = await get_limits(conn, account_id)
    limits = replace(current, **changes)
    values = [getattr(limits, f) for f in _FIELDS]
    changed = "".join(f"{f} = EXCLUDED.{f}, " for f in _FIELDS if f in changes)  # names from _FIELDS only
    row = await conn.fetchrow(
        f"""INSERT INTO account_limits (account_id, {', '.join(_FIELDS)})
            VALUES ($1, {', '.join(f'${i + 2}' for i in range(len(_FIELDS)))})
            ON CONFLICT (account_id) DO UPDATE SET {changed}updated_at = now()
            RETURNING {', '.join(_FIELDS)}""",
        account_id, *values)
    return Limits(**dict(row)), created


async def reset_limits(conn: Queryable, account_id: int) -> None:
    await conn.execute("DELETE FROM account_limits WHERE account_id = $1", account_id)


async def sent_since(conn: Queryable, account_id: int, since: dt.datetime) -> list[dt.datetime]:
    """When the account's messages went out since `since` (sent, or claimed and still sending)."""
    rows = await conn.fetch(
        """SELECT sent_at AS at FROM messages WHERE account_id = $1 AND sent_at >= $2
           UNION ALL
           SELECT claimed_at FROM messages WHERE account_id = $1 AND status = 'sending' AND claimed_at >= $2
           ORDER BY 1""",
        account_id, since)
    return [r["at"] for r in rows]

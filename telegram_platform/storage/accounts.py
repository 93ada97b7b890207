"""Telegram accounts as the platform records them (the live session lives in the worker)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from ..errors import Conflict, NotFound
from . import campaigns as campaign_store
from .db import Queryable

ACCOUNT_COLUMNS = (
    "id, phone, auth_state, connection_state, proxy, telegram_user_id, paused_until, "
    "peer_flood_until, last_error, created_at, updated_at"
)


def account_dict(row: asyncpg.Record) -> dict[str, Any]:
    data = dict(row)
    if isinstance(data.get("proxy"), str):
        data["proxy"] = json.loads(data["proxy"])
    return data


async def create_account(conn: Queryable, phone: str, proxy: dict[str, Any] | None) -> dict[str, Any]:
    try:
        row = await conn.fetchrow(
            f"INSERT INTO accounts (phone, proxy) VALUES ($1, $2::jsonb) RETURNING {ACCOUNT_COLUMNS}",
            phone, json.dumps(proxy) if proxy else None,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict("an account with this phone already exists", details={"field": "phone"}) from None
    return account_dict(row)


async def get_account(conn: Queryable, account_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1", account_id)
    if row is None:
        raise NotFound(f"account {account_id} not found")
    return account_dict(row)


async def list_accounts(conn: Queryable) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY id")
    return [account_dict(r) for r in rows]


async def take_ownership(conn: Queryable, account_id: int) -> int:
    """The account's next owner token, for a host that has just taken its lease: from now on the
    state writes of every earlier owner are refused (migration 0006)."""
    token = await conn.fetchval(
        "UPDATE accounts SET owner_token = owner_token + 1 WHERE id = $1 RETURNING owner_token", account_id)
    if token is None:
        raise NotFound(f"account {account_id} not found")
    return int(token)


async def owner_token_of(conn: Queryable, account_id: int) -> int | None:
    """The token of the account's latest owner (None: the account is gone)."""
    token = await conn.fetchval("SELECT owner_token FROM accounts WHERE id = $1", account_id)
    return None if token is None else int(token)


async def set_auth_state(conn: Queryable, account_id: int, state: str, *, owner_token: int,
                         only_from: str | None = None) -> bool:
    """Write the account's auth state as its owner `owner_token` saw it (only over `only_from`, when
    given); False when another host owns the account now."""
    status = await conn.execute(
        """UPDATE accounts SET updated_at = now(),
                  auth_state = CASE WHEN $4::text IS NULL OR auth_state = $4 THEN $2 ELSE auth_state END
           WHERE id = $1 AND owner_token = $3""",
        account_id, state, owner_token, only_from,
    )
    return bool(status != "UPDATE 0")


async def set_connection_state(conn: Queryable, account_id: int, state: str, *, owner_token: int) -> bool:
    """Like `set_auth_state`, for the connection state."""
    status = await conn.execute(
        "UPDATE accounts SET connection_state = $2, updated_at = now() WHERE id = $1 AND owner_token = $3",
        account_id, state, owner_token,
    )
    return bool(status != "UPDATE 0")


async def set_telegram_user_id(conn: Queryable, account_id: int, user_id: int, *, owner_token: int) -> bool:
    """Record the account's Telegram user id as its owner `owner_token` learned it; True when that
    changed what was recorded."""
    status = await conn.execute(
        """UPDATE accounts SET telegram_user_id = $2, updated_at = now()
           WHERE id = $1 AND owner_token = $3 AND telegram_user_id IS DISTINCT FROM $2""",
        account_id, user_id, owner_token,
    )
    return bool(status != "UPDATE 0")


async def set_last_error(conn: Queryable, account_id: int, error: str | None, *, owner_token: int) -> bool:
    """Record why the account's session changed without being asked to (None: it is well again), as
    its owner `owner_token` saw it; True when that changed what was recorded."""
    status = await conn.execute(
        """UPDATE accounts SET last_error = $2, updated_at = now()
           WHERE id = $1 AND owner_token = $3 AND last_error IS DISTINCT FROM $2""",
        account_id, error, owner_token,
    )
    return bool(status != "UPDATE 0")


async def delete_account(pool: asyncpg.Pool, account_id: int) -> None:
    """Remove the account. Its messages stay as the record of what it sent (account_id NULL), so
    its campaigns' progress does not change. What could still go out is settled first: its
    campaign messages go back to their campaigns' other accounts (failed as unknown where only this
    account could re-send them), its other queued messages are cancelled, and a send caught in
    flight is recorded as an unknown outcome. The account's row is locked first: a message being
    assigned to it meanwhile waits, then finds the account gone."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        for row in await conn.fetch("""SELECT DISTINCT campaign_id FROM messages
                                       WHERE account_id = $1 AND status = 'queued' AND campaign_id IS NOT NULL""",
                                    account_id):
            await campaign_store.release_account(conn, row["campaign_id"], account_id)
            await campaign_store.fail_stranded(conn, row["campaign_id"], account_id, "the account was removed")
        await conn.execute(
            """UPDATE messages SET status = 'cancelled', error = 'account removed', updated_at = now()
               WHERE account_id = $1 AND status = 'queued'""", account_id)
        await conn.execute(
            """UPDATE messages SET status = 'failed', error_class = 'unknown', delivery_unknown = true,
                      error = 'outcome unknown: the account was removed during the send', updated_at = now()
               WHERE account_id = $1 AND status = 'sending'""", account_id)
        await conn.execute("DELETE FROM accounts WHERE id = $1", account_id)

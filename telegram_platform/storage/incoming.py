"""Messages received by the platform's accounts: stored once each, listed for the API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from ..telegram.base import IncomingMessage
from .db import Queryable

INCOMING_COLUMNS = "id, account_id, chat_id, telegram_message_id, sender, text, sent_at, received_at"


async def store(conn: Queryable, message: IncomingMessage) -> dict[str, Any] | None:
    """Insert the message and return its row; the row stored before when there is one (Telegram's
    ids are unique per account and chat), so storing again after a retry or a redelivery changes
    nothing. None: the account was deleted meanwhile (asyncpg.ForeignKeyViolationError: before)."""
    key = (message.account_id, message.chat_id, message.telegram_message_id)
    row = await conn.fetchrow(
        f"""INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text, sent_at)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (account_id, chat_id, telegram_message_id) DO NOTHING
            RETURNING {INCOMING_COLUMNS}""",
        *key, message.sender, message.text, datetime.fromtimestamp(message.date, UTC) if message.date else None,
    )
    if row is None:
        row = await conn.fetchrow(
            f"""SELECT {INCOMING_COLUMNS} FROM incoming_messages
                WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id = $3""", *key)
    return dict(row) if row is not None else None


async def list_incoming(
    conn: Queryable, *, account_id: int | None, chat_id: int | None, after_id: int | None,
    cursor: int | None, order: Literal["asc", "desc"], limit: int,
) -> list[dict[str, Any]]:
    """Newest first (`desc`, the cursor an id to go below) or oldest first (`asc`, the cursor an id
    to go above: how a client reads what arrived since the last id it saw)."""
    if order == "asc":
        lower = max(after_id or 0, cursor or 0)
        rows = await conn.fetch(
            f"""SELECT {INCOMING_COLUMNS} FROM incoming_messages
                WHERE ($1::bigint IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR chat_id = $2)
                  AND id > $3
                ORDER BY id LIMIT $4""",
            account_id, chat_id, lower, limit)
    else:
        rows = await conn.fetch(
            f"""SELECT {INCOMING_COLUMNS} FROM incoming_messages
                WHERE ($1::bigint IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR chat_id = $2)
                  AND id > $3 AND ($4::bigint IS NULL OR id < $4)
                ORDER BY id DESC LIMIT $5""",
            account_id, chat_id, after_id or 0, cursor, limit)
    return [dict(r) for r in rows]

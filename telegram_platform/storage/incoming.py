"""Messages received by the platform's accounts: stored once each, listed for the API."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from ..errors import NotFound
from ..telegram.base import IncomingEdited, IncomingMessage, MessagesDeleted, ReadOutbox
from .db import Queryable

INCOMING_COLUMNS = ("id, account_id, chat_id, telegram_message_id, sender, text, sent_at, received_at, entities, "
                    "reply_to, forward_from, kind, media, edited_at, deleted_at, read_at")


def incoming_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored incoming message with its JSON columns decoded (the pool has no jsonb codec)."""
    data = dict(row)
    for name in ("entities", "forward_from", "media"):
        if isinstance(data.get(name), str):
            data[name] = json.loads(data[name])
    return data


async def store(conn: Queryable, message: IncomingMessage) -> dict[str, Any] | None:
    """Insert the message and return its row; the row stored before when there is one (Telegram's
    ids are unique per account and chat), so storing again after a retry or a redelivery changes
    nothing. None: the account was deleted meanwhile (asyncpg.ForeignKeyViolationError: before)."""
    key = (message.account_id, message.chat_id, message.telegram_message_id)
    extra = message.extra_json()
    row = await conn.fetchrow(
        f"""INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text, sent_at,
                                           entities, reply_to, forward_from, kind, media)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9::jsonb, $10, $11::jsonb)
            ON CONFLICT (account_id, chat_id, telegram_message_id) DO NOTHING
            RETURNING {INCOMING_COLUMNS}""",
        *key, message.sender, message.text, datetime.fromtimestamp(message.date, UTC) if message.date else None,
        json.dumps(extra["entities"], ensure_ascii=False), message.reply_to,
        json.dumps(extra["forward_from"]) if message.forward_from is not None else None, message.kind,
        json.dumps(extra["media"]) if message.media is not None else None,
    )
    if row is None:
        row = await conn.fetchrow(
            f"""SELECT {INCOMING_COLUMNS} FROM incoming_messages
                WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id = $3""", *key)
    return incoming_dict(row) if row is not None else None


async def get_incoming(conn: Queryable, incoming_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {INCOMING_COLUMNS} FROM incoming_messages WHERE id = $1", incoming_id)
    if row is None:
        raise NotFound(f"incoming message {incoming_id} not found")
    return incoming_dict(row)


async def mark_read(conn: Queryable, incoming_id: int) -> dict[str, Any]:
    """The account read it at Telegram: when (the first time)."""
    row = await conn.fetchrow(
        f"""UPDATE incoming_messages SET read_at = coalesce(read_at, now()) WHERE id = $1
            RETURNING {INCOMING_COLUMNS}""", incoming_id)
    if row is None:
        raise NotFound(f"incoming message {incoming_id} not found")
    return incoming_dict(row)


async def record_edit(conn: Queryable, edit: IncomingEdited) -> dict[str, Any] | None:
    """The sender edited a message the account received: its new text and entities, and when.
    None when the platform never stored that message (e.g. one the account sent)."""
    row = await conn.fetchrow(
        f"""UPDATE incoming_messages SET text = $4, entities = $5::jsonb, edited_at = $6
            WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id = $3
            RETURNING {INCOMING_COLUMNS}""",
        edit.account_id, edit.chat_id, edit.telegram_message_id, edit.text.text,
        json.dumps(edit.text.entities_json(), ensure_ascii=False), datetime.fromtimestamp(edit.date, UTC))
    return incoming_dict(row) if row is not None else None


async def record_deletion(conn: Queryable, deletion: MessagesDeleted) -> tuple[list[dict[str, Any]], list[int]]:
    """Messages of a chat deleted for the account: the incoming ones and the sent ones are marked
    (deleted_at, first time only). Returns (incoming rows marked, ids of sent messages marked)."""
    ids = list(deletion.telegram_message_ids)
    incoming = await conn.fetch(
        f"""UPDATE incoming_messages SET deleted_at = now()
            WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id = ANY($3::bigint[])
              AND deleted_at IS NULL
            RETURNING {INCOMING_COLUMNS}""",
        deletion.account_id, deletion.chat_id, ids)
    sent = await conn.fetch(
        """UPDATE messages SET deleted_at = now(), updated_at = now()
           WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id = ANY($3::bigint[])
             AND action IN ('send', 'forward') AND deleted_at IS NULL
           RETURNING id""",
        deletion.account_id, deletion.chat_id, ids)
    return [incoming_dict(r) for r in incoming], [r["id"] for r in sent]


async def record_read(conn: Queryable, receipt: ReadOutbox) -> list[dict[str, Any]]:
    """The other side read the account's messages in the chat up to `max_message_id`: each sent
    one up to it becomes `read`. Returns the messages moved (id, account_id, campaign_id)."""
    rows = await conn.fetch(
        """UPDATE messages SET status = 'read', read_at = now(), updated_at = now()
           WHERE account_id = $1 AND chat_id = $2 AND telegram_message_id <= $3 AND status = 'sent'
             AND action IN ('send', 'forward')
           RETURNING id, account_id, campaign_id, action, target_id, telegram_message_id""",
        receipt.account_id, receipt.chat_id, receipt.max_message_id)
    return [incoming_dict(r) for r in rows]


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
    return [incoming_dict(r) for r in rows]

"""The message outbox: every message and its state, claimed atomically before a send."""

from __future__ import annotations

from typing import Any

from ..errors import NotFound
from .db import Queryable

MESSAGE_COLUMNS = (
    "id, account_id, peer, text, status, attempts, error, error_class, telegram_message_id, "
    "idempotency_key, not_before, sent_at, created_at, updated_at"
)


async def create_message(
    conn: Queryable, *, account_id: int, peer: str, text: str, idempotency_key: str | None, created_by: int | None
) -> tuple[dict[str, Any], bool]:
    """Insert a queued message; with a known idempotency key, return the first one instead.

    Returns (message, created).
    """
    row = await conn.fetchrow(
        f"""INSERT INTO messages (account_id, peer, text, idempotency_key, created_by)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {MESSAGE_COLUMNS}""",
        account_id, peer, text, idempotency_key, created_by,
    )
    if row is not None:
        return dict(row), True
    existing = await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE created_by IS NOT DISTINCT FROM $1 AND idempotency_key = $2",
        created_by, idempotency_key,
    )
    assert existing is not None  # the conflict proves it exists
    return dict(existing), False


async def get_message(conn: Queryable, message_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1", message_id)
    if row is None:
        raise NotFound(f"message {message_id} not found")
    return dict(row)


async def list_messages(
    conn: Queryable, *, account_id: int | None, status: str | None, before_id: int | None, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS} FROM messages
            WHERE ($1::bigint IS NULL OR account_id = $1)
              AND ($2::text IS NULL OR status = $2)
              AND ($3::bigint IS NULL OR id < $3)
            ORDER BY id DESC LIMIT $4""",
        account_id, status, before_id, limit,
    )
    return [dict(r) for r in rows]


async def claim_for_send(conn: Queryable, message_id: int, worker: str) -> dict[str, Any] | None:
    """Move a due `queued` message to `sending`; None if it is not ours to send (already claimed,
    sent, cancelled, or not yet due). Only the claimant may go to Telegram."""
    row = await conn.fetchrow(
        f"""UPDATE messages SET status = 'sending', attempts = attempts + 1, claimed_by = $2,
                   claimed_at = now(), updated_at = now()
            WHERE id = $1 AND status = 'queued' AND not_before <= now()
            RETURNING {MESSAGE_COLUMNS}, random_id, campaign_id""",
        message_id, worker,
    )
    return dict(row) if row else None


async def mark_sent(conn: Queryable, message_id: int, telegram_message_id: int) -> None:
    await conn.execute(
        """UPDATE messages SET status = 'sent', telegram_message_id = $2, error = NULL, error_class = NULL,
                  sent_at = now(), updated_at = now()
           WHERE id = $1 AND status = 'sending'""",
        message_id, telegram_message_id,
    )


async def mark_failed(conn: Queryable, message_id: int, error: str, error_class: str) -> None:
    await conn.execute(
        """UPDATE messages SET status = 'failed', error = $2, error_class = $3, updated_at = now()
           WHERE id = $1 AND status = 'sending'""",
        message_id, error, error_class,
    )


async def requeue(conn: Queryable, message_id: int, delay_seconds: float, error: str, error_class: str) -> str | None:
    """Give a claimed message back to the queue, due after `delay_seconds` (retry or flood wait).
    A campaign message whose campaign was cancelled while it was being sent is cancelled instead:
    the cancel only reached the messages queued then, and no runner would send this one. Returns
    the status written (None: the message was not `sending`)."""
    # The campaign's row is share-locked and read as it is after any cancel in progress commits:
    # a cancel that lands during this update is seen.
    status: str | None = await conn.fetchval(
        """WITH campaign AS (SELECT c.status FROM campaigns c JOIN messages m ON m.campaign_id = c.id
                             WHERE m.id = $1 FOR SHARE OF c),
                cancelled AS (SELECT coalesce((SELECT status = 'cancelled' FROM campaign), false) AS yes)
           UPDATE messages SET status = CASE WHEN cancelled.yes THEN 'cancelled' ELSE 'queued' END,
                  not_before = now() + make_interval(secs => $2),
                  error = CASE WHEN cancelled.yes THEN 'campaign cancelled' ELSE $3 END,
                  error_class = $4, claimed_by = NULL, updated_at = now()
           FROM cancelled
           WHERE id = $1 AND status = 'sending' RETURNING messages.status""",
        message_id, delay_seconds, error, error_class,
    )
    return status

"""Outbox records for sends whose outcome is not known (docs/delivery-guarantees.md).

A message is `sending` from its claim until its outcome is recorded. If the worker dies in
between, or Telegram does not answer, it may or may not have reached Telegram; these functions
record that (`delivery_unknown`) and decide what happens next, never a blind re-send.
"""

from __future__ import annotations

from typing import Any

from .db import Queryable


async def requeue_unknown(conn: Queryable, message_id: int, delay_seconds: float, error: str) -> None:
    """Back to queued after an unanswered attempt: it will be re-sent with the same random_id."""
    await conn.execute(
        """UPDATE messages SET status = 'queued', not_before = now() + make_interval(secs => $2),
                  error = $3, error_class = 'unknown', delivery_unknown = true, claimed_by = NULL,
                  updated_at = now()
           WHERE id = $1 AND status = 'sending'""",
        message_id, delay_seconds, error)


async def fail_unknown(conn: Queryable, message_id: int, error: str) -> None:
    """Failed with the outcome unknown: the platform will not try again (it could deliver twice)."""
    await conn.execute(
        """UPDATE messages SET status = 'failed', error = $2, error_class = 'unknown', delivery_unknown = true,
                  updated_at = now()
           WHERE id = $1 AND status = 'sending'""",
        message_id, error)


async def mark_sent_without_id(conn: Queryable, message_id: int) -> None:
    """Telegram refused the re-send as RANDOM_ID_DUPLICATE: the first attempt went through."""
    await conn.execute(
        """UPDATE messages SET status = 'sent', error = NULL, error_class = NULL, sent_at = now(),
                  updated_at = now()
           WHERE id = $1 AND status = 'sending'""",
        message_id)


async def stale_claims(conn: Queryable, older_than_seconds: float, limit: int = 10_000) -> list[dict[str, Any]]:
    """Messages `sending` for longer than `older_than_seconds`, with who claimed them."""
    rows = await conn.fetch(
        """SELECT id, account_id, campaign_id, claimed_by FROM messages
           WHERE status = 'sending' AND claimed_at < now() - make_interval(secs => $1)
           ORDER BY claimed_at LIMIT $2""",
        older_than_seconds, limit)
    return [dict(r) for r in rows]


STOPPED_WORKER = "the worker stopped during the send"
UNRECORDED = "the worker could not record the send's outcome (a database error or a cancellation)"


async def resolve_abandoned(conn: Queryable, ids: list[int], claimants: list[str], *, resend: bool,
                            cause: str = STOPPED_WORKER) -> list[tuple[int, int | None]]:
    """Messages left `sending` by workers that are gone (or whose outcome a live worker could not
    record: `cause`): back to queued for a keyed re-send (`resend`), or failed with the outcome
    unknown. Returns (id, campaign_id) of the messages changed (rows re-checked under the update)."""
    if resend:
        sql = """UPDATE messages SET status = 'queued', not_before = now(), delivery_unknown = true,
                        error = $3 || '; re-sent with the same random_id',
                        error_class = 'unknown', claimed_by = NULL, updated_at = now()
                 WHERE id = ANY($1::bigint[]) AND status = 'sending' AND claimed_by = ANY($2::text[])
                 RETURNING id, campaign_id"""
    else:
        sql = """UPDATE messages SET status = 'failed', delivery_unknown = true, error_class = 'unknown',
                        error = 'outcome unknown: ' || $3 || ', while the message was with TDLib, which '
                                || 're-sends pending messages itself; not retried, to never send twice',
                        updated_at = now()
                 WHERE id = ANY($1::bigint[]) AND status = 'sending' AND claimed_by = ANY($2::text[])
                 RETURNING id, campaign_id"""
    return [(r["id"], r["campaign_id"]) for r in await conn.fetch(sql, ids, claimants, cause)]

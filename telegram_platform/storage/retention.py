"""Deleting what the platform no longer needs: finished rows older than their retention.

Each call deletes one batch in one short statement (its own transaction), taking only rows no one
holds (`FOR UPDATE SKIP LOCKED`): a row a send, a refresh or a delivery has locked is left for a
later round, and no hot path ever waits for the purge. Only what is final goes:

* webhook deliveries delivered or failed (never pending: held and retried ones stay);
* incoming messages (they never change once stored);
* messages sent, failed or cancelled (never queued or sending). A campaign's progress counts its
  messages, so those deleted are added to the campaign's `purged_*` counters in the same statement;
  a campaign recipient's `message_id` becomes NULL (its status stays `assigned`: it is never sent
  again);
* refresh tokens expired longer than the retention, and spent ones whose whole family is spent or
  expired (a spent token of a live family is kept: presented again, it revokes the family).

The indexes these need are migration 0011's.
"""

from __future__ import annotations

from typing import Final

from .db import Queryable

# The tables purged, as the metric's `table` label names them.
WEBHOOK_DELIVERIES: Final = "webhook_deliveries"
INCOMING_MESSAGES: Final = "incoming_messages"
MESSAGES: Final = "messages"
REFRESH_TOKENS: Final = "refresh_tokens"
TABLES: Final = (WEBHOOK_DELIVERIES, INCOMING_MESSAGES, MESSAGES, REFRESH_TOKENS)

# `$1`: the retention in seconds, `$2`: the batch size. Each returns how many rows it deleted.
_PURGE: Final[dict[str, str]] = {
    # `status <> 'pending'` is the partial index's own predicate.
    WEBHOOK_DELIVERIES: """
        WITH gone AS (
            DELETE FROM webhook_deliveries WHERE id IN (
                SELECT id FROM webhook_deliveries
                WHERE status <> 'pending' AND created_at < now() - make_interval(secs => $1::float8)
                LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING 1)
        SELECT count(*) FROM gone""",
    INCOMING_MESSAGES: """
        WITH gone AS (
            DELETE FROM incoming_messages WHERE id IN (
                SELECT id FROM incoming_messages
                WHERE received_at < now() - make_interval(secs => $1::float8)
                LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING 1)
        SELECT count(*) FROM gone""",
    MESSAGES: """
        WITH gone AS (
            DELETE FROM messages WHERE id IN (
                SELECT id FROM messages
                WHERE status IN ('sent', 'read', 'failed', 'cancelled')
                  AND updated_at < now() - make_interval(secs => $1::float8)
                LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING campaign_id, status),
        counted AS (
            UPDATE campaigns c SET purged_sent = purged_sent + g.sent, purged_failed = purged_failed + g.failed,
                                   purged_cancelled = purged_cancelled + g.cancelled
            FROM (SELECT campaign_id, count(*) FILTER (WHERE status IN ('sent', 'read')) AS sent,
                         count(*) FILTER (WHERE status = 'failed') AS failed,
                         count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                  FROM gone WHERE campaign_id IS NOT NULL GROUP BY campaign_id) g
            WHERE c.id = g.campaign_id
            RETURNING 1)
        SELECT count(*) FROM gone""",
    REFRESH_TOKENS: """
        WITH gone AS (
            DELETE FROM refresh_tokens WHERE id IN (
                SELECT t.id FROM refresh_tokens t
                WHERE t.expires_at < now() - make_interval(secs => $1::float8)
                   OR (t.revoked_at < now() - make_interval(secs => $1::float8)
                       AND NOT EXISTS (SELECT 1 FROM refresh_tokens live
                                       WHERE live.family_id = t.family_id AND live.revoked_at IS NULL
                                         AND live.expires_at > now()))
                LIMIT $2 FOR UPDATE SKIP LOCKED)
            RETURNING 1)
        SELECT count(*) FROM gone""",
}


async def purge_batch(conn: Queryable, table: str, retention_seconds: float, batch: int) -> int:
    """Delete up to `batch` final rows of `table` older than the retention; returns how many."""
    return int(await conn.fetchval(_PURGE[table], retention_seconds, batch))

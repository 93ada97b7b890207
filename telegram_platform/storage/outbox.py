"""The message outbox: every message and its state, claimed atomically before a send.

A message's row is the truth (the API reads it); its `message.status` event tells listeners
(WebSocket clients, webhooks) that it changed. Each transition of a claimed message is one call of
`Outbox`, which writes the row and then publishes its event: the row committed first, so an event
never announces a row that was rolled back. A message is `sending` from its claim until its outcome
is recorded; if the worker dies in between, or Telegram does not answer, it may or may not have
reached Telegram: those outcomes are recorded as unknown (`delivery_unknown`), never re-sent blindly
(docs/delivery-guarantees.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import events
from ..batching import Coalescer
from ..errors import NotFound
from ..outages import REDIS_DOWN
from ..redis_auth import RedisAuth
from ..settings import DEFAULT_EVENT_LOG_LENGTH
from ..states import MessageStatus
from ..telegram.base import SentMessage
from .db import Queryable

log = structlog.get_logger(__name__)

MESSAGE_COLUMNS = (
    "id, account_id, peer, text, status, attempts, error, error_class, telegram_message_id, "
    "idempotency_key, not_before, sent_at, created_at, updated_at, entities, options, reply_to, "
    "reply_to_message_id, reply_to_incoming_id, action, target_id, telegram_message_ids, chat_id, "
    "edited_at, deleted_at, read_at"
)
# Returned by the claims: whether the message carries files, so a send without any (most) makes no
# query for them. A message's files are written with it and never change, so this cannot go stale.
_HAS_FILES = "EXISTS (SELECT 1 FROM message_files mf WHERE mf.message_id = messages.id) AS has_files"
# MESSAGE_COLUMNS named as the `messages` table's, for statements that join another table.
_QUALIFIED_COLUMNS = ", ".join("messages." + c.strip() for c in MESSAGE_COLUMNS.split(","))
# Columns stored as JSON text (no codec on the pool): decoded by message_dict.
_JSON_COLUMNS = ("entities", "options")


def message_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """A message row as the platform passes it around: JSON columns decoded, id arrays as lists."""
    data = dict(row)
    for name in _JSON_COLUMNS:
        if isinstance(data.get(name), str):
            data[name] = json.loads(data[name])
    if data.get("telegram_message_ids") is not None:
        data["telegram_message_ids"] = list(data["telegram_message_ids"])
    return data


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What a client asks the outbox for: a send (`action` send), or a forward, edit or deletion of
    the message `target_id`. `entities` are the parsed text's (the Bot API's JSON); `reply_to` is
    Telegram's id of the message replied to, `reply_to_message_id` / `reply_to_incoming_id` the
    platform's."""

    account_id: int
    peer: str
    text: str
    entities: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    reply_to: int | None = None
    reply_to_message_id: int | None = None
    reply_to_incoming_id: int | None = None
    action: str = "send"
    target_id: int | None = None


async def create_message(
    conn: Queryable, *, account_id: int, peer: str, text: str, idempotency_key: str | None, created_by: int | None
) -> tuple[dict[str, Any], bool]:
    """Insert a queued plain text message; see `create`."""
    return await create(conn, NewMessage(account_id, peer, text), idempotency_key=idempotency_key,
                        created_by=created_by)


async def create(conn: Queryable, message: NewMessage, *, idempotency_key: str | None,
                 created_by: int | None) -> tuple[dict[str, Any], bool]:
    """Insert a queued message (or action); with a known idempotency key, return the first one instead.

    Returns (message, created).
    """
    row = await conn.fetchrow(
        f"""INSERT INTO messages (account_id, peer, text, idempotency_key, created_by, entities, options,
                                  reply_to, reply_to_message_id, reply_to_incoming_id, action, target_id)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, $10, $11, $12)
            ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING {MESSAGE_COLUMNS}""",
        message.account_id, message.peer, message.text, idempotency_key, created_by,
        json.dumps(message.entities, ensure_ascii=False), json.dumps(message.options), message.reply_to,
        message.reply_to_message_id, message.reply_to_incoming_id, message.action, message.target_id,
    )
    if row is not None:
        return message_dict(row), True
    existing = await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE created_by IS NOT DISTINCT FROM $1 AND idempotency_key = $2",
        created_by, idempotency_key,
    )
    assert existing is not None  # the conflict proves it exists
    return message_dict(existing), False


async def find_by_key(conn: Queryable, created_by: int | None, idempotency_key: str) -> dict[str, Any] | None:
    """The message a client made with this idempotency key, if any."""
    row = await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE created_by IS NOT DISTINCT FROM $1 AND idempotency_key = $2",
        created_by, idempotency_key)
    return message_dict(row) if row is not None else None


async def get_message(conn: Queryable, message_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1", message_id)
    if row is None:
        raise NotFound(f"message {message_id} not found")
    return message_dict(row)


async def cancel(conn: Queryable, message_id: int) -> dict[str, Any] | None:
    """queued -> cancelled; the cancelled row, or None when the message is not queued (any more)."""
    row = await conn.fetchrow(
        f"""UPDATE messages SET status = 'cancelled', error = 'cancelled by a client', claimed_by = NULL,
                   updated_at = now()
            WHERE id = $1 AND status = 'queued' RETURNING {MESSAGE_COLUMNS}, campaign_id""",
        message_id)
    return message_dict(row) if row is not None else None


async def list_messages(
    conn: Queryable, *, account_id: int | None, status: str | None, before_id: int | None, limit: int,
    action: str | None = None,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS} FROM messages
            WHERE ($1::bigint IS NULL OR account_id = $1)
              AND ($2::text IS NULL OR status = $2)
              AND ($3::bigint IS NULL OR id < $3)
              AND ($5::text IS NULL OR action = $5)
            ORDER BY id DESC LIMIT $4""",
        account_id, status, before_id, limit, action,
    )
    return [message_dict(r) for r in rows]


async def claim_for_send(conn: Queryable, message_id: int, worker: str) -> dict[str, Any] | None:
    """Move a due `queued` message to `sending`; None if it is not ours to send (already claimed,
    sent, cancelled, or not yet due). Only the claimant may go to Telegram."""
    row = await conn.fetchrow(
        f"""UPDATE messages SET status = 'sending', attempts = attempts + 1, claimed_by = $2,
                   claimed_at = now(), updated_at = now()
            WHERE id = $1 AND status = 'queued' AND not_before <= now()
            RETURNING {MESSAGE_COLUMNS}, random_id, campaign_id, {_HAS_FILES}""",
        message_id, worker,
    )
    return message_dict(row) if row else None


async def stale_claims(conn: Queryable, older_than_seconds: float, limit: int = 10_000) -> list[dict[str, Any]]:
    """Messages `sending` for longer than `older_than_seconds`, with who claimed them."""
    rows = await conn.fetch(
        """SELECT id, account_id, campaign_id, claimed_by FROM messages
           WHERE status = 'sending' AND claimed_at < now() - make_interval(secs => $1)
           ORDER BY claimed_at LIMIT $2""",
        older_than_seconds, limit)
    return [dict(r) for r in rows]


# `sent` outcomes one statement records at most, and campaign claims one statement makes at most;
# the rest go in the next.
RECORD_BATCH_MAX = 500
CLAIM_BATCH_MAX = 500

STOPPED_WORKER = "the worker stopped during the send"
UNRECORDED = "the worker could not record the send's outcome (a database error or a cancellation)"
# Redis unreachable: the row stands, its event is lost.


@dataclass(frozen=True, slots=True)
class _CampaignClaim:
    message_id: int
    worker: str
    key: str  # the recipient's peer key (storage/optouts.py), checked against the opt-outs


@dataclass(frozen=True, slots=True)
class _SentRecord:
    message_id: int
    telegram_message_id: int
    telegram_message_ids: list[int]
    chat_id: int | None


class Outbox:
    """The transitions of a claimed (`sending`) message, each writing the row, then publishing its
    `message.status` event. `row` is the claimed message (id, account_id, campaign_id).

    `count_failure` is told the error class of each send recorded `failed` (the worker's metrics),
    between the write and the event. Abandoned sends settled by `settle_abandoned` are not counted
    there: no send of this process failed."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth, *,
                 log_length: int = DEFAULT_EVENT_LOG_LENGTH,
                 count_failure: Callable[[str], None] | None = None,
                 publisher: events.Publisher | None = None) -> None:
        self.pool = pool
        self._redis = redis
        self._auth = auth
        self._log_length = log_length
        self._count_failure = count_failure
        # The events of concurrent sends go to Redis together (events.Publisher); the worker shares
        # its sessions' publisher here.
        self._events = publisher or events.Publisher(redis, auth, log_length=log_length)
        # Concurrent sends' claims and `sent` outcomes, each batch in one statement (batching.py).
        self._claims: Coalescer[_CampaignClaim, dict[str, Any] | None] = Coalescer(
            self._claim_batch, max_batch=CLAIM_BATCH_MAX, name="outbox-claims")
        self._sent: Coalescer[_SentRecord, bool] = Coalescer(self._record_sent, max_batch=RECORD_BATCH_MAX,
                                                             name="outbox-sent")

    @property
    def record_calls(self) -> int:
        """Statements `mark_sent` made (what a test or a benchmark reads)."""
        return self._sent.calls

    @property
    def claim_calls(self) -> int:
        """Statements `claim_for_campaign` made (what a test or a benchmark reads)."""
        return self._claims.calls

    async def claim_for_campaign(self, message_id: int, worker: str, key: str) -> dict[str, Any] | None:
        """queued -> sending for a campaign's send, unless the peer (`key`) opted out meanwhile: then
        cancelled, and that transition's event published here. Returns the claimed row to send, or
        None when there is nothing to send (opted out, cancelled, or taken care of elsewhere). The
        claims of concurrent sends go in one statement."""
        claimed = await self._claims.submit(_CampaignClaim(message_id, worker, key))
        if claimed is None:
            return None
        if claimed["status"] == MessageStatus.CANCELLED:
            await self.publish_status(claimed, MessageStatus.CANCELLED, "opted out")
            return None
        return claimed

    async def _claim_batch(self, batch: list[_CampaignClaim]) -> list[dict[str, Any] | None]:
        """One statement for the claims handed over together; each row is claimed only while
        `queued` and due. A message asked for twice in one batch is claimed for the first caller."""
        ordered = sorted(batch, key=lambda c: c.message_id)  # rows locked in id order, as `sent` records
        rows = await self.pool.fetch(
            f"""UPDATE messages SET
                    status = CASE WHEN o.peer_key IS NULL THEN 'sending' ELSE 'cancelled' END,
                    error = CASE WHEN o.peer_key IS NULL THEN error ELSE 'opted out' END,
                    attempts = attempts + CASE WHEN o.peer_key IS NULL THEN 1 ELSE 0 END,
                    claimed_by = x.worker, claimed_at = now(), updated_at = now()
                FROM unnest($1::bigint[], $2::text[], $3::text[]) AS x(id, worker, key)
                     LEFT JOIN optouts o ON o.peer_key = x.key
                WHERE messages.id = x.id AND messages.status = 'queued' AND messages.not_before <= now()
                RETURNING {_QUALIFIED_COLUMNS},
                          messages.random_id, messages.campaign_id, messages.recipient_id, {_HAS_FILES}""",
            [c.message_id for c in ordered], [c.worker for c in ordered], [c.key for c in ordered])
        claimed = {row["id"]: message_dict(row) for row in rows}
        return [claimed.pop(c.message_id, None) for c in batch]

    async def mark_sent(self, row: dict[str, Any], telegram_message_id: int, *,
                        telegram_message_ids: list[int] | None = None, chat_id: int | None = None) -> None:
        """Telegram confirmed the send (or the forward, edit or deletion): the ids it made or acted
        on, and the chat (which read receipts name). The outcomes of concurrent sends are written in
        one statement."""
        ids = telegram_message_ids or [telegram_message_id]
        if not await self._sent.submit(_SentRecord(row["id"], telegram_message_id, ids, chat_id)):
            # No longer `sending` (settled as abandoned meanwhile): nothing was written, so no event.
            log.warning("send not recorded: the message is no longer claimed", message_id=row["id"])
            return
        await self.publish_status(row, MessageStatus.SENT, telegram_message_id=telegram_message_id)

    async def _record_sent(self, batch: list[_SentRecord]) -> list[bool]:
        """The `sent` outcomes handed over together, in one statement: one round trip and one commit
        for many concurrent sends. Each row is still written only while `sending`; each caller
        learns whether its row was."""
        ordered = sorted(batch, key=lambda r: r.message_id)  # rows locked in id order: no deadlock between batches
        written = {r["id"] for r in await self.pool.fetch(
            """UPDATE messages m SET status = 'sent', telegram_message_id = x.tid,
                      telegram_message_ids = string_to_array(x.ids, ',')::bigint[],
                      chat_id = coalesce(x.chat, m.chat_id), error = NULL, error_class = NULL,
                      sent_at = now(), updated_at = now()
               FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[]) AS x(id, tid, ids, chat)
               WHERE m.id = x.id AND m.status = 'sending' RETURNING m.id""",
            [r.message_id for r in ordered], [r.telegram_message_id for r in ordered],
            [",".join(map(str, r.telegram_message_ids)) for r in ordered], [r.chat_id for r in ordered])}
        return [r.message_id in written for r in batch]

    async def mark_action_done(self, row: dict[str, Any], done: SentMessage | None) -> None:
        """A forward, edit or deletion Telegram confirmed: the action's row records the Telegram ids
        it made (a forward) or acted on, and in the same transaction the message acted on takes the
        change (an edit's text and entities, a deletion's time); then the action's event."""
        ids = list(done.telegram_message_ids) if done is not None else None
        async with self.pool.acquire() as conn, conn.transaction():
            updated = await conn.fetchrow(
                """UPDATE messages SET status = 'sent', telegram_message_id = coalesce($2, telegram_message_id),
                          telegram_message_ids = coalesce($3, telegram_message_ids), chat_id = coalesce($4, chat_id),
                          error = NULL, error_class = NULL, sent_at = now(), updated_at = now()
                   WHERE id = $1 AND status = 'sending' RETURNING action, target_id, text, entities, options""",
                row["id"], ids[0] if ids else None, ids, done.chat_id if done is not None and done.chat_id else None)
            if updated is not None and updated["action"] == "edit":
                await conn.execute(
                    """UPDATE messages SET text = $2, entities = $3::jsonb, edited_at = now(), updated_at = now()
                       WHERE id = $1""",
                    updated["target_id"], updated["text"], updated["entities"])
            elif updated is not None and updated["action"] == "delete":
                await conn.execute(
                    "UPDATE messages SET deleted_at = now(), updated_at = now() WHERE id = $1 AND deleted_at IS NULL",
                    updated["target_id"])
        await self.publish_status(row, MessageStatus.SENT, telegram_message_id=ids[0] if ids else None)

    async def mark_sent_without_id(self, row: dict[str, Any]) -> None:
        """Telegram refused the re-send as RANDOM_ID_DUPLICATE: the first attempt went through."""
        await self.pool.execute(
            """UPDATE messages SET status = 'sent', error = NULL, error_class = NULL, sent_at = now(),
                      updated_at = now()
               WHERE id = $1 AND status = 'sending'""",
            row["id"])
        await self.publish_status(row, MessageStatus.SENT)

    async def mark_failed(self, row: dict[str, Any], error: str, error_class: str) -> None:
        """Failed for good: Telegram refused it, or its attempts ran out."""
        await self.pool.execute(
            """UPDATE messages SET status = 'failed', error = $2, error_class = $3, updated_at = now()
               WHERE id = $1 AND status = 'sending'""",
            row["id"], error, error_class,
        )
        if self._count_failure is not None:
            self._count_failure(error_class)
        await self.publish_status(row, MessageStatus.FAILED, error)

    async def fail_unknown(self, row: dict[str, Any], reason: str) -> None:
        """Failed with the outcome unknown: the platform will not try again (it could deliver twice)."""
        await self.pool.execute(
            """UPDATE messages SET status = 'failed', error = $2, error_class = 'unknown', delivery_unknown = true,
                      updated_at = now()
               WHERE id = $1 AND status = 'sending'""",
            row["id"], f"outcome unknown: {reason}")
        if self._count_failure is not None:
            self._count_failure("unknown")
        await self.publish_status(row, MessageStatus.FAILED, reason)

    async def requeue(self, row: dict[str, Any], delay_seconds: float, error: str,
                      error_class: str) -> MessageStatus | None:
        """Give a claimed message back to the queue, due after `delay_seconds` (retry or flood wait).
        A campaign message whose campaign was cancelled while it was being sent is cancelled instead:
        the cancel only reached the messages queued then, and no runner would send this one. Returns
        the status written (None: the message was not `sending`)."""
        # The campaign's row is share-locked and read as it is after any cancel in progress commits:
        # a cancel that lands during this update is seen.
        written: str | None = await self.pool.fetchval(
            """WITH campaign AS (SELECT c.status FROM campaigns c JOIN messages m ON m.campaign_id = c.id
                                 WHERE m.id = $1 FOR SHARE OF c),
                    cancelled AS (SELECT coalesce((SELECT status = 'cancelled' FROM campaign), false) AS yes)
               UPDATE messages SET status = CASE WHEN cancelled.yes THEN 'cancelled' ELSE 'queued' END,
                      not_before = now() + make_interval(secs => $2),
                      error = CASE WHEN cancelled.yes THEN 'campaign cancelled' ELSE $3 END,
                      error_class = $4, claimed_by = NULL, updated_at = now()
               FROM cancelled
               WHERE id = $1 AND status = 'sending' RETURNING messages.status""",
            row["id"], delay_seconds, error, error_class,
        )
        status = None if written is None else MessageStatus(written)
        if status == MessageStatus.CANCELLED:
            await self.publish_status(row, MessageStatus.CANCELLED, "campaign cancelled")
        else:
            await self.publish_status(row, MessageStatus.QUEUED, error)
        return status

    async def requeue_unknown(self, row: dict[str, Any], delay_seconds: float, reason: str) -> None:
        """Back to queued after an unanswered attempt: it will be re-sent with the same random_id."""
        await self.pool.execute(
            """UPDATE messages SET status = 'queued', not_before = now() + make_interval(secs => $2),
                      error = $3, error_class = 'unknown', delivery_unknown = true, claimed_by = NULL,
                      updated_at = now()
               WHERE id = $1 AND status = 'sending'""",
            row["id"], delay_seconds, f"outcome unknown: {reason}")
        await self.publish_status(row, MessageStatus.QUEUED, reason)

    async def settle_abandoned(self, ids: list[int], claimants: list[str], *, resend: bool,
                               cause: str = STOPPED_WORKER) -> list[tuple[int, int | None]]:
        """Messages left `sending` by workers that are gone (or whose outcome a live worker could not
        record: `cause`): back to queued for a re-send with the same random_id (`resend`), or failed
        with the outcome unknown; each changed message's event follows. Returns (id, campaign_id) of
        the messages changed (rows re-checked under the update)."""
        if resend:
            sql = """UPDATE messages SET status = 'queued', not_before = now(), delivery_unknown = true,
                            error = $3 || '; re-sent with the same random_id',
                            error_class = 'unknown', claimed_by = NULL, updated_at = now()
                     WHERE id = ANY($1::bigint[]) AND status = 'sending' AND claimed_by = ANY($2::text[])
                     RETURNING id, account_id, campaign_id, status, error"""
        else:
            sql = """UPDATE messages SET status = 'failed', delivery_unknown = true, error_class = 'unknown',
                            error = 'outcome unknown: ' || $3 || ', while the message was with TDLib, which '
                                    || 're-sends pending messages itself; not retried, to never send twice',
                            updated_at = now()
                     WHERE id = ANY($1::bigint[]) AND status = 'sending' AND claimed_by = ANY($2::text[])
                     RETURNING id, account_id, campaign_id, status, error"""
        changed = [dict(r) for r in await self.pool.fetch(sql, ids, claimants, cause)]
        for row in changed:
            await self.publish_status(row, MessageStatus(row["status"]), row["error"])
        return [(row["id"], row["campaign_id"]) for row in changed]

    async def publish_status(self, row: dict[str, Any], status: MessageStatus, error: str | None = None, *,
                             telegram_message_id: int | None = None) -> None:
        """The message's `message.status` event: `status` as just written (or, for `sending`, the
        claim as its account opens). Called alone only for a row written elsewhere."""
        message_id = row["id"]
        data: dict[str, Any] = {"message_id": message_id, "status": status, "account_id": row["account_id"]}
        if row.get("campaign_id") is not None:
            data["campaign_id"] = row["campaign_id"]
        if row.get("action", "send") != "send":
            data["action"] = row["action"]
            data["target_id"] = row.get("target_id")
        if error:
            data["error"] = error
        if telegram_message_id is not None:
            data["telegram_message_id"] = telegram_message_id
        try:
            await self._events.publish("message.status", data)
        except REDIS_DOWN as exc:
            # The message's state is in PostgreSQL (the API reads it there); a send must not stop,
            # or be left half-recorded, because Redis is away. The event itself is lost.
            log.warning("message.status event not published: Redis unreachable", message_id=message_id,
                        status=status, error=type(exc).__name__)

"""Incoming messages: from an account's session to PostgreSQL and the event stream, through the
`updates` queue.

Telegram (and TDLib) deliver an update once: a process that fails to store it has lost it. So the
Telegram host only enqueues it, one Redis round trip after which the message is safe, and the
`updates` queue's consumer stores it and publishes `message.incoming`, retried for as long as
PostgreSQL or Redis is away. The job id names the message, and storing is idempotent (Telegram's
ids are unique per account and chat), so a retried or redelivered update is stored once. With Redis
away when a message arrives, the host stores it directly instead, and with PostgreSQL away too it
writes it to a spool file on this machine's disk, handed to the queue once either is back
(worker/spool.py).

Telegram's service notifications, messages from the service account 777000 (login codes, new-login
notices), are never stored or published as incoming messages: anyone allowed to read those could
start a login of the account's phone elsewhere and read its code. They become one
`account.service_notification` event, for admins alone (events.ADMIN_ONLY_EVENTS), with every code
masked, and a log line without the text.

Edits, deletions and read receipts (`MessageChange`) take the same queue, behind the messages they
change, and publish `message.edited`, `message.deleted` and `message.status` (`read`).

Order: a child runs one `updates` job at a time unless TP_QUEUE_CONCURRENCY_UPDATES says otherwise,
so messages are stored, and numbered, in the order they arrived, and a change finds its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import events
from ..outages import REDIS_DOWN, SERVICES_DOWN
from ..queue.consumer import JobContext, Retry
from ..queue.jobs import Enqueuer
from ..queue.registry import APPLY_MESSAGE_CHANGE, STORE_INCOMING, UPDATES_QUEUE, incoming_job_id
from ..redis_auth import RedisAuth
from ..settings import DEFAULT_EVENT_LOG_LENGTH
from ..states import MessageStatus
from ..storage import incoming as incoming_store
from ..storage.outbox import Outbox
from ..telegram.base import (
    IncomingEdited,
    IncomingMessage,
    MessageChange,
    MessagesDeleted,
    change_from_json,
    change_to_json,
)
from .spool import IncomingSpool

log = structlog.get_logger(__name__)

# A store that failed is retried after about a tenth of the message's age, within these bounds: a
# short outage is caught up at once, a long one costs few attempts. Past GIVE_UP_AFTER the job fails
# (RQ's failed registry), for an operator to requeue (POST /api/queues/updates/failed/{id}/requeue).
MIN_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 60.0
GIVE_UP_AFTER = 7 * 86_400
# An update waits in memory at most this long for Redis or PostgreSQL to take it (a service that
# stops answering rather than refusing), then goes to the spool: memory is lost in a crash.
HAND_OVER_TIMEOUT = 15.0

# Telegram's service account (TDLib: `sender_id.user_id`; its private chat has the same id).
SERVICE_ACCOUNT = 777000
# What a code may look like in a service notification: four or more digits, maybe spaced or dashed.
_CODE = re.compile(r"\d(?:[\s.\-]?\d){3,}")
CODE_MASK = "•••••"



def is_service_notification(message: IncomingMessage) -> bool:
    """From Telegram's service account: login codes and security notices, never ordinary messages."""
    return message.sender.strip() == str(SERVICE_ACCOUNT) or message.chat_id == SERVICE_ACCOUNT


def mask_codes(text: str) -> str:
    """The text with every run of four or more digits (a code, spaced or not) masked."""
    return _CODE.sub(CODE_MASK, text)


def retry_delay(age_seconds: float) -> float:
    return min(MAX_RETRY_DELAY, max(MIN_RETRY_DELAY, age_seconds / 10))


class IncomingUpdates:
    """One per worker child: `accept` for the Telegram host, `store_incoming` for the queue."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth, *,
                 spool: IncomingSpool | None = None, log_length: int = DEFAULT_EVENT_LOG_LENGTH) -> None:
        self._pool = pool
        self._redis = redis
        self._auth = auth
        self._spool = spool
        self._log_length = log_length
        self._enqueuer = Enqueuer(redis)
        self._outbox = Outbox(pool, redis, auth, log_length=log_length)

    async def accept(self, message: IncomingMessage) -> None:
        """Hand the message to the `updates` queue; with Redis away, store it here and now; with
        PostgreSQL away too, spool it to disk (without a spool, the database's error is raised).
        A service notification is published at once and kept nowhere (never in the spool)."""
        if is_service_notification(message):
            try:
                async with asyncio.timeout(HAND_OVER_TIMEOUT):
                    await self._notify_service(message)
            except SERVICES_DOWN as exc:  # TimeoutError included
                log.warning("service notification dropped: Redis unreachable", account_id=message.account_id,
                            error=type(exc).__name__)
            return
        if self._spool is not None and self._spool.backlog:
            # Behind the messages already spooled: in order, and without waiting on services that
            # were away a moment ago (the drain finds out when they are back).
            await asyncio.to_thread(self._spool.append, message)
            return
        try:
            await self._hand_over(message)
        except SERVICES_DOWN as exc:  # TimeoutError included
            if self._spool is None:
                raise
            await asyncio.to_thread(self._spool.append, message)  # an fsync: off the event loop
            log.warning("Redis and PostgreSQL unreachable: incoming message spooled to disk",
                        account_id=message.account_id, error=type(exc).__name__)

    async def drain_spool(self) -> int:
        """Hand over the spooled messages (periodically, in each worker child); how many went."""
        if self._spool is None:
            return 0

        async def hand_over(message: IncomingMessage) -> bool:
            try:
                await self._hand_over(message)
            except SERVICES_DOWN:
                return False
            return True

        return await self._spool.drain(hand_over)

    async def _hand_over(self, message: IncomingMessage) -> None:
        """To the `updates` queue, else stored directly; within HAND_OVER_TIMEOUT (TimeoutError)."""
        async with asyncio.timeout(HAND_OVER_TIMEOUT):
            await self._queue_or_store(message)

    async def _queue_or_store(self, message: IncomingMessage) -> None:
        if is_service_notification(message):  # one spooled before this check existed
            await self._notify_service(message)
            return
        try:
            args = _job_args(message)
            await self._enqueuer.enqueue(UPDATES_QUEUE, STORE_INCOMING, [*args, self._auth.job_mac(args)],
                                         job_id=incoming_job_id(message.account_id, message.chat_id,
                                                                 message.telegram_message_id))
        except REDIS_DOWN as exc:
            log.warning("updates queue unreachable, storing the incoming message directly",
                        account_id=message.account_id, error=type(exc).__name__)
            row = await self._store(message)
            if row is not None:
                # Stored: a client that misses the event reads the message with GET /api/incoming.
                with contextlib.suppress(*REDIS_DOWN):
                    await self._publish(row)

    async def store_incoming(self, ctx: JobContext, account_id: int, chat_id: int, telegram_message_id: int,
                             sender: str, text: str, date: int, extra: dict[str, Any] | None = None,
                             mac: str = "") -> None:
        """The job: store the message and publish it; retried while a backing service is away. Its
        arguments carry a MAC: a job someone else put in Redis would store a message Telegram never
        sent, and the platform would sign it to webhooks; such a job is refused (logged, counted)."""
        args = [account_id, chat_id, telegram_message_id, sender, text, date, extra]
        if not self._auth.job_genuine(args, mac):
            self._auth.refused("job", "an incoming-message job without a valid MAC was dropped",
                               account_id=account_id)
            return
        message = IncomingMessage(account_id, chat_id, telegram_message_id, sender, text, date).with_extra(extra)
        try:
            await self.store(message)
        except SERVICES_DOWN as exc:
            age = time.time() - date if date else 0.0
            if age > GIVE_UP_AFTER:
                raise
            raise Retry(retry_delay(age), f"incoming message not stored yet: {type(exc).__name__}") from exc

    async def store(self, message: IncomingMessage) -> None:
        """Store once, publish every time: a store retried after its publish failed publishes then
        (events are at-least-once here; the row's id, `data.id`, tells a repeat). A service
        notification (a job queued before this check existed) is published masked, never stored."""
        if is_service_notification(message):
            await self._notify_service(message)
            return
        row = await self._store(message)
        if row is not None:
            await self._publish(row)

    async def _store(self, message: IncomingMessage) -> dict[str, Any] | None:
        try:
            row = await incoming_store.store(self._pool, message)
        except asyncpg.ForeignKeyViolationError:
            row = None
        if row is None:
            log.warning("incoming message for a deleted account dropped", account_id=message.account_id)
        return row

    async def accept_change(self, change: MessageChange) -> None:
        """An edit, a deletion or a read receipt, from the Telegram host: to the `updates` queue,
        behind the messages it may change (one job at a time: in order); with Redis away, applied
        here and now. Not spooled: one lost to an outage of both leaves a row as it was (logged),
        never a message lost. The service account's chat is left alone, as its messages are."""
        if change.chat_id == SERVICE_ACCOUNT:
            return
        try:
            async with asyncio.timeout(HAND_OVER_TIMEOUT):
                try:
                    args: list[Any] = [change_to_json(change), time.time()]
                    await self._enqueuer.enqueue(UPDATES_QUEUE, APPLY_MESSAGE_CHANGE, [*args, self._auth.job_mac(args)],
                                                 job_id=uuid.uuid4().hex)
                except REDIS_DOWN as exc:
                    log.warning("updates queue unreachable, applying the message change directly",
                                account_id=change.account_id, error=type(exc).__name__)
                    await self._apply(change)
        except (*SERVICES_DOWN, asyncpg.PostgresError) as exc:  # TimeoutError included
            log.warning("message change not recorded: a backing service is unreachable",
                        change=type(change).__name__, account_id=change.account_id, error=type(exc).__name__)

    async def apply_change(self, ctx: JobContext, change: dict[str, Any], at: float, mac: str = "") -> None:
        """The job: record the change and publish its event; retried while a backing service is away.
        Its arguments carry a MAC, as an incoming message's do: a forged edit or deletion would be
        recorded and signed to webhooks."""
        if not self._auth.job_genuine([change, at], mac):
            self._auth.refused("job", "a message-change job without a valid MAC was dropped",
                               account_id=change.get("account_id"))
            return
        try:
            await self._apply(change_from_json(change))
        except SERVICES_DOWN as exc:
            age = time.time() - at
            if age > GIVE_UP_AFTER:
                raise
            raise Retry(retry_delay(age), f"message change not recorded yet: {type(exc).__name__}") from exc

    async def _apply(self, change: MessageChange) -> None:
        if isinstance(change, IncomingEdited):
            row = await incoming_store.record_edit(self._pool, change)
            if row is not None:
                await events.publish(self._redis, self._auth, events.MESSAGE_EDITED, _event(row),
                                     log_length=self._log_length)
        elif isinstance(change, MessagesDeleted):
            incoming, sent = await incoming_store.record_deletion(self._pool, change)
            if incoming or sent:
                await events.publish(self._redis, self._auth, events.MESSAGE_DELETED, {
                    "account_id": change.account_id, "chat_id": change.chat_id,
                    "telegram_message_ids": list(change.telegram_message_ids),
                    "incoming_ids": [r["id"] for r in incoming], "message_ids": sent},
                    log_length=self._log_length)
        else:
            for row in await incoming_store.record_read(self._pool, change):
                await self._outbox.publish_status(row, MessageStatus.READ,
                                                  telegram_message_id=row["telegram_message_id"])

    async def _notify_service(self, message: IncomingMessage) -> None:
        """One admin-only event, codes masked; the log line says that one came, not what it says."""
        log.info("Telegram service notification received (text withheld)", account_id=message.account_id)
        await events.publish(self._redis, self._auth, events.SERVICE_NOTIFICATION,
                             {"account_id": message.account_id, "text": mask_codes(message.text),
                              "date": message.date}, log_length=self._log_length)

    async def _publish(self, row: dict[str, Any]) -> None:
        await events.publish(self._redis, self._auth, "message.incoming", _event(row), log_length=self._log_length)


def _job_args(message: IncomingMessage) -> list[Any]:
    return [message.account_id, message.chat_id, message.telegram_message_id, message.sender, message.text,
            message.date, message.extra_json()]


def _event(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "account_id": row["account_id"], "chat_id": row["chat_id"],
            "telegram_message_id": row["telegram_message_id"], "sender": row["sender"], "text": row["text"],
            "date": int(row["sent_at"].timestamp()) if row["sent_at"] is not None else None,
            "kind": row["kind"], "entities": row["entities"], "reply_to": row["reply_to"],
            "forward_from": row["forward_from"], "media": row["media"],
            "edited_at": row["edited_at"].timestamp() if row.get("edited_at") is not None else None}

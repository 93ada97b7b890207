"""The sender: the `send_message` job and every send through an account's session.

PostgreSQL decides what is sent: a send first claims its row (`sending`), so a duplicated or
retried job never reaches Telegram twice. The sender obeys what Telegram said before (a 429's pause,
PEER_FLOOD's hold on cold sends, both kept in the account's row), counts ad-hoc sends in the
account's campaign pacing (worker/pacing.py), and records each outcome through the outbox
(storage/outbox.py): sent, failed, or back to `queued` with a delay.
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal

import asyncpg
import structlog

from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..queue.consumer import JobContext, Retry
from ..queue.routing import SendRouter
from ..states import MessageStatus
from ..storage import outbox as outbox_store
from ..storage.outbox import Outbox
from ..telegram.base import (
    AccountPaused,
    NotAuthorized,
    OwnedElsewhere,
    PeerFlood,
    RateLimited,
    RequestTimeout,
    SentMessage,
    TelegramError,
    TransientError,
)
from .account_sessions import AccountSessions, HostedAccount
from .pacing import Pacers

MAX_SEND_ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
# PEER_FLOOD stops cold sends (to peers the account never wrote to nor heard from) this long.
PEER_FLOOD_SECONDS = 86_400.0


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": half fixed, half random, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class Sender:
    """Sends claimed messages through the sessions of `sessions`, recording each outcome in `outbox`."""

    def __init__(self, sessions: AccountSessions, outbox: Outbox, pool: asyncpg.Pool, *,
                 router: SendRouter | None = None) -> None:
        self._sessions = sessions
        # Moves a job to its account's owner host before the claim counts an attempt (queue/routing.py).
        self.router = router
        self.outbox = outbox
        self._pool = pool
        self._rng = random.Random()
        # Campaign pacing per account; ad-hoc sends are counted in it (worker/pacing.py).
        self.pacers = Pacers(pool)
        # Does the backend carry our random_id, so a re-send is safe? (worker/unknown_outcomes.py)
        self.sends_random_id = sessions.backend.sends_random_id
        # Messages this process claimed (`sending`) whose outcome it could not record: the
        # abandoned-sends task settles them (worker/unknown_outcomes.py), as it does a stopped worker's.
        self.unrecorded: set[int] = set()

    async def send_message(self, ctx: JobContext, message_id: int, account_id: int | None = None) -> None:
        """The `send_message` job: claim the message, send it, record the outcome."""
        if self.router is not None:
            await self.router.check(ctx, message_id, account_id)  # raises Moved: another host's send
        row = await outbox_store.claim_for_send(self._pool, message_id, self._sessions.worker_name)
        if row is None:
            return  # sent, cancelled, claimed by another job, or not due yet: nothing to do
        structlog.contextvars.bind_contextvars(message_id=message_id, account_id=row["account_id"])
        if row.get("campaign_id") is None:
            # Sent on request, never delayed by the account's campaign limits, but counted in them.
            (await self.pacers.get(row["account_id"])).reserve(row["peer"])
        delay = await self.send(row)
        if delay is not None:
            raise Retry(delay, row.get("error") or "requeued")

    async def send(self, row: dict[str, Any]) -> float | None:
        """Send a claimed (`sending`) message and record its outcome; publishes `message.status`.

        Returns None when the outcome is final (sent or failed), else the delay after which the
        message, back to `queued`, is due again. Where the backend `sends_random_id`
        (worker/unknown_outcomes.py) every attempt carries the message's random_id, so an unanswered
        one is retried safely; elsewhere it is recorded as `failed`, error_class `unknown`.
        """
        try:
            return await self._send_claimed(row)
        except BaseException:
            # Left `sending` under this live worker's name (a database error, a cancellation), unless
            # it was recorded before the error: settled as a stopped worker's send would be.
            self.unrecorded.add(row["id"])
            raise

    async def _send_claimed(self, row: dict[str, Any]) -> float | None:
        account_id = row["account_id"]
        campaign_id = row.get("campaign_id")
        random_id = row.get("random_id") if self.sends_random_id else None
        try:
            try:
                hosted = await self._sessions.open_for_sending(account_id)
            except (*REDIS_DOWN, *POSTGRES_DOWN, asyncpg.PostgresError) as exc:
                # Nothing has reached Telegram: a retry is safe on any backend.
                return await self._requeue(row, backoff_delay(row["attempts"], self._rng),
                                           f"account not opened: {type(exc).__name__}", "transient")
            await self.outbox.publish_status(row, MessageStatus.SENDING)  # claimed before; announced as it goes out
            sent = await self.send_text(hosted, row["peer"], row["text"], random_id=random_id)
        except RateLimited as exc:  # a 429 now, or an earlier one not waited out yet (AccountPaused)
            return await self._requeue(row, exc.retry_after, exc.message, "rate_limited")
        except PeerFlood as exc:  # answered now, or a cold send refused while the account is flooded
            if campaign_id is not None:
                # Nothing was sent: the campaign hands the message to another of its accounts.
                return await self._requeue(row, 0.0, exc.message, "rate_limited")
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        except RequestTimeout as exc:
            # No confirmation: it may still be delivered (TDLib keeps it queued and re-sends it after
            # a restart). Only a re-send with the same random_id is safe; without one, record it.
            if random_id is not None and row["attempts"] < MAX_SEND_ATTEMPTS:
                delay = backoff_delay(row["attempts"], self._rng)
                await self.outbox.requeue_unknown(row, delay, exc.message)
                return delay
            await self.outbox.fail_unknown(row, exc.message)
        except (TransientError, OwnedElsewhere) as exc:
            if row["attempts"] >= MAX_SEND_ATTEMPTS:
                await self.outbox.mark_failed(row, exc.message, "transient")
                return None
            return await self._requeue(row, backoff_delay(row["attempts"], self._rng), exc.message, "transient")
        except NotAuthorized as exc:
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        except TelegramError as exc:
            if random_id is not None and "RANDOM_ID_DUPLICATE" in exc.message.upper():
                # Telegram already holds a message with this random_id: an earlier attempt went through.
                await self.outbox.mark_sent_without_id(row)
                return None
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        else:
            await self.outbox.mark_sent(row, sent.telegram_message_id)
        return None

    async def _requeue(self, row: dict[str, Any], delay: float, error: str, error_class: str) -> float | None:
        """Back to `queued`, due after `delay` (returned); None when its campaign was cancelled
        meanwhile, which cancels it instead."""
        if await self.outbox.requeue(row, delay, error, error_class) == MessageStatus.CANCELLED:
            return None
        row["error"] = error
        return delay

    async def send_text(self, hosted: HostedAccount, peer: str, text: str, *,
                        random_id: int | None = None) -> SentMessage:
        """Send through the account's session, obeying what Telegram said before.

        No attempt while a 429's "retry after" runs (AccountPaused, nothing sent), none to a cold peer
        while PEER_FLOOD holds (PeerFlood, nothing sent), and one send at a time per account, so no
        send of it is in flight once a 429 is answered. A 429 pauses the account; a PEER_FLOOD stops
        its cold sends for PEER_FLOOD_SECONDS; both are stored (accounts.paused_until /
        peer_flood_until) and show in the sessions' stats().
        """
        account_id = hosted.session.account_id
        async with hosted.send_lock:
            wait = hosted.paused_until - time.time()
            if wait > 0:
                raise AccountPaused(account_id, wait)
            if hosted.peer_flood_until > time.time() and not await self._is_warm(account_id, peer):
                raise PeerFlood(f"PEER_FLOOD: account {account_id} may not write to new peers until "
                                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(hosted.peer_flood_until))}")
            try:
                return await hosted.session.send_text(peer, text, random_id=random_id)
            except RateLimited as exc:
                await self._pause(account_id, exc.retry_after, exc.message)
                raise
            except PeerFlood as exc:
                await self._peer_flood(account_id, exc.message)
                raise

    async def _is_warm(self, account_id: int, peer: str) -> bool:
        """A peer the account has written to, or heard from: not a cold send."""
        return bool(await self._pool.fetchval(
            """SELECT EXISTS (SELECT 1 FROM messages WHERE account_id = $1 AND peer = $2 AND status = 'sent')
                   OR EXISTS (SELECT 1 FROM incoming_messages WHERE account_id = $1 AND sender = $2)""",
            account_id, peer))

    async def _peer_flood(self, account_id: int, reason: str) -> None:
        await self._hold(account_id, "peer_flood_until", PEER_FLOOD_SECONDS, reason)

    async def _pause(self, account_id: int, seconds: float, reason: str) -> None:
        await self._hold(account_id, "paused_until", seconds, reason)

    async def _hold(self, account_id: int, field: Literal["paused_until", "peer_flood_until"],
                    seconds: float, reason: str) -> None:
        """Hold the account back for `seconds`: in memory (sends check it), in its row with Telegram's
        `reason` as its last error, as an event. A hold never shortens one already in force (another
        host may have stored a longer one; GREATEST ignores a NULL), whose reason then stays."""
        until = time.time() + seconds
        hosted = self._sessions.hosted(account_id)
        if hosted is not None:  # in force at once, whether or not the write below succeeds
            setattr(hosted, field, max(getattr(hosted, field), until))
        # `field` is one of two literal column names, never input. SET's expressions see the old row.
        row = await self._pool.fetchrow(
            f"""UPDATE accounts SET {field} = GREATEST({field}, to_timestamp($2)),
                       last_error = CASE WHEN {field} > to_timestamp($2) THEN last_error ELSE $3 END
                WHERE id = $1 RETURNING extract(epoch FROM {field})::float8 AS until, last_error""",
            account_id, until, reason)
        if row is None:
            return  # the account was deleted meanwhile
        if hosted is not None:
            setattr(hosted, field, max(getattr(hosted, field), row["until"]))
        await self._sessions.publish("account.state", {"account_id": account_id, field: row["until"],
                                                       "last_error": row["last_error"]})

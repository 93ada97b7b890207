"""The sender: the `send_message` job and every send through an account's session.

PostgreSQL decides what is sent: a send first claims its row (`sending`), so a duplicated or
retried job never reaches Telegram twice. The sender obeys what Telegram said before (a 429's pause,
PEER_FLOOD's hold on cold sends, both kept in the account's row), counts ad-hoc sends in the
account's campaign pacing (worker/pacing.py), and records each outcome through the outbox
(storage/outbox.py): sent, failed, or back to `queued` with a delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import asyncpg
import structlog

from ..errors import NotFound
from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..queue.consumer import JobContext, Retry
from ..queue.routing import SendRouter
from ..states import MessageStatus
from ..storage import outbox as outbox_store
from ..storage.files import FileStore
from ..storage.outbox import Outbox
from ..telegram.base import (
    AccountPaused,
    AuthState,
    NotAuthorized,
    OwnedElsewhere,
    PeerFlood,
    PermanentError,
    RateLimited,
    RequestTimeout,
    SentMessage,
    TelegramError,
    TransientError,
)
from ..telegram.content import FormattedText, Media, MediaKind, OutgoingMessage
from .account_sessions import AccountSessions, HostedAccount
from .pacing import Pacers

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Actions that put a new message into a chat (counted in the account's pacing).
SENDING_ACTIONS = frozenset({"send", "forward"})
# Actions that, repeated after an unanswered attempt, change nothing more.
REPEATABLE_ACTIONS = frozenset({"edit", "delete"})
MAX_SEND_ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
# PEER_FLOOD stops cold sends (to peers the account never wrote to nor heard from) this long.
PEER_FLOOD_SECONDS = 86_400.0


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": half fixed, half random, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def outgoing_message(row: dict[str, Any]) -> OutgoingMessage:
    """A claimed message's content as a session sends it: its text and whatever of entities, reply
    and options its row carries."""
    options = row.get("options") or {}
    return OutgoingMessage(
        FormattedText.from_json(row["text"], row.get("entities")), reply_to=row.get("reply_to"),
        silent=bool(options.get("silent")), protect_content=bool(options.get("protect_content")),
        disable_web_page_preview=bool(options.get("disable_web_page_preview")))


# Telegram's words for a remote file id it no longer takes from this account.
_STALE_FILE_REFERENCE = ("FILE_REFERENCE_", "FILE_ID_INVALID", "MEDIA_EMPTY", "WRONG_FILE_IDENTIFIER")


def is_stale_file_reference(error: str) -> bool:
    upper = error.upper()
    return any(word in upper for word in _STALE_FILE_REFERENCE)


class Sender:
    """Sends claimed messages through the sessions of `sessions`, recording each outcome in `outbox`."""

    def __init__(self, sessions: AccountSessions, outbox: Outbox, pool: asyncpg.Pool, *,
                 router: SendRouter | None = None, files: FileStore | None = None) -> None:
        self._sessions = sessions
        # Moves a job to its account's owner host before the claim counts an attempt (queue/routing.py).
        self.router = router
        self.outbox = outbox
        self._pool = pool
        self._rng = random.Random()
        # Campaign pacing per account; ad-hoc sends are counted in it (worker/pacing.py).
        self.pacers = Pacers(pool)
        # The files messages carry: copied to this host's cache, their remote ids kept per account.
        self.files = files or FileStore(pool)
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
        if row.get("campaign_id") is None and row.get("action", "send") in SENDING_ACTIONS:
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
        message = outgoing_message(row)
        try:
            try:
                hosted = await self._sessions.open_for_sending(account_id)
                message = await self._with_media(row, message)
            except (*REDIS_DOWN, *POSTGRES_DOWN, asyncpg.PostgresError, OSError) as exc:
                # Nothing has reached Telegram: a retry is safe on any backend.
                return await self._requeue(row, backoff_delay(row["attempts"], self._rng),
                                           f"account not opened: {type(exc).__name__}", "transient")
            # Claimed before; announced as it goes out: handed to the events publisher now, it reaches
            # Redis while the request goes to Telegram (batched with other sends' events), before
            # this send's outcome event, which the publisher keeps in order behind it.
            announced = asyncio.ensure_future(self.outbox.publish_status(row, MessageStatus.SENDING))
            try:
                sent = await self._perform(hosted, row, random_id, message)
            finally:
                await announced
        except RateLimited as exc:  # a 429 now, or an earlier one not waited out yet (AccountPaused)
            return await self._requeue(row, exc.retry_after, exc.message, "rate_limited")
        except PeerFlood as exc:  # answered now, or a cold send refused while the account is flooded
            if campaign_id is not None:
                # Nothing was sent: the campaign hands the message to another of its accounts.
                return await self._requeue(row, 0.0, exc.message, "rate_limited")
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        except RequestTimeout as exc:
            # No confirmation: it may still be delivered (TDLib keeps it queued and re-sends it after
            # a restart). Only a re-send with the same random_id is safe, or an edit or deletion,
            # which repeated changes nothing more; otherwise, record it.
            repeatable = random_id is not None or row.get("action") in REPEATABLE_ACTIONS
            if repeatable and row["attempts"] < MAX_SEND_ATTEMPTS:
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
            if exc.state is AuthState.CLOSED and row["attempts"] < MAX_SEND_ATTEMPTS:
                # Closed under this send (its lease lost when its host was cut off, a move, a stop),
                # not logged out: a closed session refuses a send before it reaches Telegram, and the
                # account's next holder makes it.
                return await self._requeue(row, backoff_delay(row["attempts"], self._rng), exc.message, "transient")
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        except TelegramError as exc:
            if random_id is not None and "RANDOM_ID_DUPLICATE" in exc.message.upper():
                # Telegram already holds a message with this random_id: an earlier attempt went through.
                await self.outbox.mark_sent_without_id(row)
                return None
            if row.get("action") == "edit" and row["attempts"] > 1 and "MESSAGE_NOT_MODIFIED" in exc.message.upper():
                # An earlier attempt (unanswered) did the edit: the message says this text already.
                await self._record_done(row, None)
                return None
            stale = [m.file_id for m in message.media if m.remote_id]
            if stale and is_stale_file_reference(exc.message) and row["attempts"] < MAX_SEND_ATTEMPTS:
                # Telegram no longer takes the remote ids this account had: upload the files again.
                for file_id in stale:
                    await self.files.forget_remote_id(account_id, file_id)
                return await self._requeue(row, 0.0, exc.message, "transient")
            await self.outbox.mark_failed(row, exc.message, exc.error_class)
        else:
            await self._record_done(row, sent)
            if message.media:
                await self._record_files(account_id, message, sent)
        return None

    async def _record_done(self, row: dict[str, Any], sent: SentMessage | None) -> None:
        if row.get("action", "send") == "send":
            assert sent is not None
            await self.outbox.mark_sent(row, sent.telegram_message_id,
                                        telegram_message_ids=list(sent.telegram_message_ids), chat_id=sent.chat_id)
        else:
            await self.outbox.mark_action_done(row, sent)

    async def _perform(self, hosted: HostedAccount, row: dict[str, Any], random_id: int | None,
                       message: OutgoingMessage) -> SentMessage:
        """The claimed row's action through the account's session: a send (`message`, its files
        resolved), or a forward, edit or deletion of its target (a sent message of the same account)."""
        action = row.get("action", "send")
        if action == "send":
            return await self.send_content(hosted, row["peer"], message, random_id=random_id)
        try:
            target = await outbox_store.get_message(self._pool, row["target_id"]) if row.get("target_id") else None
        except NotFound:
            target = None
        if target is None or target["telegram_message_id"] is None:
            raise PermanentError(400, "MESSAGE_ID_INVALID: the message acted on was never sent")
        ids = target["telegram_message_ids"] or [target["telegram_message_id"]]
        session = hosted.session
        if action == "forward":
            return await self._limited(hosted, row["peer"], lambda: session.forward(
                target["peer"], ids, row["peer"], random_id=random_id))
        done = SentMessage(ids[0], target["chat_id"] or 0, tuple(ids))
        if action == "edit":
            text = FormattedText.from_json(row["text"], row.get("entities"))
            caption = bool(await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM message_files WHERE message_id = $1)", target["id"]))
            await self._limited(hosted, target["peer"], lambda: session.edit(
                target["peer"], target["telegram_message_id"], text, caption=caption))
        else:
            await self._limited(hosted, target["peer"], lambda: session.delete(
                target["peer"], ids, for_everyone=bool((row.get("options") or {}).get("for_everyone"))))
        return done

    async def _with_media(self, row: dict[str, Any], message: OutgoingMessage) -> OutgoingMessage:
        """The message with the files its row names (message_files), each as Telegram's remote id
        when this account sent it before, else as a local copy in the worker's file cache. A claimed
        row says whether it has files (`has_files`): one without costs no query."""
        if row.get("has_files") is False:
            return message
        rows = await self._pool.fetch(
            """SELECT mf.kind, f.id, f.size, f.mime_type, f.file_name, f.sha256, f.width, f.height, f.duration,
                      r.remote_id
               FROM message_files mf JOIN files f ON f.id = mf.file_id
               LEFT JOIN file_remote_ids r ON r.file_id = f.id AND r.account_id = $2
               WHERE mf.message_id = $1 ORDER BY mf.position""",
            row["id"], row["account_id"])
        if not rows:
            return message
        cache = self._sessions.settings.files.cache_dir
        media = []
        for r in rows:
            path = None if r["remote_id"] else await self.files.local_path(r["id"], r["sha256"], cache)
            media.append(Media(kind=MediaKind(r["kind"]), file_id=r["id"], size=r["size"], mime_type=r["mime_type"],
                               file_name=r["file_name"], sha256=r["sha256"], width=r["width"], height=r["height"],
                               duration=r["duration"], path=path, remote_id=r["remote_id"]))
        return dataclasses.replace(message, media=tuple(media))

    async def _record_files(self, account_id: int, message: OutgoingMessage, sent: SentMessage) -> None:
        """Telegram's remote ids of the files just sent, for this account's next sends, and the files'
        use (retention counts from it). A failure costs only a second upload: logged, not raised."""
        remote = {m.file_id: r for m, r in zip(message.media, sent.remote_file_ids, strict=False)
                  if r and r != m.remote_id}
        try:
            await self.files.record_remote_ids(account_id, remote)
            await self.files.touch([m.file_id for m in message.media])
        except (*POSTGRES_DOWN, asyncpg.PostgresError) as exc:
            log.warning("remote file ids not recorded", account_id=account_id, error=type(exc).__name__)

    async def _requeue(self, row: dict[str, Any], delay: float, error: str, error_class: str) -> float | None:
        """Back to `queued`, due after `delay` (returned); None when its campaign was cancelled
        meanwhile, which cancels it instead."""
        if await self.outbox.requeue(row, delay, error, error_class) == MessageStatus.CANCELLED:
            return None
        row["error"] = error
        return delay

    async def send_content(self, hosted: HostedAccount, peer: str, message: OutgoingMessage, *,
                           random_id: int | None = None) -> SentMessage:
        """Send through the account's session, obeying what Telegram said before (see `_limited`)."""
        return await self._limited(hosted, peer, lambda: hosted.session.send(peer, message, random_id=random_id))

    async def _limited(self, hosted: HostedAccount, peer: str, call: Callable[[], Awaitable[T]]) -> T:
        """One request of the account to Telegram about `peer`, obeying what Telegram said before.

        No attempt while a 429's "retry after" runs (AccountPaused, nothing sent), none to a cold peer
        while PEER_FLOOD holds (PeerFlood, nothing sent), and one request at a time per account, so
        none of it is in flight once a 429 is answered. A 429 pauses the account; a PEER_FLOOD stops
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
                return await call()
            except RateLimited as exc:
                await self._pause(account_id, exc.retry_after, exc.message)
                raise
            except PeerFlood as exc:
                await self._peer_flood(account_id, exc.message)
                raise

    async def _is_warm(self, account_id: int, peer: str) -> bool:
        """A peer the account has written to, or heard from: not a cold send."""
        return bool(await self._pool.fetchval(
            """SELECT EXISTS (SELECT 1 FROM messages WHERE account_id = $1 AND peer = $2 AND status IN ('sent', 'read'))
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

"""The Telegram host: the one worker process that holds account sessions and sends through them.

It never forks (TDLib's rule), holds a lease on every account it opens, answers the API's account
requests, and runs the send jobs. PostgreSQL decides what is sent: a send first claims its row,
so a duplicated or retried job never reaches Telegram twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import events
from ..queue.consumer import JobContext, Retry
from ..settings import Settings
from ..storage import accounts as account_store
from ..storage import messages as message_store
from ..telegram import rpc
from ..telegram.base import (
    AuthError,
    AuthState,
    AuthStateChanged,
    ConnectionStateChanged,
    IncomingMessage,
    NotAuthorized,
    OwnedElsewhere,
    PeerFlood,
    Proxy,
    RateLimited,
    RequestTimeout,
    Session,
    SessionConfig,
    TelegramBackend,
    TelegramError,
    TransientError,
    Update,
    WrongDatabaseKey,
)
from ..telegram.keys import account_database_dir, derive_database_key
from ..telegram.leases import Lease, LeaseManager

log = structlog.get_logger(__name__)

MAX_SEND_ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0


@dataclass
class HostedAccount:
    session: Session
    lease: Lease
    paused_until: float = 0.0


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": half fixed, half random, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class TelegramHost:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis,
                 backend: TelegramBackend, *, worker_name: str) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self.backend = backend
        self.worker_name = worker_name
        self._leases = LeaseManager(redis, owner=worker_name)
        self._accounts: dict[int, HostedAccount] = {}
        self._opening: dict[int, asyncio.Lock] = {}
        self._rng = random.Random()
        self._answering: set[asyncio.Task[None]] = set()

    # -- updates from the backend ----------------------------------------------------------------

    async def on_update(self, update: Update) -> None:
        """Store what the API needs and publish it as an event."""
        if isinstance(update, AuthStateChanged):
            await account_store.set_auth_state(self._pool, update.account_id, update.state.value)
            await events.publish(self._redis, "account.state",
                                 {"account_id": update.account_id, "auth_state": update.state.value})
        elif isinstance(update, ConnectionStateChanged):
            await account_store.set_connection_state(self._pool, update.account_id, update.state.value)
            await events.publish(self._redis, "account.state",
                                 {"account_id": update.account_id, "connection_state": update.state.value})
        elif isinstance(update, IncomingMessage):
            await self._pool.execute(
                """INSERT INTO incoming_messages (account_id, chat_id, telegram_message_id, sender, text)
                   VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
                update.account_id, update.chat_id, update.telegram_message_id, update.sender, update.text,
            )
            await events.publish(self._redis, "message.incoming", {
                "account_id": update.account_id, "chat_id": update.chat_id,
                "telegram_message_id": update.telegram_message_id, "sender": update.sender,
                "text": update.text, "date": update.date})

    # -- sessions ----------------------------------------------------------------------------------

    async def open(self, account_id: int, *, restart: bool = False) -> HostedAccount:
        """Open (or return) the account's session, holding its lease; `restart` starts a fresh login."""
        lock = self._opening.setdefault(account_id, asyncio.Lock())
        async with lock:
            hosted = self._accounts.get(account_id)
            if hosted is not None and not restart:
                return hosted
            if hosted is not None:
                await self._close_account(account_id)
            lease = await self._leases.acquire(account_id)
            try:
                account = await account_store.get_account(self._pool, account_id)
                proxy = Proxy(**account["proxy"]) if account.get("proxy") else None
                config = SessionConfig(
                    account_id=account_id, phone=account["phone"],
                    database_key=derive_database_key(self._settings.encryption_key, account_id), proxy=proxy)
                session = await self.backend.open_session(config)
                hosted = HostedAccount(session, lease)
                self._accounts[account_id] = hosted
                await session.start()
            except BaseException:
                self._accounts.pop(account_id, None)
                await self._leases.release(lease)
                raise
            return hosted

    async def _close_account(self, account_id: int) -> None:
        hosted = self._accounts.pop(account_id, None)
        if hosted is not None:
            try:
                await hosted.session.close()
            finally:
                await self._leases.release(hosted.lease)

    async def resume_ready_accounts(self) -> int:
        """Reopen every logged-in account after a restart (no new login needed)."""
        rows = await self._pool.fetch("SELECT id FROM accounts WHERE auth_state IN ('ready', 'closed')")
        resumed = 0
        for row in rows:
            try:
                await self.open(row["id"])
                resumed += 1
            except (TelegramError, OSError) as exc:
                log.warning("account not resumed", account_id=row["id"], error=str(exc))
        return resumed

    async def renew_leases(self) -> None:
        for account_id, hosted in list(self._accounts.items()):
            if not await self._leases.renew(hosted.lease):
                log.error("lease lost, closing session", account_id=account_id)
                self._accounts.pop(account_id, None)
                await hosted.session.close()

    async def aclose(self, deadline: float) -> None:
        await self.backend.aclose(deadline)
        for hosted in list(self._accounts.values()):
            await self._leases.release(hosted.lease)
        self._accounts.clear()

    def stats(self) -> dict[str, Any]:
        now = time.time()
        stats = self.backend.stats()
        stats["accounts_hosted"] = len(self._accounts)
        stats["accounts_paused"] = sum(1 for h in self._accounts.values() if h.paused_until > now)
        return stats

    # -- account requests from the API ------------------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op, account_id, args = request["op"], int(request["account_id"]), request.get("args", {})
        if op == "login":
            hosted = await self.open(account_id, restart=True)
        elif op == "logout":
            hosted = await self.open(account_id)
            await hosted.session.log_out()
            await self._close_account(account_id)
            shutil.rmtree(account_database_dir(self._settings.tdlib.data_dir, account_id), ignore_errors=True)
            return {"auth_state": AuthState.LOGGED_OUT.value}
        else:
            hosted = await self.open(account_id)
            session = hosted.session
            if op == "code":
                await session.submit_code(str(args["code"]))
            elif op == "password":
                await session.submit_password(str(args["password"]))
            elif op == "register":
                await session.register(str(args["first_name"]), str(args.get("last_name", "")))
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
        return {"auth_state": hosted.session.auth_state.value,
                "connection_state": hosted.session.connection_state.value}

    async def serve_requests(self, redis: aioredis.Redis) -> None:
        """Answer account requests until cancelled; `redis` is a connection free to block."""
        while True:
            item = await redis.blpop([rpc.REQUESTS_KEY], timeout=1)
            if item is None:
                continue
            request = json.loads(item[1])
            if request.get("deadline", 0) < time.time():
                continue  # nobody waits for this answer any more
            task = asyncio.create_task(self._answer(request))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any]
        with structlog.contextvars.bound_contextvars(account_id=request.get("account_id"), op=request.get("op")):
            try:
                reply = {"result": await self.handle_request(request)}
            except OwnedElsewhere as exc:
                reply = {"error": {"status": 409, "code": "owned_elsewhere", "message": str(exc)}}
            except WrongDatabaseKey as exc:
                reply = {"error": {"status": 409, "code": "wrong_database_key", "message": exc.message}}
            except AuthError as exc:
                reply = {"error": {"status": 422, "code": "auth_rejected", "message": exc.message,
                                   "details": {"field": _auth_field(request.get("op", ""))}}}
            except TelegramError as exc:
                status = 503 if exc.error_class == "transient" else 502
                reply = {"error": {"status": status, "code": "telegram_error", "message": exc.message,
                                   "details": {"error_class": exc.error_class}}}
            except Exception as exc:
                log.exception("account request failed")
                reply = {"error": {"status": 500, "code": "internal_error", "message": type(exc).__name__}}
        key = rpc.reply_key(request["id"])
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, json.dumps(reply))
            pipe.expire(key, rpc.REQUEST_TTL)
            await pipe.execute()

    # -- jobs -------------------------------------------------------------------------------------

    async def send_message(self, ctx: JobContext, message_id: int) -> None:
        row = await message_store.claim_for_send(self._pool, message_id, self.worker_name)
        if row is None:
            return  # sent, cancelled, claimed by another job, or not due yet: nothing to do
        account_id = row["account_id"]
        structlog.contextvars.bind_contextvars(message_id=message_id, account_id=account_id)
        await self._publish_status(row["id"], "sending", account_id)
        try:
            hosted = await self.open(account_id)
            wait = hosted.paused_until - time.time()
            if wait > 0:
                # Flood-waiting: no send is attempted before Telegram's "retry after" has passed.
                await message_store.requeue(self._pool, message_id, wait, "account paused by flood wait",
                                            "rate_limited")
                raise Retry(wait, "account paused by flood wait")
            sent = await hosted.session.send_text(row["peer"], row["text"])
        except RateLimited as exc:
            await self._pause(account_id, exc.retry_after)
            await message_store.requeue(self._pool, message_id, exc.retry_after, exc.message, "rate_limited")
            await self._publish_status(message_id, "queued", account_id, exc.message)
            raise Retry(exc.retry_after, exc.message) from None
        except PeerFlood as exc:
            until = datetime.now(UTC) + timedelta(days=1)
            await self._pool.execute("UPDATE accounts SET peer_flood_until = $2 WHERE id = $1", account_id, until)
            await self._fail(message_id, account_id, exc.message, exc.error_class)
        except RequestTimeout as exc:
            # No confirmation, but TDLib may still deliver it (and re-sends after a restart): a retry
            # could send twice, so the platform records the uncertainty instead of guessing.
            await self._fail(message_id, account_id, f"outcome unknown: {exc.message}", "unknown")
        except (TransientError, OwnedElsewhere) as exc:
            if row["attempts"] >= MAX_SEND_ATTEMPTS:
                await self._fail(message_id, account_id, exc.message, "transient")
                return
            delay = backoff_delay(row["attempts"], self._rng)
            await message_store.requeue(self._pool, message_id, delay, exc.message, "transient")
            await self._publish_status(message_id, "queued", account_id, exc.message)
            raise Retry(delay, exc.message) from None
        except NotAuthorized as exc:
            await self._fail(message_id, account_id, exc.message, exc.error_class)
        except TelegramError as exc:
            await self._fail(message_id, account_id, exc.message, exc.error_class)
        else:
            await message_store.mark_sent(self._pool, message_id, sent.telegram_message_id)
            await self._publish_status(message_id, "sent", account_id,
                                       telegram_message_id=sent.telegram_message_id)

    async def _pause(self, account_id: int, seconds: float) -> None:
        until = time.time() + seconds
        hosted = self._accounts.get(account_id)
        if hosted is not None:
            hosted.paused_until = max(hosted.paused_until, until)
        await self._pool.execute("UPDATE accounts SET paused_until = to_timestamp($2) WHERE id = $1",
                                 account_id, until)

    async def _fail(self, message_id: int, account_id: int, error: str, error_class: str) -> None:
        await message_store.mark_failed(self._pool, message_id, error, error_class)
        await self._publish_status(message_id, "failed", account_id, error)

    async def _publish_status(self, message_id: int, status: str, account_id: int, error: str | None = None,
                              telegram_message_id: int | None = None) -> None:
        data: dict[str, Any] = {"message_id": message_id, "status": status, "account_id": account_id}
        if error:
            data["error"] = error
        if telegram_message_id is not None:
            data["telegram_message_id"] = telegram_message_id
        await events.publish(self._redis, "message.status", data)


def _auth_field(op: str) -> str:
    return {"code": "code", "password": "password", "register": "first_name", "login": "phone"}.get(op, op)

"""Account requests: the login steps, logouts and status reads API processes ask this host for.

They come over Redis (telegram/rpc.py), sealed: the host's own list first (requests for the
accounts it owns), then the shared one. One that is not sealed with this platform's key, has
expired, or was taken before is never acted on (a logout deletes the account's database). Each is
answered on its reply key with a result, or with a platform error: Telegram's errors become the
API's through one table (`TELEGRAM_ERRORS`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import redis_keys
from ..errors import Conflict, NotFound, PlatformError
from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..queue import routing
from ..storage import accounts as account_store
from ..storage.files import CHUNK_SIZE, FileStore
from ..tasks import cancel_and_wait
from ..telegram import rpc
from ..telegram.base import AuthError, AuthState, OwnedElsewhere, TelegramError, WrongDatabaseKey
from ..telegram.keys import set_aside_copies
from .account_sessions import AccountSessions

log = structlog.get_logger(__name__)

# The account-request loop waits this long after Redis fails it, doubling up to the cap.
REQUESTS_RETRY_FIRST = 0.25
REQUESTS_RETRY_CAP = 4.0
# The state each login step answers. A step the session is not at conflicts with its state (409,
# as a campaign's wrong move does) instead of going to Telegram, whose refusal would read as a
# wrong code or password (422).
STEP_STATES = {"code": AuthState.WAIT_CODE, "password": AuthState.WAIT_PASSWORD,
               "register": AuthState.WAIT_REGISTRATION}


def _auth_field(op: str) -> str:
    """The request's field a refused login step names (what the client corrects)."""
    return {"code": "code", "password": "password", "register": "first_name", "login": "phone",
            "login_again": "phone"}.get(op, op)


def _wrong_database_key(exc: WrongDatabaseKey, op: str) -> PlatformError:
    return rpc.HostError(409, "wrong_database_key",
                         f"{exc.message}: the account's database does not open with this ENCRYPTION_KEY. "
                         "Restore the key it was made with, or log in again with set_aside_database=true "
                         "(the old database is kept on disk)", {"auth_state": AuthState.FAILED})


# Telegram's largest file (for an ordinary account): a download is stored whatever TP_MAX_UPLOAD_BYTES says.
MAX_DOWNLOAD_BYTES = 2000 << 20


async def file_chunks(path: Path, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """A local file's bytes in pieces, each read off the event loop."""
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, size):
            yield chunk


# Telegram's errors as the API answers them, the first class that matches: (error, its platform
# error for the request's op). The rest of the platform's errors (PlatformError) pass as they are.
TELEGRAM_ERRORS: tuple[tuple[type[TelegramError], Callable[[Any, str], PlatformError]], ...] = (
    (OwnedElsewhere, lambda exc, op: rpc.HostError(409, "owned_elsewhere", str(exc), {"owner": exc.owner})),
    (WrongDatabaseKey, _wrong_database_key),
    (AuthError, lambda exc, op: rpc.HostError(422, "auth_rejected", exc.message, {"field": _auth_field(op)})),
    (TelegramError, lambda exc, op: rpc.HostError(503 if exc.error_class == "transient" else 502, "telegram_error",
                                                  exc.message, {"error_class": exc.error_class})),
)


def platform_error(exc: TelegramError, op: str) -> PlatformError:
    """The API's error for a Telegram error raised by request `op` (TELEGRAM_ERRORS)."""
    for error_class, translate in TELEGRAM_ERRORS:
        if isinstance(exc, error_class):
            return translate(exc, op)
    raise AssertionError("TelegramError is the table's last entry")  # pragma: no cover


def _error_reply(error: PlatformError) -> dict[str, Any]:
    """The answer carrying a platform error (telegram/rpc.py raises it again in the API)."""
    return {"error": {"status": error.status, "code": error.code, "message": error.message,
                      "details": error.details}}


class AccountRequests:
    """Answers the API's account requests with this process's sessions."""

    def __init__(self, sessions: AccountSessions, pool: asyncpg.Pool, redis: aioredis.Redis, *,
                 files: FileStore | None = None) -> None:
        self._sessions = sessions
        self._pool = pool
        # Where downloaded attachments go: the process's one store (TP_FILE_STORE).
        self._files = files or FileStore(pool)
        self._redis = redis
        self._auth = sessions.redis_auth
        self._answering: set[asyncio.Task[None]] = set()
        self._taking_requests = True
        self._host_id = sessions.host_id
        self._gone_after = sessions.gone_after


    # -- account requests from the API ------------------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Do what the request asks of its account; the account's states as stored for the caller."""
        op, account_id, args = request["op"], int(request["account_id"]), request.get("args", {})
        if op == rpc.DOWNLOAD_INCOMING_FILE:
            return {"file_id": await self.download_incoming_file(account_id, int(args["incoming_id"]))}
        if op == "login":
            hosted = await self._sessions.open(account_id, restart=True)
        elif op == "login_again":
            hosted = await self._sessions.login_again(account_id,
                                                      set_aside_database=bool(args.get("set_aside_database")))
        elif op == "move":  # handed over to this host (or it owns the account already): open it here
            hosted = await self._sessions.open_for_sending(account_id)
        elif op == "logout":
            try:
                hosted = await self._sessions.open(account_id)
                await hosted.session.log_out()
            except OwnedElsewhere:
                raise
            except TelegramError as exc:
                # A login that never completed (or a database that no longer opens) has nothing to
                # log out at Telegram; the operator still gets the account removed.
                log.warning("logout without a live session; removing the local one", error=exc.message)
            await self._sessions.close_account(account_id)
            database = self._sessions.backend.database_dir(account_id)
            for directory in (database, *set_aside_copies(database)):  # a removed account leaves no login behind
                shutil.rmtree(directory, ignore_errors=True)
            return {"auth_state": AuthState.LOGGED_OUT.value}
        else:
            hosted = await self._sessions.open(account_id)
            session = hosted.session
            expected = STEP_STATES.get(op)
            if expected is not None and session.auth_state != expected:
                state = session.auth_state.value
                raise Conflict(f"the account is not waiting for a {op} step: its auth_state is {state}",
                               details={"auth_state": state})
            if op == "code":
                await session.submit_code(str(args["code"]))
            elif op == "password":
                await session.submit_password(str(args["password"]))
            elif op == "register":
                await session.register(str(args["first_name"]), str(args.get("last_name", "")))
            elif op == "view":
                await session.view(str(args["peer"]), [int(i) for i in args["message_ids"]])
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
        auth_state = hosted.session.auth_state.value
        connection_state = hosted.session.connection_state.value
        # The caller reads the account back at once: store what it must see (updates may still queue).
        owner_token = self._sessions.owner_token(account_id)
        await account_store.set_auth_state(self._pool, account_id, auth_state, owner_token=owner_token)
        await account_store.set_connection_state(self._pool, account_id, connection_state, owner_token=owner_token)
        if op != "status" and auth_state == AuthState.READY.value:
            await self._sessions.record_identity(account_id)  # the READY update may still be queued (TDLib)
        return {"auth_state": auth_state, "connection_state": connection_state}

    async def download_incoming_file(self, account_id: int, incoming_id: int) -> int:
        """The attachment of a message the account received, downloaded through its session into the
        file store (once: a second request finds it there); its file id."""
        row = await self._pool.fetchrow(
            """SELECT i.kind, i.media, f.file_id FROM incoming_messages i
               LEFT JOIN incoming_files f ON f.incoming_id = i.id
               WHERE i.id = $1 AND i.account_id = $2""", incoming_id, account_id)
        if row is None:
            raise NotFound(f"incoming message {incoming_id} of account {account_id} not found")
        if row["file_id"] is not None:
            return int(row["file_id"])
        media = json.loads(row["media"]) if isinstance(row["media"], str) else row["media"]
        if not media or not media.get("remote_id"):
            raise NotFound(f"incoming message {incoming_id} has no file", details={"kind": row["kind"]})
        hosted = await self._sessions.open(account_id)
        path = await hosted.session.download_file(str(media["remote_id"]))
        store = self._files
        try:
            stored, _ = await store.put(file_chunks(path), file_name=str(media.get("file_name") or row["kind"]),
                                        mime_type=media.get("mime_type"), max_size=MAX_DOWNLOAD_BYTES, created_by=None)
        finally:
            path.unlink(missing_ok=True)  # the store has it now; the session's copy would only fill the disk
        file_id = await self._pool.fetchval(
            """WITH added AS (INSERT INTO incoming_files (incoming_id, file_id) VALUES ($1, $2)
                              ON CONFLICT (incoming_id) DO NOTHING RETURNING file_id)
               SELECT file_id FROM added UNION ALL SELECT file_id FROM incoming_files WHERE incoming_id = $1""",
            incoming_id, stored["id"])
        return int(file_id)

    async def serve_requests(self, client: aioredis.Redis) -> None:
        """Answer account requests until `stop_taking_requests`; `client` is a connection free to block.

        The loop is told to stop, not cancelled: a cancellation landing in BLPOP can drop the request
        Redis has just handed over, and its caller would wait for an answer that never comes."""
        # Its own list first: requests for the accounts this host owns (see telegram.rpc).
        # Its own list, then its host's (logins placed on this host as the least-loaded:
        # `_placed_elsewhere`), then the shared one.
        own = [redis_keys.host_requests(self._sessions.worker_name), redis_keys.host_requests(self._host_id)]
        shared = redis_keys.TELEGRAM_REQUESTS
        delay = REQUESTS_RETRY_FIRST
        while self._taking_requests:
            # A draining host takes no new accounts: only the requests for those it still owns.
            lists = own if self._sessions.draining else [*own, shared]
            # A Redis outage must not end the loop: the host would answer nothing until restarted.
            try:
                item = await client.blpop(lists, timeout=1)
            except REDIS_DOWN as exc:
                log.warning("account requests: Redis unreachable, retrying", error=type(exc).__name__,
                            retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REQUESTS_RETRY_CAP)
                continue
            delay = REQUESTS_RETRY_FIRST
            if item is None:
                continue
            request = rpc.open_request(self._auth, item[1])
            if request is None:
                continue
            if request["deadline"] < time.time():
                continue  # nobody waits for this answer any more (and a replay of it does nothing)
            try:
                claimed = await rpc.claim(self._redis, self._auth, request)
            except REDIS_DOWN as exc:
                log.warning("account request dropped: Redis unreachable to take it", error=type(exc).__name__)
                continue
            if not claimed:
                continue
            if item[0] in (shared, shared.encode()) and await self._placed_elsewhere(request):
                continue
            task = asyncio.create_task(self._answer(request))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _placed_elsewhere(self, request: dict[str, Any]) -> bool:
        """A login from the shared list for an account no live host owns is placed on the
        least-loaded live host (queue/routing.py): forwarded there unless that is this host."""
        if request.get("op") != "login" or request.get("forwarded"):
            return False
        try:
            account_id = int(request["account_id"])
            if (await routing.find_owner(self._redis, self._pool, account_id)).host is not None:
                return False  # owned by a live host: the usual forward on OwnedElsewhere applies
            loads = await routing.host_loads(self._pool, self._redis, gone_after=self._gone_after)
            target = routing.least_loaded(loads)
            if target is None or target == self._host_id:
                return False
            await rpc.forward(self._redis, self._auth, request, target)
        except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:
            log.warning("login not placed: answered here", error=type(exc).__name__)
            return False
        return True

    def stop_taking_requests(self) -> None:
        """`serve_requests` returns after its current BLPOP (at most a second)."""
        self._taking_requests = False

    async def finish_answers(self, deadline: float) -> None:
        """Let the requests in hand be answered until `deadline` (a login answers within
        LOGIN_ANSWER_SECONDS), before the sessions they use are closed; cancel what is left."""
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=max(0.0, deadline - time.monotonic()))
        await cancel_and_wait(list(self._answering))

    async def hand_back_requests(self, redis: aioredis.Redis) -> int:
        """Requests routed to this host after it stopped taking them go to the shared list, where the
        next host takes them (run once the leases and the heartbeat are gone: nothing routes here then)."""
        moved = 0
        own = redis_keys.host_requests(self._sessions.worker_name)
        while await redis.lmove(own, redis_keys.TELEGRAM_REQUESTS, "LEFT", "RIGHT"):
            moved += 1
        return moved

    async def _handed_over(self, request: dict[str, Any]) -> bool:
        """A move to another host, taken here (the owner, or any host when none owns the account):
        close the account here if it is open and hand the request to the target host. A hand-over
        that reached its target is opened there (`handle_request`), never handed on again."""
        if request.get("op") != "move" or request.get("forwarded") == rpc.HANDED_OVER:
            return False
        target = str(request.get("args", {}).get("to", ""))
        if target == self._sessions.host_id:
            return False
        await self._sessions.hand_over(int(request["account_id"]), target, request)
        return True

    async def _answer(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any]
        op = request.get("op", "")
        with structlog.contextvars.bound_contextvars(account_id=request.get("account_id"), op=request.get("op")):
            try:
                if await self._handed_over(request):
                    return  # the target host answers
                reply = {"result": await self.handle_request(request)}
            except OwnedElsewhere as exc:
                if not request.get("forwarded") and await rpc.is_live_host(self._redis, exc.owner):
                    await rpc.forward(self._redis, self._auth, request, exc.owner)  # the owner answers
                    return
                reply = _error_reply(platform_error(exc, op))
            except TelegramError as exc:
                reply = _error_reply(platform_error(exc, op))
            except PlatformError as exc:
                reply = _error_reply(exc)
            except Exception as exc:
                log.exception("account request failed")
                reply = _error_reply(PlatformError(type(exc).__name__))  # 500 internal_error
        await rpc.reply(self._redis, self._auth, request["id"], reply)

"""The Telegram host: the one worker process that holds account sessions and sends through them.

It never forks (TDLib's rule), holds a lease on every account it opens, answers the API's account
requests, and runs the send jobs. PostgreSQL decides what is sent: a send first claims its row,
so a duplicated or retried job never reaches Telegram twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import events
from ..errors import Conflict, PlatformError
from ..metrics.definitions import Metrics
from ..queue.consumer import REDIS_ERRORS, JobContext, Retry
from ..settings import Settings
from ..storage import accounts as account_store
from ..storage import delivery as delivery_store
from ..storage import messages as message_store
from ..storage.db import CONNECTION_ERRORS
from ..tasks import cancel_and_wait
from ..telegram import rpc
from ..telegram.base import (
    AccountPaused,
    AuthError,
    AuthState,
    AuthStateChanged,
    IncomingMessage,
    NotAuthorized,
    OwnedElsewhere,
    PeerFlood,
    Proxy,
    RateLimited,
    RequestTimeout,
    SentMessage,
    Session,
    SessionConfig,
    TelegramBackend,
    TelegramError,
    TransientError,
    Update,
    WrongDatabaseKey,
)
from ..telegram.keys import derive_database_key, set_aside, set_aside_copies
from ..telegram.leases import LEASE_TTL_MS, Lease, LeaseManager
from .delivery import is_keyed
from .pacing import Pacers
from .spool import IncomingSpool, spool_directory
from .updates import IncomingUpdates

log = structlog.get_logger(__name__)

MAX_SEND_ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
# How long a login waits for Telegram's answer to the phone before the API hears "wait_phone,
# connecting" (offline TDLib never answers; the login goes on in the background).
LOGIN_ANSWER_SECONDS = 2.0
# getMe is answered from the client's own cache once logged in: longer means TDLib is stuck, and the
# update that asked must not hold every other account's updates behind it.
IDENTITY_SECONDS = 5.0
# PEER_FLOOD stops cold sends (to peers the account never wrote to nor heard from) this long.
PEER_FLOOD_SECONDS = 86_400.0
# After a crash, a restarted host waits out the dead owner's leases: this many tries, each after
# the lease's remaining time.
RESUME_ROUNDS = 3
# Accounts opened at once when resuming (a TDLib client's first request blocks the loop ~0.5 ms).
RESUME_CONCURRENCY = 32
# Leases are renewed this often (worker/child.py), each renewal given at most LEASE_RENEW_TIMEOUT:
# a Redis that does not answer must not hold the check up until its lease has run out.
LEASE_RENEW_SECONDS = 5.0
LEASE_RENEW_TIMEOUT = 3.0
# Logged-in accounts nobody hosts (a lease lost or let go in an outage, a host gone) are looked
# for this often; one that fails to open is tried again after a back-off up to ORPHAN_RETRY_CAP.
ORPHAN_SCAN_SECONDS = 15.0
ORPHAN_RETRY_CAP = 300.0
# Accounts listed by name in the published stats, at most (the counts are always complete).
STATS_LISTED_ACCOUNTS = 100
# The account-request loop waits this long after Redis fails it, doubling up to the cap.
REQUESTS_RETRY_FIRST = 0.25
REQUESTS_RETRY_CAP = 4.0
# The state each login step answers. A step the session is not at conflicts with its state (409,
# as a campaign's wrong move does) instead of going to Telegram, whose refusal would read as a
# wrong code or password (422).
STEP_STATES = {"code": AuthState.WAIT_CODE, "password": AuthState.WAIT_PASSWORD,
               "register": AuthState.WAIT_REGISTRATION}
# The states of a hosted session that a new login ("login_again") replaces: its session has ended.
# Any other (logged in, or a login under way) conflicts.
ENDED_STATES = frozenset({AuthState.LOGGED_OUT, AuthState.FAILED, AuthState.CLOSED})
# Stored states of an account the platform knows as logged in: only these are opened to send.
LOGGED_IN_STATES = frozenset({AuthState.READY.value, AuthState.CLOSED.value})


@dataclass
class HostedAccount:
    session: Session
    lease: Lease
    # time.time() values: no send before paused_until (429), no cold send before peer_flood_until.
    paused_until: float = 0.0
    peer_flood_until: float = 0.0
    # One send at a time per account: once a 429 is answered, no other send of it is in flight.
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # time.monotonic() when the last renewal that Redis confirmed was sent: the lease cannot expire
    # before this plus its TTL, and may right after.
    lease_confirmed_at: float = 0.0


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Exponential back-off with "equal jitter": half fixed, half random, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


class TelegramHost:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis,
                 backend: TelegramBackend, *, worker_name: str, metrics: Metrics | None = None,
                 lease_ttl_ms: int = LEASE_TTL_MS) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self.backend = backend
        self.worker_name = worker_name
        self._leases = LeaseManager(redis, owner=worker_name, ttl_ms=lease_ttl_ms)
        self._accounts: dict[int, HostedAccount] = {}
        self._opening: dict[int, asyncio.Lock] = {}
        self._rng = random.Random()
        self._answering: set[asyncio.Task[None]] = set()
        self._taking_requests = True
        self._metrics = metrics  # sends and flood waits are counted by the instrumented backend
        # Campaign pacing per account; ad-hoc sends are counted in it (worker/pacing.py).
        self.pacers = Pacers(pool)
        # Does the backend carry our random_id, so a re-send is safe? (worker/delivery.py)
        self.keyed = is_keyed(backend)
        # Messages this process claimed (`sending`) whose outcome it could not record: the
        # abandoned-sends task settles them (worker/delivery.py), as it does a stopped worker's.
        self.unrecorded: set[int] = set()
        self.incoming = IncomingUpdates(pool, redis, spool=IncomingSpool(spool_directory(settings.var_dir)),
                                        log_length=settings.event_log_length)
        # The owner token (storage/accounts.py) each account was last opened here with; kept after a
        # close, so a closing session's last states are written, and refused once another host owns it.
        self._owner_tokens: dict[int, int] = {}
        # Accounts that failed to open in an orphan scan: (failures, monotonic time of the next try).
        self._orphan_retries: dict[int, tuple[int, float]] = {}

    async def publish(self, event_type: str, data: dict[str, Any]) -> None:
        """An event of this host's accounts or sends, into the log kept as long as TP_EVENT_LOG_LENGTH."""
        await events.publish(self._redis, event_type, data, log_length=self._settings.event_log_length)

    # -- updates from the backend ----------------------------------------------------------------

    async def on_update(self, update: Update) -> None:
        """Store what the API needs and publish it as an event (state changes here, in order;
        incoming messages through the `updates` queue, which retries: worker/updates.py)."""
        if isinstance(update, IncomingMessage):
            await self.incoming.accept(update)  # stored and published by the `updates` queue
            return
        owner_token = self._owner_tokens.get(update.account_id)
        if owner_token is None:  # never opened here: not this host's to write
            log.warning("state update of an account not hosted here ignored", account_id=update.account_id)
            return
        if isinstance(update, AuthStateChanged):
            # Only a logged-in account is "closed" (resumed at the next start); one closed mid-login
            # keeps its step, so a restart does not ask Telegram for a new code by itself.
            only_from = "ready" if update.state is AuthState.CLOSED else None
            written = await account_store.set_auth_state(self._pool, update.account_id, update.state.value,
                                                         owner_token=owner_token, only_from=only_from)
            change: dict[str, Any] = {"auth_state": update.state.value}
            # Why a session failed or was logged out at Telegram; one that is READY again has no error.
            if written and (update.reason is not None or update.state is AuthState.READY) and \
                    await account_store.set_last_error(self._pool, update.account_id, update.reason,
                                                       owner_token=owner_token):
                change["last_error"] = update.reason
        else:  # ConnectionStateChanged
            written = await account_store.set_connection_state(self._pool, update.account_id, update.state.value,
                                                               owner_token=owner_token)
            change = {"connection_state": update.state.value}
        if written:
            await self.publish("account.state", {"account_id": update.account_id, **change})
            if isinstance(update, AuthStateChanged) and update.state is AuthState.READY:
                await self._record_identity(update.account_id)  # a resumed start, or a login
        else:
            # Another host took the account (this one lost its lease without noticing yet): what
            # this session saw is no longer the account's state. renew_leases closes it.
            log.warning("state write refused: the account has a newer owner", account_id=update.account_id)

    # -- sessions ----------------------------------------------------------------------------------

    async def open(self, account_id: int, *, restart: bool = False, set_aside_database: bool = False) -> HostedAccount:
        """Open (or return) the account's session, holding its lease; `restart` starts a fresh login,
        from an empty database when the account's is first set aside (`keys.set_aside`)."""
        lock = self._opening.setdefault(account_id, asyncio.Lock())
        async with lock:
            hosted = self._accounts.get(account_id)
            if hosted is not None and not restart:
                return hosted
            if hosted is not None:
                await self._close_account(account_id)
            asked_at = time.monotonic()
            lease = await self._leases.acquire(account_id)
            try:
                if set_aside_database:  # under the lease: no client of this account is open anywhere
                    kept = set_aside(self.backend.database_dir(account_id))
                    log.warning("account database set aside; a new login starts", account_id=account_id,
                                kept=str(kept) if kept else None)
                # Before the session can report a state: its writes carry this owner's token.
                self._owner_tokens[account_id] = await account_store.take_ownership(self._pool, account_id)
                account = await account_store.get_account(self._pool, account_id)
                proxy = Proxy(**account["proxy"]) if account.get("proxy") else None
                config = SessionConfig(
                    account_id=account_id, phone=account["phone"],
                    database_key=derive_database_key(self._settings.encryption_key, account_id), proxy=proxy)
                session = await self.backend.open_session(config)
            except BaseException:
                await self._leases.release(lease)
                raise
            hosted = HostedAccount(session, lease, paused_until=_epoch(account.get("paused_until")),
                                   peer_flood_until=_epoch(account.get("peer_flood_until")),
                                   lease_confirmed_at=asked_at)
            self._accounts[account_id] = hosted
            try:
                await session.start(phone_timeout=LOGIN_ANSWER_SECONDS)
            except BaseException:
                self._accounts.pop(account_id, None)
                try:  # the client goes before the lease: never two clients of one account
                    with contextlib.suppress(TelegramError):
                        await session.close()
                finally:
                    await self._leases.release(lease)
                raise
            return hosted

    async def open_for_sending(self, account_id: int) -> HostedAccount:
        """The account's session for a send, opened if need be, but only for an account stored as
        logged in (ready, or closed by a restart). Opening one whose login ended, or never finished,
        would start a login, and Telegram would text its owner a code nobody asked for."""
        hosted = self._accounts.get(account_id)
        if hosted is not None:
            return hosted
        state = (await account_store.get_account(self._pool, account_id))["auth_state"]
        if state not in LOGGED_IN_STATES:
            raise NotAuthorized(AuthState(state))
        return await self.open(account_id)

    async def _login_again(self, account_id: int, *, set_aside_database: bool = False) -> HostedAccount:
        """A new login for an account whose session ended (logged out at Telegram, failed, closed);
        one logged in or mid-login conflicts with its state. Not hosted here, it is opened: that
        resumes what its database holds (a login, or a step reached), or starts the login.

        `set_aside_database` is for a database that no longer opens (ENCRYPTION_KEY changed) or a
        session that ended: it is set aside and the login starts from an empty one. A database that
        opens to a live session (a login, or a step reached) is never set aside: the answer is then
        what it would be without the flag."""
        current = self._accounts.get(account_id)
        if current is None:
            try:
                current = await self.open(account_id)
            except WrongDatabaseKey:
                if not set_aside_database:
                    raise
                return await self.open(account_id, restart=True, set_aside_database=True)
            if not set_aside_database or current.session.auth_state not in ENDED_STATES:
                return current
        elif current.session.auth_state not in ENDED_STATES:
            state = current.session.auth_state
            raise Conflict(f"the account's session has not ended: its auth_state is {state.value}",
                           details={"auth_state": state.value})
        return await self.open(account_id, restart=True, set_aside_database=set_aside_database)

    async def _record_identity(self, account_id: int) -> None:
        """The logged-in account's Telegram user id into its row, with an account.state event when
        it is new: the id operators match against what they see in Telegram."""
        hosted, owner_token = self._accounts.get(account_id), self._owner_tokens.get(account_id)
        if hosted is None or owner_token is None or hosted.session.auth_state is not AuthState.READY:
            return
        try:
            async with asyncio.timeout(IDENTITY_SECONDS):
                user_id = await hosted.session.me()
        except (TelegramError, TimeoutError) as exc:  # the next READY asks again
            log.warning("telegram user id not learned", account_id=account_id, error=type(exc).__name__)
            return
        if await account_store.set_telegram_user_id(self._pool, account_id, user_id, owner_token=owner_token):
            await self.publish("account.state", {"account_id": account_id, "telegram_user_id": user_id})

    async def _close_account(self, account_id: int) -> None:
        hosted = self._accounts.pop(account_id, None)
        if hosted is not None:
            try:
                await hosted.session.close()
            finally:
                await self._leases.release(hosted.lease)

    async def resume_ready_accounts(self) -> int:
        """Reopen every logged-in account after a restart (no new login needed).

        An account still leased by a dead owner (a crash leaves its leases behind) is tried again once
        the lease has expired; one a live host renews stays with it.
        """
        rows = await self._pool.fetch("SELECT id FROM accounts WHERE auth_state IN ('ready', 'closed')")
        waiting = [int(row["id"]) for row in rows]
        resumed = 0
        opening = asyncio.Semaphore(RESUME_CONCURRENCY)
        for round_ in range(RESUME_ROUNDS):
            results = await asyncio.gather(*(self._resume(a, opening) for a in waiting))
            resumed += sum(1 for r in results if r)
            waiting = [a for a, r in zip(waiting, results, strict=True) if r is None]
            if not waiting or round_ == RESUME_ROUNDS - 1:
                break
            expiry = max([await self._leases.expires_in(a) for a in waiting])
            await asyncio.sleep(expiry + 0.1)
        if waiting:
            log.info("accounts left to their owners", count=len(waiting))
        return resumed

    async def resume_orphaned_accounts(self) -> int:
        """Open the logged-in accounts no process hosts (their lease is free): every
        ORPHAN_SCAN_SECONDS, so that an account whose session closed in an outage (or whose host
        stopped) is served again without a restart or a send to wake it. Returns how many opened."""
        rows = await self._pool.fetch("SELECT id FROM accounts WHERE auth_state IN ('ready', 'closed')")
        now = time.monotonic()
        candidates = [account_id for account_id in (int(row["id"]) for row in rows)
                      if account_id not in self._accounts
                      and self._orphan_retries.get(account_id, (0, 0.0))[1] <= now]
        owners = await self._leases.owners_of(candidates)
        orphans = [account_id for account_id, owner in zip(candidates, owners, strict=True) if owner is None]
        opening = asyncio.Semaphore(RESUME_CONCURRENCY)
        results = await asyncio.gather(*(self._resume(a, opening) for a in orphans))
        for account_id, result in zip(orphans, results, strict=True):
            if result is False:
                failures = self._orphan_retries.get(account_id, (0, 0.0))[0] + 1
                delay = min(ORPHAN_RETRY_CAP, ORPHAN_SCAN_SECONDS * 2 ** failures)
                self._orphan_retries[account_id] = (failures, time.monotonic() + delay)
            else:
                self._orphan_retries.pop(account_id, None)
        opened = sum(1 for r in results if r)
        if opened:
            log.info("accounts nobody hosted opened here", count=opened)
            if self._metrics is not None:
                self._metrics.orphans_opened.inc(opened)
        return opened

    async def _resume(self, account_id: int, opening: asyncio.Semaphore) -> bool | None:
        """True: opened; None: owned elsewhere (try again later); False: failed."""
        async with opening:
            try:
                await self.open(account_id)
            except OwnedElsewhere:
                return None
            except (TelegramError, OSError) as exc:
                log.warning("account not resumed", account_id=account_id, error=str(exc))
                return False
            return True

    async def renew_leases(self) -> None:
        """Renew every lease, in one pipelined round trip.

        A lease another process holds now means that process may have the account open: its client
        closes here at once. A lease Redis lost (a restart without persistence, FLUSHALL) is set
        again, and kept if PostgreSQL shows no other owner came meanwhile (the owner token is still
        this host's); else the client closes too. And when Redis cannot confirm a lease for so long
        that it could expire before the next try, the client closes first: a lease this host
        cannot renew is one another process may take."""
        hosted_now = list(self._accounts.items())
        asked_at = time.monotonic()
        try:
            async with asyncio.timeout(LEASE_RENEW_TIMEOUT):
                statuses = await self._leases.renew_many([hosted.lease for _, hosted in hosted_now])
        except REDIS_ERRORS:  # OSError covers asyncio.timeout's TimeoutError
            await self._close_unconfirmed(hosted_now)
            raise
        for (account_id, hosted), status in zip(hosted_now, statuses, strict=True):
            if self._accounts.get(account_id) is not hosted:
                continue  # closed or reopened meanwhile
            if status == "retaken":
                # Asked once: the next renewal finds the lease "held". Unanswered counts as lost.
                try:
                    current = await account_store.owner_token_of(self._pool, account_id)
                except CONNECTION_ERRORS:  # OSError covers TimeoutError
                    current = None
                if current is not None and current == self._owner_tokens.get(account_id):
                    log.warning("lease gone from Redis, taken back (no other owner since)", account_id=account_id)
                else:
                    status = "lost"
            if status == "lost":
                log.error("lease lost, closing session", account_id=account_id)
                await self._drop_session(account_id, hosted, "lost")
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._leases.release(hosted.lease)  # only if it is ours (again): retaken above
            else:
                hosted.lease_confirmed_at = asked_at

    async def _drop_session(self, account_id: int, hosted: HostedAccount, reason: str) -> None:
        """Close a session to keep one live client per account (its lease lost or unconfirmable)."""
        if self._metrics is not None:
            self._metrics.lease_closures.labels(reason).inc()
        self._accounts.pop(account_id, None)
        with contextlib.suppress(TelegramError):
            await hosted.session.close()

    async def _close_unconfirmed(self, hosted_now: list[tuple[int, HostedAccount]]) -> None:
        """After a renewal that failed: close the sessions whose lease could expire before the next."""
        limit = max(0.0, self._leases.ttl_ms / 1000 - LEASE_RENEW_SECONDS - LEASE_RENEW_TIMEOUT - 1.0)
        now = time.monotonic()
        for account_id, hosted in hosted_now:
            unconfirmed = now - hosted.lease_confirmed_at
            if unconfirmed > limit and self._accounts.get(account_id) is hosted:
                log.error("lease unconfirmed, closing session before it can expire", account_id=account_id,
                          unconfirmed_s=round(unconfirmed, 1))
                await self._drop_session(account_id, hosted, "unconfirmed")

    async def aclose(self, deadline: float) -> None:
        """Close every session, then let go of its lease. The leases are renewed first, since the
        renewal task has stopped by now: each must outlive its client's close, or another host
        could open the account while this one still has its database open. `deadline` must fall
        within a lease's TTL of now (worker/child.py's CLOSE_SESSIONS_SECONDS)."""
        if self._accounts:
            with contextlib.suppress(*REDIS_ERRORS):  # unconfirmable: renew_leases closed them first
                await self.renew_leases()
        await self.backend.aclose(deadline)
        for hosted in list(self._accounts.values()):
            await self._leases.release(hosted.lease)
        self._accounts.clear()

    def stats(self) -> dict[str, Any]:
        """The backend's stats plus the accounts Telegram limited: what /api/tdlib/health shows."""
        now = time.time()
        stats = self.backend.stats()
        paused = sorted((h.paused_until, a) for a, h in self._accounts.items() if h.paused_until > now)
        flooded = sorted(a for a, h in self._accounts.items() if h.peer_flood_until > now)
        stats["worker"] = self.worker_name
        stats["accounts_hosted"] = len(self._accounts)
        stats["accounts_paused"] = len(paused)
        stats["paused_accounts"] = [{"account_id": a, "paused_until": round(until, 3),
                                     "retry_after": round(until - now, 3)}
                                    for until, a in paused[:STATS_LISTED_ACCOUNTS]]
        stats["accounts_peer_flood"] = len(flooded)
        stats["peer_flood_accounts"] = flooded[:STATS_LISTED_ACCOUNTS]
        stats["published_at"] = round(now, 3)
        return stats

    # -- account requests from the API ------------------------------------------------------------

    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op, account_id, args = request["op"], int(request["account_id"]), request.get("args", {})
        if op == "login":
            hosted = await self.open(account_id, restart=True)
        elif op == "login_again":
            hosted = await self._login_again(account_id, set_aside_database=bool(args.get("set_aside_database")))
        elif op == "logout":
            try:
                hosted = await self.open(account_id)
                await hosted.session.log_out()
            except OwnedElsewhere:
                raise
            except TelegramError as exc:
                # A login that never completed (or a database that no longer opens) has nothing to
                # log out at Telegram; the operator still gets the account removed.
                log.warning("logout without a live session; removing the local one", error=exc.message)
            await self._close_account(account_id)
            database = self.backend.database_dir(account_id)
            for directory in (database, *set_aside_copies(database)):  # a removed account leaves no login behind
                shutil.rmtree(directory, ignore_errors=True)
            return {"auth_state": AuthState.LOGGED_OUT.value}
        else:
            hosted = await self.open(account_id)
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
            elif op != "status":
                raise ValueError(f"unknown op {op!r}")
        auth_state = hosted.session.auth_state.value
        connection_state = hosted.session.connection_state.value
        # The caller reads the account back at once: store what it must see (updates may still queue).
        owner_token = self._owner_tokens[account_id]
        await account_store.set_auth_state(self._pool, account_id, auth_state, owner_token=owner_token)
        await account_store.set_connection_state(self._pool, account_id, connection_state, owner_token=owner_token)
        if op != "status" and auth_state == AuthState.READY.value:
            await self._record_identity(account_id)  # the READY update may still be queued (TDLib)
        return {"auth_state": auth_state, "connection_state": connection_state}

    async def serve_requests(self, client: aioredis.Redis) -> None:
        """Answer account requests until `stop_taking_requests`; `client` is a connection free to block.

        The loop is told to stop, not cancelled: a cancellation landing in BLPOP can drop the request
        Redis has just handed over, and its caller would wait for an answer that never comes."""
        # Its own list first: requests for the accounts this host owns (see telegram.rpc).
        lists = [rpc.host_requests_key(self.worker_name), rpc.REQUESTS_KEY]
        delay = REQUESTS_RETRY_FIRST
        while self._taking_requests:
            # A Redis outage must not end the loop: the host would answer nothing until restarted.
            try:
                item = await client.blpop(lists, timeout=1)
            except REDIS_ERRORS as exc:
                log.warning("account requests: Redis unreachable, retrying", error=type(exc).__name__,
                            retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REQUESTS_RETRY_CAP)
                continue
            delay = REQUESTS_RETRY_FIRST
            if item is None:
                continue
            try:
                request = json.loads(item[1])
                expired = request["deadline"] < time.time()
            except (ValueError, KeyError, TypeError):
                log.error("account request dropped: not a request", size=len(item[1]))
                continue
            if expired:
                continue  # nobody waits for this answer any more
            task = asyncio.create_task(self._answer(request))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

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
        while await redis.lmove(rpc.host_requests_key(self.worker_name), rpc.REQUESTS_KEY, "LEFT", "RIGHT"):
            moved += 1
        return moved

    async def _answer(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any]
        with structlog.contextvars.bound_contextvars(account_id=request.get("account_id"), op=request.get("op")):
            try:
                reply = {"result": await self.handle_request(request)}
            except OwnedElsewhere as exc:
                if not request.get("forwarded") and await rpc.is_live_host(self._redis, exc.owner):
                    await rpc.forward(self._redis, request, exc.owner)  # the owner answers
                    return
                reply = {"error": {"status": 409, "code": "owned_elsewhere", "message": str(exc),
                                   "details": {"owner": exc.owner}}}
            except WrongDatabaseKey as exc:
                reply = {"error": {"status": 409, "code": "wrong_database_key", "details": {"auth_state": "failed"},
                                   "message": f"{exc.message}: the account's database does not open with this "
                                              "ENCRYPTION_KEY. Restore the key it was made with, or log in again "
                                              "with set_aside_database=true (the old database is kept on disk)"}}
            except AuthError as exc:
                reply = {"error": {"status": 422, "code": "auth_rejected", "message": exc.message,
                                   "details": {"field": _auth_field(request.get("op", ""))}}}
            except PlatformError as exc:
                reply = {"error": {"status": exc.status, "code": exc.code, "message": exc.message,
                                   "details": exc.details}}
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
        """The `send_message` job: claim the message, send it, record the outcome."""
        row = await message_store.claim_for_send(self._pool, message_id, self.worker_name)
        if row is None:
            return  # sent, cancelled, claimed by another job, or not due yet: nothing to do
        structlog.contextvars.bind_contextvars(message_id=message_id, account_id=row["account_id"])
        if row.get("campaign_id") is None:
            # Sent on request, never delayed by the account's campaign limits, but counted in them.
            (await self.pacers.get(row["account_id"])).reserve(row["peer"])
        delay = await self.deliver(row)
        if delay is not None:
            raise Retry(delay, row.get("error") or "requeued")

    async def deliver(self, row: dict[str, Any]) -> float | None:
        """Send a claimed (`sending`) message and record its outcome; publishes `message.status`.

        Returns None when the outcome is final (sent or failed), else the delay after which the
        message, back to `queued`, is due again. On a keyed backend (worker/delivery.py) every attempt
        carries the message's random_id, so an unanswered one is retried safely; elsewhere it is
        recorded as `failed`, error_class `unknown`.
        """
        try:
            return await self._deliver(row)
        except BaseException:
            # Left `sending` under this live worker's name (a database error, a cancellation), unless
            # it was recorded before the error: settled as a stopped worker's send would be.
            self.unrecorded.add(row["id"])
            raise

    async def _deliver(self, row: dict[str, Any]) -> float | None:
        message_id, account_id = row["id"], row["account_id"]
        campaign_id = row.get("campaign_id")
        random_id = row.get("random_id") if self.keyed else None
        try:
            try:
                hosted = await self.open_for_sending(account_id)
            except (*REDIS_ERRORS, *CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                # Nothing has reached Telegram: a retry is safe on any backend.
                return await self._requeue(row, backoff_delay(row["attempts"], self._rng),
                                           f"account not opened: {type(exc).__name__}", "transient")
            await self._publish_status(message_id, "sending", account_id, campaign_id=campaign_id)
            sent = await self.send_text(hosted, row["peer"], row["text"], random_id=random_id)
        except RateLimited as exc:  # a 429 now, or an earlier one not waited out yet (AccountPaused)
            return await self._requeue(row, exc.retry_after, exc.message, "rate_limited")
        except PeerFlood as exc:  # answered now, or a cold send refused while the account is flooded
            if campaign_id is not None:
                # Nothing was sent: the campaign hands the message to another of its accounts.
                return await self._requeue(row, 0.0, exc.message, "rate_limited")
            await self._fail(message_id, account_id, exc.message, exc.error_class, campaign_id)
        except RequestTimeout as exc:
            # No confirmation: it may still be delivered (TDLib keeps it queued and re-sends it after
            # a restart). Only a re-send with the same random_id is safe; without one, record it.
            if random_id is not None and row["attempts"] < MAX_SEND_ATTEMPTS:
                delay = backoff_delay(row["attempts"], self._rng)
                await delivery_store.requeue_unknown(self._pool, message_id, delay, f"outcome unknown: {exc.message}")
                await self._publish_status(message_id, "queued", account_id, exc.message, campaign_id=campaign_id)
                return delay
            await delivery_store.fail_unknown(self._pool, message_id, f"outcome unknown: {exc.message}")
            if self._metrics is not None:
                self._metrics.message_failed("unknown")
            await self._publish_status(message_id, "failed", account_id, exc.message, campaign_id=campaign_id)
        except (TransientError, OwnedElsewhere) as exc:
            if row["attempts"] >= MAX_SEND_ATTEMPTS:
                await self._fail(message_id, account_id, exc.message, "transient", campaign_id)
                return None
            return await self._requeue(row, backoff_delay(row["attempts"], self._rng), exc.message, "transient")
        except NotAuthorized as exc:
            await self._fail(message_id, account_id, exc.message, exc.error_class, campaign_id)
        except TelegramError as exc:
            if random_id is not None and "RANDOM_ID_DUPLICATE" in exc.message.upper():
                # Telegram already holds a message with this random_id: an earlier attempt went through.
                await delivery_store.mark_sent_without_id(self._pool, message_id)
                await self._publish_status(message_id, "sent", account_id, campaign_id=campaign_id)
                return None
            await self._fail(message_id, account_id, exc.message, exc.error_class, campaign_id)
        else:
            await message_store.mark_sent(self._pool, message_id, sent.telegram_message_id)
            await self._publish_status(message_id, "sent", account_id, campaign_id=campaign_id,
                                       telegram_message_id=sent.telegram_message_id)
        return None

    async def _requeue(self, row: dict[str, Any], delay: float, error: str, error_class: str) -> float | None:
        """Back to `queued`, due after `delay` (returned); None when its campaign was cancelled
        meanwhile, which cancels it instead."""
        status = await message_store.requeue(self._pool, row["id"], delay, error, error_class)
        if status == "cancelled":
            await self._publish_status(row["id"], "cancelled", row["account_id"], "campaign cancelled",
                                       campaign_id=row.get("campaign_id"))
            return None
        await self._publish_status(row["id"], "queued", row["account_id"], error, campaign_id=row.get("campaign_id"))
        row["error"] = error
        return delay

    async def send_text(self, hosted: HostedAccount, peer: str, text: str, *,
                        random_id: int | None = None) -> SentMessage:
        """Send through the account's session, obeying what Telegram said before.

        No attempt while a 429's "retry after" runs (AccountPaused, nothing sent), none to a cold peer
        while PEER_FLOOD holds (PeerFlood, nothing sent), and one send at a time per account, so no
        send of it is in flight once a 429 is answered. A 429 pauses the account; a PEER_FLOOD stops
        its cold sends for PEER_FLOOD_SECONDS; both are stored (accounts.paused_until /
        peer_flood_until) and show in stats().
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
                if random_id is not None:  # a keyed backend (worker/delivery.py): Telegram drops a re-send
                    keyed_session: Any = hosted.session  # the Session protocol has no random_id (TDLib)
                    sent: SentMessage = await keyed_session.send_text(peer, text, random_id=str(random_id))
                    return sent
                return await hosted.session.send_text(peer, text)
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
        hosted = self._accounts.get(account_id)
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
        await self.publish("account.state", {"account_id": account_id, field: row["until"],
                                             "last_error": row["last_error"]})

    async def _fail(self, message_id: int, account_id: int, error: str, error_class: str,
                    campaign_id: int | None = None) -> None:
        await message_store.mark_failed(self._pool, message_id, error, error_class)
        if self._metrics is not None:
            self._metrics.message_failed(error_class)
        await self._publish_status(message_id, "failed", account_id, error, campaign_id=campaign_id)

    async def _publish_status(self, message_id: int, status: str, account_id: int, error: str | None = None,
                              telegram_message_id: int | None = None, campaign_id: int | None = None) -> None:
        data: dict[str, Any] = {"message_id": message_id, "status": status, "account_id": account_id}
        if campaign_id is not None:
            data["campaign_id"] = campaign_id
        if error:
            data["error"] = error
        if telegram_message_id is not None:
            data["telegram_message_id"] = telegram_message_id
        try:
            await self.publish("message.status", data)
        except REDIS_ERRORS as exc:
            # The message's state is in PostgreSQL (the API reads it there); a send must not stop,
            # or be left half-recorded, because Redis is away. The event itself is lost.
            log.warning("message.status event not published: Redis unreachable", message_id=message_id,
                        status=status, error=type(exc).__name__)


def _epoch(value: Any) -> float:
    """A stored timestamptz (datetime or None) as time.time() seconds."""
    return float(value.timestamp()) if value is not None else 0.0


def _auth_field(op: str) -> str:
    return {"code": "code", "password": "password", "register": "first_name", "login": "phone",
            "login_again": "phone"}.get(op, op)

"""Account sessions: the Telegram clients this worker process hosts, one per account, each under a lease.

It never forks (TDLib's rule) and holds a lease on every account it opens, so no account has two
live clients in the deployment: it opens, closes and resumes sessions (after a restart, and those
nobody hosts), renews their leases and closes any whose lease is lost, writes what the backend
reports (auth and connection states, the account's Telegram user id) under the account's owner
token, and publishes it as `account.state` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from .. import events
from ..errors import Conflict
from ..metrics.definitions import Metrics
from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..queue import routing
from ..redis_auth import RedisAuth
from ..redis_keys import host_alive
from ..settings import Settings
from ..states import HostState
from ..storage import accounts as account_store
from ..storage import hosts as host_store
from ..telegram import rpc
from ..telegram.base import (
    AuthState,
    AuthStateChanged,
    IncomingEdited,
    IncomingMessage,
    MessagesDeleted,
    NotAuthorized,
    OwnedElsewhere,
    Proxy,
    ReadOutbox,
    Session,
    SessionConfig,
    TelegramBackend,
    TelegramError,
    Update,
    WrongDatabaseKey,
)
from ..telegram.keys import derive_database_key, set_aside
from ..telegram.leases import LEASE_TTL_MS, Lease, LeaseManager
from .spool import IncomingSpool, spool_directory
from .tdstate import StateSnapshots
from .updates import IncomingUpdates

log = structlog.get_logger(__name__)

# How long a login waits for Telegram's answer to the phone before the API hears "wait_phone,
# connecting" (offline TDLib never answers; the login goes on in the background).
LOGIN_ANSWER_SECONDS = 2.0
# getMe is answered from the client's own cache once logged in: longer means TDLib is stuck, and the
# update that asked must not hold every other account's updates behind it.
IDENTITY_SECONDS = 5.0
# After a crash, a restarted host waits out the dead owner's leases: this many tries, each after
# the lease's remaining time.
RESUME_ROUNDS = 3
# Accounts opened at once when resuming (a TDLib client's first request blocks the loop a moment).
RESUME_CONCURRENCY = 32
# Leases are renewed this often (worker/child.py), each renewal given at most LEASE_RENEW_TIMEOUT:
# a Redis that does not answer must not hold the check up until its lease has run out. A renewal
# that failed is tried again after LEASE_RETRY_SECONDS.
LEASE_RENEW_SECONDS = 5.0
LEASE_RENEW_TIMEOUT = 3.0
LEASE_RETRY_SECONDS = 1.0
# Logged-in accounts nobody hosts (a lease lost or let go in an outage, a host gone) are looked
# for this often; one that fails to open is tried again after a back-off up to ORPHAN_RETRY_CAP.
ORPHAN_SCAN_SECONDS = 15.0
ORPHAN_RETRY_CAP = 300.0
# Accounts listed by name in the published stats, at most (the counts are always complete).
STATS_LISTED_ACCOUNTS = 100
# The states of a hosted session that a new login ("login_again") replaces: its session has ended.
# Any other (logged in, or a login under way) conflicts.
ENDED_STATES = frozenset({AuthState.LOGGED_OUT, AuthState.FAILED, AuthState.CLOSED})
# Stored states of an account the platform knows as logged in: only these are opened to send.
LOGGED_IN_STATES = frozenset({AuthState.READY.value, AuthState.CLOSED.value})
# State snapshots written at once: a thousand accounts resumed together must not each hold a
# connection of the pool (tdstate.py).
SNAPSHOT_CONCURRENCY = 16
# At a stop, the snapshots after the clients closed get what is left of the close's deadline, at
# least this: they are fenced by the owner token, so running late is safe, only slower.
SNAPSHOT_AT_CLOSE_SECONDS = 2.0
# TDLib writes its binlog a moment after it reports what changed: the snapshot at READY is taken
# again this much later, which costs no write when nothing changed meanwhile.
READY_SNAPSHOT_AGAIN_SECONDS = 1.0
# How often a worker child reads whether its host is draining (one single-row read).
DRAIN_CHECK_SECONDS = 2.0
# An account this host moved away is left out of its own orphan scan this long: the target host
# opens it within a moment, and this host must not take it back in between.
MOVED_AWAY_SECONDS = 60.0
# Accounts handed off at once when the host stops (each a close, a snapshot and the target's open).
HAND_OFF_CONCURRENCY = 8
# What a snapshot that fails may raise: the session goes on without it.
_SNAPSHOT_FAILURES: tuple[type[BaseException], ...] = (*POSTGRES_DOWN, TelegramError)

@dataclass
class HostedAccount:
    """An open session, its lease, and the holds Telegram put on its sends (worker/sender.py)."""

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


class AccountSessions:
    """The sessions this process hosts (by account id), with their leases and owner tokens."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis,
                 backend: TelegramBackend, *, worker_name: str, metrics: Metrics | None = None,
                 lease_ttl_ms: int = LEASE_TTL_MS) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self.backend = backend
        self.worker_name = worker_name
        self.gone_after = settings.host.gone_after
        self._leases = LeaseManager(redis, owner=worker_name, ttl_ms=lease_ttl_ms)
        self._accounts: dict[int, HostedAccount] = {}
        self._opening: dict[int, asyncio.Lock] = {}
        self._metrics = metrics  # sends and flood waits are counted by the instrumented backend
        # This process's MACs and seals for what crosses Redis (events, account requests).
        self.redis_auth = RedisAuth(settings.encryption_key,
                                    count_refused=metrics.count_redis_refused if metrics is not None else None)
        # This process's events, batched across concurrent sends (events.Publisher).
        self.events = events.Publisher(redis, self.redis_auth, log_length=settings.events.log_length)
        self.incoming = IncomingUpdates(pool, redis, self.redis_auth,
                                        spool=IncomingSpool(spool_directory(settings.var_dir)),
                                        log_length=settings.events.log_length)
        # The owner token (storage/accounts.py) each account was last opened here with; kept after a
        # close, so a closing session's last states are written, and refused once another host owns it.
        self._owner_tokens: dict[int, int] = {}
        # Accounts whose session was dropped for a lease lost or unconfirmed (`_drop_session`), until
        # opened here again: another host may own them, and in an outage a state write would only hang.
        self._dropped: set[int] = set()
        # Accounts that failed to open in an orphan scan: (failures, monotonic time of the next try).
        self._orphan_retries: dict[int, tuple[int, float]] = {}
        # Each account's Telegram state in PostgreSQL, so that any host can take it over (tdstate.py).
        self.state = StateSnapshots(pool, settings.encryption_key, backend)
        self._snapshots_later: set[asyncio.Task[None]] = set()
        self._snapshot_slots = asyncio.Semaphore(SNAPSHOT_CONCURRENCY)
        # This host is draining (hosts.draining_since, read by `drain`): it takes no new accounts.
        self.draining = False
        # Accounts handed to another host: monotonic time until which the orphan scan leaves them.
        self._moved_away: dict[int, float] = {}
        # This process is stopping with its host (`hand_off`): it opens no account any more.
        self.leaving = False
        # ... and other live hosts were there to take its accounts: what is left is not kept.
        self.handing_off = False

    @property
    def settings(self) -> Settings:
        return self._settings

    async def publish(self, event_type: str, data: dict[str, Any]) -> None:
        """An event of this host's accounts (or campaigns), into the log kept as long as TP_EVENT_LOG_LENGTH."""
        await self.events.publish(event_type, data)

    @property
    def host_id(self) -> str:
        """TP_HOST_ID of this host."""
        return self._settings.host.id

    @property
    def member(self) -> str:
        """This child's pool slot (queue/routing.py): what sends are routed and accounts placed to."""
        return routing.slot_of(self.worker_name)

    def hosted_count(self) -> int:
        """How many sessions are open here: this child's load, published with its heartbeat."""
        return len(self._accounts)

    def hosted(self, account_id: int) -> HostedAccount | None:
        """The account's session if it is open here, without opening it."""
        return self._accounts.get(account_id)

    def owner_token(self, account_id: int) -> int:
        """The owner token the account was last opened here with (KeyError: never opened here)."""
        return self._owner_tokens[account_id]

    # -- updates from the backend ----------------------------------------------------------------

    async def on_update(self, update: Update) -> None:
        """Store what the API needs and publish it as an event (state changes here, in order;
        incoming messages through the `updates` queue, which retries: worker/updates.py)."""
        if isinstance(update, IncomingMessage):
            await self.incoming.accept(update)  # stored and published by the `updates` queue
            return
        if isinstance(update, IncomingEdited | MessagesDeleted | ReadOutbox):
            await self.incoming.accept_change(update)  # recorded by the `updates` queue, in order
            return
        owner_token = self._owner_tokens.get(update.account_id)
        if owner_token is None:  # never opened here: not this host's to write
            log.warning("state update of an account not hosted here ignored", account_id=update.account_id)
            return
        if update.account_id in self._dropped:  # its lease lost: its last states are not the account's
            return
        if isinstance(update, AuthStateChanged):
            # Only a logged-in account is "closed" (resumed at the next start); one closed mid-login
            # keeps its step, so a restart does not ask Telegram for a new code by itself.
            only_from = AuthState.READY if update.state is AuthState.CLOSED else None
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
                # A login: from now on any host resumes it. Beside the updates, which one account's
                # snapshot must not hold up for the others (a thousand resumed at once).
                self._snapshot_soon(update.account_id, 0.0)
                self._snapshot_soon(update.account_id, READY_SNAPSHOT_AGAIN_SECONDS)
                await self.record_identity(update.account_id)  # a resumed start, or a login
            elif isinstance(update, AuthStateChanged) and update.state is AuthState.LOGGED_OUT:
                await self._discard_snapshot(update.account_id, owner_token)  # no host resumes it
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
                await self.close_account(account_id)
            asked_at = time.monotonic()
            lease = await self._leases.acquire(account_id)
            self._dropped.discard(account_id)
            try:
                if set_aside_database:  # under the lease: no client of this account is open anywhere
                    kept = set_aside(self.backend.database_dir(account_id))
                    log.warning("account database set aside; a new login starts", account_id=account_id,
                                kept=str(kept) if kept else None)
                # Before the session can report a state: its writes carry this owner's token.
                self._owner_tokens[account_id] = await account_store.take_ownership(self._pool, account_id,
                                                                                   self._settings.host.id)
                # Before the session opens its database: the state another host left is resumed
                # here; a login that starts over must not be resumed anywhere.
                if set_aside_database:
                    await self.state.discard(account_id, self._owner_tokens[account_id])
                else:
                    await self.state.restore(account_id)
                account = await account_store.get_account(self._pool, account_id)
                # The proxy's credentials unsealed here, for the session only (Proxy keeps them out of reprs).
                opened = await account_store.session_proxy(self._pool, self._settings.encryption_key, account_id)
                proxy = Proxy(**opened) if opened else None
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
            await self._publish_load()
            return hosted

    async def _publish_load(self) -> None:
        """This child's load for placement (queue/routing.py), at once; best effort: the heartbeat
        publishes it again within seconds (and is what publishes it after a lease lost). Bounded, as a
        Redis that stops answering must not hold an open or a close up."""
        with contextlib.suppress(*REDIS_DOWN):  # OSError covers asyncio.timeout's TimeoutError
            async with asyncio.timeout(LEASE_RENEW_TIMEOUT):
                await routing.publish_load(self._redis, self.host_id, self.worker_name, len(self._accounts))

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

    async def login_again(self, account_id: int, *, set_aside_database: bool = False) -> HostedAccount:
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

    async def record_identity(self, account_id: int) -> None:
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

    async def close_account(self, account_id: int) -> None:
        """Close the account's session here, then let go of its lease."""
        hosted = self._accounts.pop(account_id, None)
        if hosted is not None:
            try:
                await hosted.session.close()
                # The state as the closed client left it; not one whose database never opened
                # (another key): that is nobody's to hand on.
                if hosted.session.auth_state is not AuthState.FAILED:
                    await self._snapshot(account_id)
                self.state.forget(account_id)
            finally:
                await self._leases.release(hosted.lease)
            await self._let_go([account_id])
            await self._publish_load()

    async def hand_over(self, account_id: int, to_host: str, request: dict[str, Any] | None = None) -> None:
        """Move the account to `to_host`: close it here (its state snapshot taken at the close, its
        lease and ownership let go), then hand the move request (a new one when none is given) to a
        live worker child of that host, which opens it from the snapshot and answers the caller.
        Conflict when that host has no live worker child (nothing is closed then)."""
        workers = await rpc.live_workers(self._redis, to_host)
        if not workers:
            raise Conflict(f"host {to_host} has no live worker", details={"to": to_host})
        await self.close_account(account_id)
        self._moved_away[account_id] = time.monotonic() + MOVED_AWAY_SECONDS
        if request is None:
            request = {"id": uuid.uuid4().hex, "op": "move", "account_id": account_id, "args": {"to": to_host},
                       "deadline": time.time() + rpc.MOVE_SECONDS}
        await rpc.hand_over(self._redis, self.redis_auth, request, workers[account_id % len(workers)])
        log.info("account handed over", account_id=account_id, to=to_host)

    async def drain(self) -> int:
        """While this host is draining (hosts.draining_since), hand the accounts open here one by one
        to the least-loaded up hosts; returns how many were handed over. Each account goes to the up
        host owning the fewest, counting those this round sent there already."""
        host_id = self._settings.host.id
        gone_after = self._settings.host.gone_after
        self.draining = await host_store.state_of(self._pool, host_id, gone_after=gone_after) == HostState.DRAINING
        if not self.draining or not self._accounts or self.leaving:  # leaving: `hand_off` has them
            return 0
        # Up, not draining, and alive in Redis: a host that is stopping (its mark gone) takes nothing.
        loads = await routing.host_loads(self._pool, self._redis, gone_after=gone_after)
        loads.pop(host_id, None)
        moved = 0
        for account_id in sorted(self._accounts):
            if not loads:
                log.warning("draining: no up host to take the accounts", left=len(self._accounts))
                break
            target = min(sorted(loads), key=lambda h: loads[h])
            try:
                await self.hand_over(account_id, target)
            except Conflict:  # its workers stopped meanwhile: not a target this round
                loads.pop(target)
                continue
            loads[target] += 1
            moved += 1
        return moved

    async def hand_off(self, deadline: float) -> int:
        """The host is stopping (worker/child.py): hand every account open here to the other live
        hosts, each to the one owning the fewest (counting those just sent), and wait until the
        target holds it open, until `deadline` (time.monotonic()). Returns how many were taken over.
        With no other live host nothing moves: the accounts stay this host's, to resume at its next
        start. What is left at the deadline is closed by `aclose` and left to the orphan scans."""
        self.leaving = True
        try:
            loads = await routing.host_loads(self._pool, self._redis, gone_after=self.gone_after)
        except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:  # nobody to ask: kept, as if this were the only host
            log.warning("stopping: the other hosts not found, the accounts stay this host's",
                        error=type(exc).__name__)
            return 0
        loads.pop(self.host_id, None)
        if not loads:
            log.info("stopping: no other live host, the accounts stay this host's", accounts=len(self._accounts))
            return 0
        self.handing_off = True
        # No longer a target: placement, hand-offs and rebalancing pass this host over from now on
        # (the heartbeat stops renewing the mark too), and sends wait for the accounts' new owners.
        with contextlib.suppress(*REDIS_DOWN):
            await self._redis.delete(host_alive(self.host_id))
            # Nor is this child a route (its slot's mark goes too): its queue is handed back.
            await routing.mark_gone(self._redis, self.worker_name)
        if not self._accounts:
            return 0
        plan: list[tuple[int, str]] = []
        for account_id in sorted(self._accounts):
            target = routing.least_loaded(loads)
            assert target is not None
            plan.append((account_id, target))
            loads[target] += 1
        slots = asyncio.Semaphore(HAND_OFF_CONCURRENCY)
        log.info("stopping: handing the accounts off", accounts=len(plan), to=sorted(set(t for _, t in plan)),
                 deadline_s=round(deadline - time.monotonic(), 1))
        results = await asyncio.gather(*(self._hand_off_one(a, t, deadline, slots) for a, t in plan))
        taken = sum(results)
        log.info("stopping: accounts handed off", taken_over=taken, left=len(plan) - taken)
        return taken

    async def _hand_off_one(self, account_id: int, target: str, deadline: float, slots: asyncio.Semaphore) -> bool:
        """One account of `hand_off`: moved as `tp accounts move` moves it, once its send in flight
        (if any) is done; True once the target answered that it holds it open."""
        async with slots:
            left = deadline - time.monotonic()
            hosted = self._accounts.get(account_id)
            if left <= 0 or hosted is None:
                return False
            request_id = uuid.uuid4().hex
            until = time.time() + left
            request = {"id": request_id, "op": "move", "account_id": account_id, "args": {"to": target},
                       "deadline": until}
            try:
                async with asyncio.timeout(left):
                    await hosted.send_lock.acquire()  # a send under way finishes on this host first
            except TimeoutError:
                return False
            try:
                await self.hand_over(account_id, target, request)
                await rpc.wait_reply(self._redis, self.redis_auth, request_id, until, op="move", timeout=left)
            except Exception as exc:  # one account that does not move must not stop the others, nor the stop
                log.warning("account not handed off; left to the other hosts' orphan scans", account_id=account_id,
                            to=target, error=str(exc) or type(exc).__name__)
                return False
            finally:
                hosted.send_lock.release()
            log.info("account handed off", account_id=account_id, to=target)
            return True

    async def resume_ready_accounts(self) -> int:
        """Reopen this child's logged-in accounts after a start (no new login needed): those its
        slot's previous child held (a crash leaves their leases behind), its share among its host's
        children of those its host kept (a restart keeps them the host's, `aclose`), and its share of
        the others nobody keeps or holds alive. Its pool's other slots count as alive though they may
        not have announced themselves yet: children of one pool start together, and each must leave
        the others their share. An account still leased by a dead process is tried again once the
        lease has expired; one a live process holds stays with it, and one another live host keeps is
        left to it. What is left is the orphan scan's."""
        rows = await self._pool.fetch("SELECT id, owner_host FROM accounts WHERE auth_state IN ('ready', 'closed')")
        kept_elsewhere = await self._kept_by_live_hosts(rows)
        rows = [row for row in rows if int(row["id"]) not in kept_elsewhere]
        ids = [int(row["id"]) for row in rows]
        holders = await self._leases.owners_of(ids)
        live = await routing.live_holders(self._redis, {h for h in holders if h is not None})
        mine = [a for a, holder in zip(ids, holders, strict=True)
                if holder is not None and routing.slot_of(holder) == self.member]
        free = {a for a, holder in zip(ids, holders, strict=True)
                if holder is None or (holder not in live and routing.slot_of(holder) != self.member)}
        kept_here = [int(row["id"]) for row in rows if int(row["id"]) in free and row["owner_host"] == self.host_id]
        rest = free.difference(kept_here)
        others = [a for a in ids if a in rest]
        waiting = [*mine, *await self._my_share(kept_here, host_only=True, expect_siblings=True),
                   *await self._my_share(others, host_only=False, expect_siblings=True)]
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
        stopped) is served again without a restart or a send to wake it. Each live host opens only its
        fair share of them (queue/routing.py `orphan_share`), so orphans go to the least-loaded hosts
        rather than to whichever scans first. A draining host opens none, nor those it has just moved
        away. Each child is one of the live ones here: it opens its share of its host's own among its
        host's children, and its share of the others among every live child (by the loads the
        children publish with their heartbeats). Returns how many opened."""
        if self.draining or self.leaving:
            return 0
        rows = await self._pool.fetch("SELECT id, owner_host FROM accounts WHERE auth_state IN ('ready', 'closed')")
        now = time.monotonic()
        self._moved_away = {a: until for a, until in self._moved_away.items() if until > now}
        kept_elsewhere = await self._kept_by_live_hosts(rows)
        mine = {int(row["id"]) for row in rows if row["owner_host"] == self.host_id}
        candidates = [account_id for account_id in (int(row["id"]) for row in rows)
                      if account_id not in self._accounts and account_id not in self._moved_away
                      and account_id not in kept_elsewhere
                      and self._orphan_retries.get(account_id, (0, 0.0))[1] <= now]
        owners = await self._leases.owners_of(candidates)
        orphans = [account_id for account_id, owner in zip(candidates, owners, strict=True) if owner is None]
        # This host's own (kept over a restart, or a lease lost here) its children share whatever the
        # other hosts hold: they count in its load already, and no other host opens them while it is
        # alive. The others are placed: this child opens its fair share, the least-loaded the most.
        own = [a for a in orphans if a in mine]
        orphans = [*await self._my_share(own, host_only=True, expect_siblings=False),
                   *await self._my_share([a for a in orphans if a not in mine], host_only=False,
                                         expect_siblings=False)]
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

    async def _my_share(self, accounts: list[int], *, host_only: bool, expect_siblings: bool) -> list[int]:
        """This child's fair share of `accounts` (queue/routing.py `orphan_share`, in its own order,
        `spread`): among its host's live children (`host_only`) or every live child of the live hosts,
        its pool's other slots counted as live too when `expect_siblings` (they start together)."""
        if not accounts:
            return []
        if host_only:
            loads = await routing.slot_loads(self._redis, [self.host_id])
        else:
            loads = await routing.member_loads(self._pool, self._redis, gone_after=self.gone_after)
        if expect_siblings:
            for slot in routing.sibling_slots(self.member, self._settings.worker.children):
                loads.setdefault(slot, 0)
        share = routing.orphan_share(loads, self.member, len(accounts))
        return routing.spread(accounts, self.member)[:share]

    async def _kept_by_live_hosts(self, rows: list[asyncpg.Record]) -> set[int]:
        """Of these accounts (id, owner_host), those another live host keeps (`aclose` with
        `keep_ownership`: a restart): left to it, so a restart moves nothing. Live is up and not
        draining in PostgreSQL and alive in Redis (`routing.host_loads`), whose mark outlives a
        host's last heartbeat by seconds only: a host that does not come back loses them to the
        orphan scans soon after, and a draining one to them at once."""
        if not any(row["owner_host"] not in (None, self.host_id) for row in rows):
            return set()
        live = set(await routing.host_loads(self._pool, self._redis, gone_after=self.gone_after))
        live.discard(self.host_id)
        return {int(row["id"]) for row in rows if row["owner_host"] in live}

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
        except REDIS_DOWN:  # OSError covers asyncio.timeout's TimeoutError
            await self._close_unconfirmed(hosted_now)
            raise
        for (account_id, hosted), status in zip(hosted_now, statuses, strict=True):
            if self._accounts.get(account_id) is not hosted:
                continue  # closed or reopened meanwhile
            if status == "retaken":
                # Asked once: the next renewal finds the lease "held". Unanswered counts as lost.
                try:  # bounded: a database away must not hold the other renewals past their leases
                    async with asyncio.timeout(LEASE_RENEW_TIMEOUT):
                        current = await account_store.owner_token_of(self._pool, account_id)
                except POSTGRES_DOWN:  # OSError covers TimeoutError
                    current = None
                if current is not None and current == self._owner_tokens.get(account_id):
                    log.warning("lease gone from Redis, taken back (no other owner since)", account_id=account_id)
                else:
                    status = "lost"
            if status == "lost":
                log.error("lease lost, closing session", account_id=account_id)
                await self._drop_session(account_id, hosted, "lost")
                with contextlib.suppress(*REDIS_DOWN):
                    await self._leases.release(hosted.lease)  # only if it is ours (again): retaken above
            else:
                hosted.lease_confirmed_at = asked_at

    def _forsake(self, account_id: int, hosted: HostedAccount, reason: str) -> None:
        """No longer this host's session (its lease lost or unconfirmable), at once: nothing sends
        through it, counts it or writes its states from now on, before its client is closed."""
        if self._metrics is not None:
            self._metrics.lease_closures.labels(reason).inc()
        self._accounts.pop(account_id, None)
        self._dropped.add(account_id)
        self.state.forget(account_id)  # not this host's to snapshot: another may own it already

    async def _drop_session(self, account_id: int, hosted: HostedAccount, reason: str) -> None:
        """Close a session to keep one live client per account (its lease lost or unconfirmable)."""
        self._forsake(account_id, hosted, reason)
        with contextlib.suppress(TelegramError):
            await hosted.session.close()

    async def _close_unconfirmed(self, hosted_now: list[tuple[int, HostedAccount]]) -> None:
        """After a renewal that failed: close the sessions whose lease could expire before the next
        try (LEASE_RETRY_SECONDS later, with its timeout) could confirm it, with a second to spare.
        All of them are let go first and their clients closed together: in an outage (a host cut
        off) nothing a close does may wait on the servers, or the clients after it would outlive
        their leases while another host opens the same accounts."""
        limit = max(0.0, self._leases.ttl_ms / 1000 - LEASE_RETRY_SECONDS - LEASE_RENEW_TIMEOUT - 1.0)
        now = time.monotonic()
        closing: list[HostedAccount] = []
        for account_id, hosted in hosted_now:
            unconfirmed = now - hosted.lease_confirmed_at
            if unconfirmed > limit and self._accounts.get(account_id) is hosted:
                log.error("lease unconfirmed, closing session before it can expire", account_id=account_id,
                          unconfirmed_s=round(unconfirmed, 1))
                self._forsake(account_id, hosted, "unconfirmed")
                closing.append(hosted)
        if closing:
            await asyncio.gather(*(self._close_quietly(h.session) for h in closing))

    @staticmethod
    async def _close_quietly(session: Session) -> None:
        with contextlib.suppress(TelegramError):
            await session.close()

    async def aclose(self, deadline: float, *, keep_ownership: bool = True) -> None:
        """Close every session, then let go of its lease. The leases are renewed first, since the
        renewal task has stopped by now: each must outlive its client's close, or another host
        could open the account while this one still has its database open. `deadline` must fall
        within a lease's TTL of now (worker/child.py's CLOSE_SESSIONS_SECONDS).

        `keep_ownership`: the accounts stay this host's (`owner_host`) for it to resume at its next
        start (a restart, a recycled child, the only host stopping): while this host is alive the
        other hosts' orphan scans leave them. Otherwise (a stop that handed accounts off) the ones
        left are nobody's, and the other hosts open them."""
        if self._accounts:
            with contextlib.suppress(*REDIS_DOWN):  # unconfirmable: renew_leases closed them first
                await self.renew_leases()
        for task in list(self._snapshots_later):  # the snapshots below take their place
            task.cancel()
        await asyncio.gather(*self._snapshots_later, return_exceptions=True)
        await self.backend.aclose(deadline)
        # Under the leases still: the next owner resumes from what the closed clients left.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(SNAPSHOT_AT_CLOSE_SECONDS, deadline - time.monotonic())):
                await self.snapshot_hosted(logged_in_only=False)
        for hosted in list(self._accounts.values()):
            await self._leases.release(hosted.lease)
        if not keep_ownership:
            await self._let_go(list(self._accounts))
        self._accounts.clear()

    async def _let_go(self, account_ids: list[int]) -> None:
        """No host owns these accounts any more (their leases let go), as far as PostgreSQL counts
        owners (`tp hosts`). Best effort: a database that is away leaves this host named until the
        next owner takes them, which the leases allow at once."""
        with contextlib.suppress(*POSTGRES_DOWN):
            await account_store.let_go(self._pool, {a: self._owner_tokens[a] for a in account_ids
                                                    if a in self._owner_tokens})

    # -- state snapshots (tdstate.py) --------------------------------------------------------------

    async def snapshot_hosted(self, *, logged_in_only: bool = True) -> int:
        """Snapshot the state of the accounts open here (those logged in, unless told otherwise)
        that changed since their last snapshot: every TDLIB_SNAPSHOT_SECONDS, and at a stop. How
        many were written."""
        chosen = [a for a, h in self._accounts.items()
                  if h.session.auth_state is AuthState.READY
                  or (not logged_in_only and h.session.auth_state is not AuthState.FAILED)]
        return sum(await asyncio.gather(*(self._snapshot(a) for a in chosen)))

    async def _snapshot(self, account_id: int) -> bool:
        """The account's state into PostgreSQL as its owner here; a failure is logged, never raised:
        the session goes on, and the next snapshot (or the one at close) catches up."""
        owner_token = self._owner_tokens.get(account_id)
        if owner_token is None:
            return False
        try:
            async with self._snapshot_slots:
                return await self.state.take(account_id, owner_token) is not None
        except _SNAPSHOT_FAILURES as exc:
            log.warning("state snapshot not taken", account_id=account_id, error=str(exc) or type(exc).__name__)
            return False

    def _snapshot_soon(self, account_id: int, delay: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay)
            if account_id in self._accounts:
                await self._snapshot(account_id)

        task = asyncio.get_running_loop().create_task(later(), name=f"snapshot:{account_id}")
        self._snapshots_later.add(task)
        task.add_done_callback(self._snapshots_later.discard)

    async def _discard_snapshot(self, account_id: int, owner_token: int) -> None:
        try:
            await self.state.discard(account_id, owner_token)
        except POSTGRES_DOWN as exc:  # OSError among them
            # The account is stored logged out, so nothing opens it to send; a new login discards again.
            log.warning("state snapshot not discarded", account_id=account_id, error=str(exc) or type(exc).__name__)

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
        stats["state_snapshots"] = self.state.stats(list(self._accounts))
        stats["published_at"] = round(now, 3)
        return stats


def _epoch(value: Any) -> float:
    """A stored timestamptz (datetime or None) as time.time() seconds."""
    return float(value.timestamp()) if value is not None else 0.0

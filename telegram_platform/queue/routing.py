"""Sends go to the worker child that holds their account, first time; accounts nobody holds go to
the least-loaded live child of the least-loaded live host (docs/scaling.md).

A host runs one or more worker children (TP_WORKER_CHILDREN), each in a pool slot whose name,
`<host>/<instance>-w<N>`, outlives its child's restarts. Every child consumes its slot's own queue
`messages@<slot>` (registry.host_queue) besides the shared `messages`. An account's owner is its
lease's holder in Redis (`<slot>-<pid>|<token>`) while that holder is its slot's live child (the
slot's alive key `tp:slot:alive:<slot>` names it, renewed with each child's heartbeat, beside its
host's `tp:host:alive:<host>`); or, when Redis holds no lease, the least-loaded live child of
`accounts.owner_host` while that host is alive. A send is enqueued on its owner child's queue; one
for an account no live child owns goes to the shared queue, and whichever child takes it forwards it
to the least-loaded live child of the least-loaded live host, which opens the account there and so
becomes its owner.

A job is checked again before its message is claimed (claiming counts an attempt): one that finds
its account held by another child (of this host or another) is moved to that child's queue as it is
(`Moved`), at most `MAX_HOPS` times, and a send whose account's last holder died waits, uncounted,
for the dead holder's lease to expire. A campaign runs on every child that holds some of its
accounts (worker/campaigns.py asks `SendRouter.route` where each account runs), on
`campaigns@<slot>`. A child (or a host) that dies leaves its queues behind:
`hand_back_dead_host_queues` gives their jobs to the shared queues, where they are routed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..redis_keys import SLOT_ALIVE_PREFIX, account_lease, host_alive, host_slots, slot_alive
from .consumer import ROUTE_HOPS_FIELD, WORKER_TTL, JobContext, Moved, Retry
from .jobs import JOB_PREFIX, QUEUES_SET, Enqueuer, queue_key, scheduled_key
from .registry import CAMPAIGNS_QUEUE, MESSAGES_QUEUE, SEND_MESSAGE, base_queue, host_queue, message_job_id, queue_host

log = structlog.get_logger(__name__)

# How often one job may be moved between children before it is run wherever it is (the send's own
# rules then apply): ownership changing under a job again and again must not bounce it forever.
MAX_HOPS: Final = 3
# A host, and a slot, is alive this long after its last heartbeat (the queue consumer's own liveness).
ALIVE_TTL: Final = WORKER_TTL
# A host's slot hash outlives its last heartbeat this long, so a host that is gone for good leaves
# nothing behind; the slots in it count only while their alive keys exist.
SLOTS_TTL: Final = 86_400
# The queues whose jobs are routed per child.
ROUTED_QUEUES: Final[tuple[str, ...]] = (MESSAGES_QUEUE, CAMPAIGNS_QUEUE)
# Jobs handed back per call when a dead child's queue is emptied (one Lua call must stay short).
HAND_BACK_BATCH: Final = 1000
# Accounts looked up in one pipeline (`find_owners`): a campaign's thousand in a few round trips.
LOOKUP_BATCH: Final = 500
# Single-account lookups (`SendRouter.route`) in flight at once, well under the Redis client's
# connection pool (redis-py's default is 100 connections).
LOOKUPS_AT_ONCE: Final = 32
# A worker identity is its slot's name and its pid: `<host>/<instance>-w<N>-<pid>`.
_PID_SUFFIX = re.compile(r"-\d+$")

# KEYS: the account's lease. ARGV: the slot alive-key prefix.
# Returns {host, slot, the lease's ttl in ms (-2 when there is no lease)}: the holder's host and
# slot when the holder is its slot's live child; '', '' and the ttl when a dead process holds it.
_LEASE_OWNER = """
local lease = redis.call('GET', KEYS[1])
if not lease then return {'', '', -2} end
local owner = string.sub(lease, 1, string.find(lease, '|', 1, true) - 1)
local slot = string.match(owner, '^(.*)%-%d+$') or owner
if redis.call('GET', ARGV[1] .. slot) == owner then
  local slash = string.find(owner, '/', 1, true)
  local host = owner
  if slash then host = string.sub(owner, 1, slash - 1) end
  return {host, slot, 0}
end
return {'', '', redis.call('PTTL', KEYS[1])}
"""

# KEYS: a slot's alive key. ARGV: the identity it must name to be deleted.
_DROP_IF_HOLDER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the dead child's queue, the shared queue, the dead child's scheduled set, the shared one.
# ARGV: how many at most. Moves queued jobs (in order) and scheduled ones (keeping their times).
_HAND_BACK = """
local limit = tonumber(ARGV[1])
local n = 0
while n < limit and redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do n = n + 1 end
local due = redis.call('ZRANGE', KEYS[3], 0, limit - 1, 'WITHSCORES')
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[4], due[i + 1], due[i])
  redis.call('ZREM', KEYS[3], due[i])
  n = n + 1
end
return n
"""


def slot_names(host_id: str, instance: str, children: int) -> list[str]:
    """The pool's slots on this host, `<host>/<instance>-w<N>`: they start with the host's id, so two
    hosts' children never share an identity (a lease holder, a liveness lock), whatever their pids."""
    return [f"{host_id}/{instance.replace(':', '-')}-w{i}" for i in range(children)]


def sibling_slots(slot: str, children: int) -> list[str]:
    """Every slot of the pool `slot` belongs to, itself included (`children` of them); just itself
    when its name is not a pool slot's."""
    base, sep, index = slot.rpartition("-w")
    if not sep or not index.isdigit() or int(index) >= children:
        return [slot]
    return [f"{base}-w{i}" for i in range(children)]


def slot_of(identity: str) -> str:
    """The pool slot a worker identity belongs to (`h/tp-worker-w0-123` -> `h/tp-worker-w0`)."""
    return _PID_SUFFIX.sub("", identity)


def host_of(member: str) -> str:
    """The host of a slot or identity (`h/tp-worker-w0` -> `h`)."""
    return member.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns an account now: `host`, a live host (None: no live host); `member`, the slot of the
    live child holding it, or the one its host would open it in (None: no live child); `expires_in`,
    seconds until a dead holder's lease on it expires (0: none held)."""

    host: str | None
    expires_in: float = 0.0
    member: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Where a job about an account runs: `queue`, its owner child's routed queue (or the
    placement's); None while a dead holder's lease on it expires, in `wait` seconds. `why` says
    which, for logs."""

    queue: str | None
    wait: float = 0.0
    why: str = ""


async def mark_alive(redis: aioredis.Redis, host_id: str, *, identity: str | None = None, hosted: int = 0,
                     host: bool = True) -> None:
    """This host is alive (unless `host` is false: a host leaving takes no new accounts); with
    `identity`, so is that child's slot, holding `hosted` accounts (renewed by each worker child with
    its heartbeat): sends are routed to its slot's queue."""
    async with redis.pipeline(transaction=False) as pipe:
        if host:
            pipe.set(host_alive(host_id), b"1", ex=ALIVE_TTL)
        if identity is not None:
            slot = slot_of(identity)
            pipe.set(slot_alive(slot), identity, ex=ALIVE_TTL)
            pipe.hset(host_slots(host_id), slot, hosted)
            pipe.expire(host_slots(host_id), SLOTS_TTL)
        await pipe.execute()


async def publish_load(redis: aioredis.Redis, host_id: str, identity: str, hosted: int) -> None:
    """The accounts a child holds, at once (an account opened or closed), so placements made before
    its next heartbeat see it: a burst of logins is spread over the children, not all sent to one."""
    await redis.hset(host_slots(host_id), slot_of(identity), hosted)


async def mark_gone(redis: aioredis.Redis, identity: str) -> None:
    """A child stopping on purpose: its slot is no longer alive for routing (if the key still names
    it), so its queue is handed back at once rather than when the key expires."""
    await redis.eval(_DROP_IF_HOLDER, 1, slot_alive(slot_of(identity)), identity)


async def slot_loads(redis: aioredis.Redis, host_ids: Sequence[str]) -> dict[str, int]:
    """The accounts each live child of these hosts holds, by slot (two round trips)."""
    if not host_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for host_id in host_ids:
            pipe.hgetall(host_slots(host_id))
        hashes = await pipe.execute()
    loads = {_text(slot): int(count) for slots in hashes for slot, count in slots.items()}
    if not loads:
        return {}
    alive = await redis.mget([slot_alive(slot) for slot in loads])
    return {slot: count for (slot, count), flag in zip(loads.items(), alive, strict=True) if flag}


async def slot_identity(redis: aioredis.Redis, slot: str) -> str | None:
    """The identity of the slot's live child (None: none alive)."""
    value = await redis.get(slot_alive(slot))
    return None if value is None else _text(value)


async def live_holders(redis: aioredis.Redis, identities: set[str]) -> set[str]:
    """The subset of these worker identities that are their slot's live child."""
    if not identities:
        return set()
    ordered = sorted(identities)
    current = await redis.mget([slot_alive(slot_of(i)) for i in ordered])
    return {i for i, value in zip(ordered, current, strict=True) if value is not None and _text(value) == i}


async def least_loaded_slot(redis: aioredis.Redis, host_id: str) -> str | None:
    """The host's live child holding fewest accounts (None: none alive)."""
    return least_loaded(await slot_loads(redis, [host_id]))


async def find_owner(redis: aioredis.Redis, pool: asyncpg.Pool, account_id: int) -> Owner:
    """The account's live owner: its lease's holder, else (Redis holds no lease) the least-loaded
    live child of `accounts.owner_host` (`find_owners` for one account)."""
    return (await find_owners(redis, pool, [account_id]))[0]


async def find_owners(redis: aioredis.Redis, pool: asyncpg.Pool, account_ids: Sequence[int]) -> list[Owner]:
    """`find_owner` for many accounts at once, in a few round trips: the leases in pipelines of
    `LOOKUP_BATCH`, the unleased accounts' stored hosts in one query. One connection, however many
    accounts (a campaign's): a lookup per account at once would take one pooled connection each."""
    leases: list[Any] = []
    for start in range(0, len(account_ids), LOOKUP_BATCH):
        async with redis.pipeline(transaction=False) as pipe:
            for account_id in account_ids[start:start + LOOKUP_BATCH]:
                pipe.eval(_LEASE_OWNER, 1, account_lease(account_id), SLOT_ALIVE_PREFIX)
            leases.extend(await pipe.execute())
    owners: dict[int, Owner] = {}
    unleased: list[int] = []
    for account_id, (host, member, ttl_ms) in zip(account_ids, leases, strict=True):
        if member:
            owners[account_id] = Owner(_text(host), member=_text(member))
        elif int(ttl_ms) != -2:  # a dead process still holds the lease
            owners[account_id] = Owner(None, max(0.0, int(ttl_ms) / 1000))
        else:
            unleased.append(account_id)
    if unleased:
        stored = {row["id"]: row["owner_host"] for row in await pool.fetch(
            "SELECT id, owner_host FROM accounts WHERE id = ANY($1)", unleased)}
        hosts = sorted({str(h) for h in stored.values() if h})
        alive = {h for h, flag in zip(hosts, await redis.mget([host_alive(h) for h in hosts]) if hosts else [],
                                      strict=True) if flag}
        loads = await slot_loads(redis, sorted(alive))
        members = {h: least_loaded({s: n for s, n in loads.items() if host_of(s) == h}) for h in alive}
        for account_id in unleased:
            host = stored.get(account_id)
            owners[account_id] = Owner(str(host), member=members[str(host)]) if host and str(host) in alive \
                else Owner(None)
    return [owners[a] for a in account_ids]


def owner_queue(base: str, owner: Owner) -> str:
    """The queue of `base`'s jobs for an account that `owner` owns: its child's, else the shared one."""
    return host_queue(base, owner.member) if owner.member else base


async def enqueue_for_account(enqueuer: Enqueuer, redis: aioredis.Redis, pool: asyncpg.Pool, base: str,
                              func: str, args: Sequence[Any], *, job_id: str, account_id: int) -> str:
    """Enqueue a job about one account on its owner child's queue of `base` (the shared one without
    a live owner); returns the queue."""
    queue = owner_queue(base, await find_owner(redis, pool, account_id))
    await enqueuer.enqueue(queue, func, args, job_id=job_id)
    return queue


async def enqueue_send(enqueuer: Enqueuer, redis: aioredis.Redis, pool: asyncpg.Pool, message_id: int,
                       account_id: int) -> str:
    """Enqueue a message's send on its account owner's queue; returns the queue."""
    return await enqueue_for_account(enqueuer, redis, pool, MESSAGES_QUEUE, SEND_MESSAGE, [message_id, account_id],
                                     job_id=message_job_id(message_id), account_id=account_id)


async def host_loads(pool: asyncpg.Pool, redis: aioredis.Redis, *, gone_after: float) -> dict[str, int]:
    """The logged-in accounts each live host owns: hosts up in PostgreSQL (not draining) and alive
    in Redis, so a host that just died is not chosen while PostgreSQL still calls it up."""
    rows = await pool.fetch(
        """SELECT h.id, (SELECT count(*) FROM accounts a WHERE a.owner_host = h.id) AS owned
           FROM hosts h
           WHERE h.draining_since IS NULL AND h.last_seen >= now() - make_interval(secs => $1)""",
        gone_after)
    if not rows:
        return {}
    alive = await redis.mget([host_alive(row["id"]) for row in rows])
    return {row["id"]: int(row["owned"]) for row, flag in zip(rows, alive, strict=True) if flag}


async def member_loads(pool: asyncpg.Pool, redis: aioredis.Redis, *, gone_after: float) -> dict[str, int]:
    """The accounts each live child of the live hosts (`host_loads`) holds, by slot."""
    return await slot_loads(redis, sorted(await host_loads(pool, redis, gone_after=gone_after)))


async def place(pool: asyncpg.Pool, redis: aioredis.Redis, *, gone_after: float) -> str | None:
    """Where an account nobody owns goes: the least-loaded live child of the least-loaded live host
    (a host with no live child listed is passed over). None: no live child anywhere."""
    loads = await host_loads(pool, redis, gone_after=gone_after)
    for host_id in sorted(loads, key=lambda h: (loads[h], h)):
        if (slot := await least_loaded_slot(redis, host_id)) is not None:
            return slot
    return None


def least_loaded(loads: dict[str, int]) -> str | None:
    """The host (or child) owning fewest accounts (ties: the smallest name, so all pick the same one)."""
    return min(loads, key=lambda host: (loads[host], host)) if loads else None


def orphan_share(loads: dict[str, int], host_id: str, orphans: int) -> int:
    """How many of `orphans` (accounts nobody owns) this host (or child: `loads` by slot) opens: up
    to its fair share of all accounts the live ones would then hold. Only orphans are placed; no
    owned account moves."""
    mine = dict(loads)
    mine.setdefault(host_id, 0)
    target = math.ceil((sum(mine.values()) + orphans) / len(mine))
    return max(0, min(orphans, target - mine[host_id]))


def spread(account_ids: Sequence[int], host_id: str) -> list[int]:
    """The accounts in an order of this host's (or child's) own, so those opening their shares at
    once mostly try different accounts."""
    return sorted(account_ids, key=lambda a: hashlib.blake2b(f"{host_id}:{a}".encode(), digest_size=8).digest())


class SendRouter:
    """Checks a send job before its message is claimed: moved to the child holding its account, or
    placed on the least-loaded child, instead of counting a failed attempt here; and tells a
    campaign's runner where each of its accounts runs (`route`)."""

    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool, host_id: str, *, member: str, gone_after: float,
                 hosted_here: Callable[[int], bool]) -> None:
        self._redis = redis
        self._pool = pool
        self.host_id = host_id
        # This child's slot (`<host>/<instance>-w<N>`): its queue is `<base>@<slot>`.
        self.member = member
        self._gone_after = gone_after
        self._hosted_here = hosted_here
        # Lookups of single accounts at once (a campaign's senders each ask for theirs): more would
        # exhaust the Redis client's connection pool, which fails a command rather than wait.
        self._lookups = asyncio.Semaphore(LOOKUPS_AT_ONCE)

    def own_queue(self, base: str) -> str:
        """This child's routed queue of `base` (`messages@<slot>`)."""
        return host_queue(base, self.member)

    async def check(self, ctx: JobContext, message_id: int, account_id: int | None) -> None:
        """Return when the send is this child's to make; raise `Moved` (another child's) or `Retry`
        (a dead holder's lease still holds the account). Redis or PostgreSQL unreachable: the send is
        made here, where its own rules meet the outage (a retry, nothing sent)."""
        try:
            await self._check(ctx, message_id, account_id)
        except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:
            log.warning("send not routed: made here", message_id=message_id, error=type(exc).__name__)

    async def route(self, base: str, account_id: int) -> Route:
        """The routed queue of `base` a job about the account belongs on: this child's when the
        account is open here, its holder's, else (nobody holds it) its live host's least-loaded child
        or the placement's (the least-loaded child of the least-loaded host)."""
        if self._hosted_here(account_id):
            return Route(self.own_queue(base))  # the fast path, no round trip
        async with self._lookups:
            return await self._route(base, account_id, await find_owner(self._redis, self._pool, account_id))

    async def route_many(self, base: str, account_ids: Sequence[int]) -> list[Route]:
        """`route` for each of these accounts (a campaign's), their owners looked up together
        (`find_owners`) and a placement, if one is needed, made once for them all."""
        away = [a for a in account_ids if not self._hosted_here(a)]
        owners = dict(zip(away, await find_owners(self._redis, self._pool, away), strict=True))
        placed: list[str | None] = []

        async def placement() -> str | None:
            if not placed:
                placed.append(await place(self._pool, self._redis, gone_after=self._gone_after))
            return placed[0]

        return [Route(self.own_queue(base)) if a not in owners else await self._route(base, a, owners[a], placement)
                for a in account_ids]

    async def _route(self, base: str, account_id: int, owner: Owner,
                     placement: Callable[[], Awaitable[str | None]] | None = None) -> Route:
        if owner.member is not None:
            return Route(host_queue(base, owner.member), why=f"account {account_id} is owned by {owner.member}")
        if owner.host == self.host_id:
            return Route(self.own_queue(base), why=f"account {account_id}: this host's, opened here")
        if owner.expires_in > 0:
            return Route(None, owner.expires_in, f"account {account_id}: its dead owner's lease expires")
        target = await (placement() if placement is not None
                        else place(self._pool, self._redis, gone_after=self._gone_after))
        if target is None:
            return Route(self.own_queue(base), why=f"account {account_id}: no live child known, placed here")
        return Route(host_queue(base, target), why=f"account {account_id} placed on {target}")

    async def _check(self, ctx: JobContext, message_id: int, account_id: int | None) -> None:
        if account_id is None:  # a job enqueued without its account (a re-sent abandoned claim)
            account_id = await self._pool.fetchval("SELECT account_id FROM messages WHERE id = $1", message_id)
            if account_id is None:
                return  # the message is gone: the claim finds nothing to do
        base = base_queue(ctx.queue)
        route = await self.route(base, account_id)
        if route.queue == self.own_queue(base):
            return
        hops = int(await self._redis.hget(JOB_PREFIX + ctx.job_id, ROUTE_HOPS_FIELD) or 0)
        if hops >= MAX_HOPS:
            return
        if route.queue is None:
            raise Retry(route.wait + 0.1, route.why)
        raise Moved(route.queue, route.why)


async def host_queues(redis: aioredis.Redis) -> list[str]:
    """Every per-child queue (and per-host queue, from before children were routed to) ever enqueued
    to (RQ's set of queues names them)."""
    prefix = queue_key("")
    names = [_text(m)[len(prefix):] for m in await redis.smembers(QUEUES_SET)]
    return sorted(n for n in names if queue_host(n) is not None)


async def hand_back_dead_host_queues(redis: aioredis.Redis, member: str) -> int:
    """The queued and scheduled jobs of children (slots) no longer alive, and of per-host queues
    (nobody consumes those since sends are routed per child), go to the shared queues, where they
    are routed again (their accounts' new owners, or placement). `member` is the caller's own slot,
    never handed back by itself. Returns how many moved."""
    moved = 0
    for queue in await host_queues(redis):
        target = queue_host(queue)
        if target is None or target == member or ("/" in target and await redis.exists(slot_alive(target))):
            continue
        base = base_queue(queue)
        keys = [queue_key(queue), queue_key(base), scheduled_key(queue), scheduled_key(base)]
        while (n := int(await redis.eval(_HAND_BACK, 4, *keys, HAND_BACK_BATCH))) > 0:
            moved += n
            await asyncio.sleep(0)
    return moved


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""Sends and campaign runs go to the host that owns their account, first time; accounts nobody owns
go to the least-loaded live host (docs/scaling.md).

Every host's workers consume `messages@<host id>` and `campaigns@<host id>` (registry.host_queue,
`ROUTED_QUEUES`) besides the shared queues. An account's owner is its lease's holder in Redis
(`<host>/<slot>-<pid>|<token>`: the host is the identity's prefix) or, when Redis holds no lease,
`accounts.owner_host` in PostgreSQL; either counts only while that host is alive
(`tp:host:alive:<host>`, renewed by each of its worker children with their heartbeat). A send is
enqueued on its owner's queue; one for an account no live host owns goes to the shared queue, and
whichever host takes it forwards it to the least-loaded live host, which opens the account there
and so becomes its owner.

A job is checked again before its message is claimed (claiming counts an attempt): one that finds
its account owned by another host is moved to that host's queue as it is (`Moved`), at most
`MAX_HOPS` times, and a send whose account's last owner died waits, uncounted, for the dead owner's
lease to expire. A campaign runs on every host that owns some of its accounts (worker/campaigns.py
asks `SendRouter.route` where each account runs). A host that dies leaves its queues behind:
`hand_back_dead_host_queues` gives their jobs to the shared queues, where they are routed again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..redis_keys import HOST_ALIVE_PREFIX, account_lease, host_alive
from .consumer import ROUTE_HOPS_FIELD, WORKER_TTL, JobContext, Moved, Retry
from .jobs import JOB_PREFIX, QUEUES_SET, Enqueuer, queue_key, scheduled_key
from .registry import CAMPAIGNS_QUEUE, MESSAGES_QUEUE, SEND_MESSAGE, base_queue, host_queue, message_job_id, queue_host

log = structlog.get_logger(__name__)

# How often one job may be moved between hosts before it is run wherever it is (the send's own
# rules then apply): ownership changing under a job again and again must not bounce it forever.
MAX_HOPS: Final = 3
# A host is alive this long after its last heartbeat (the queue consumer's own liveness).
ALIVE_TTL: Final = WORKER_TTL
# The queues whose jobs are routed per host.
ROUTED_QUEUES: Final[tuple[str, ...]] = (MESSAGES_QUEUE, CAMPAIGNS_QUEUE)
# Jobs handed back per call when a dead host's queue is emptied (one Lua call must stay short).
HAND_BACK_BATCH: Final = 1000

# KEYS: the account's lease. ARGV: the alive-key prefix.
# Returns {host or '', the lease's ttl in ms (-2 when there is no lease)}: the host when a live one
# holds the lease; '' and the ttl when a dead host's process still holds it.
_LEASE_OWNER = """
local lease = redis.call('GET', KEYS[1])
if not lease then return {'', -2} end
local owner = string.sub(lease, 1, string.find(lease, '|', 1, true) - 1)
local slash = string.find(owner, '/', 1, true)
local host = owner
if slash then host = string.sub(owner, 1, slash - 1) end
if redis.call('EXISTS', ARGV[1] .. host) == 1 then return {host, 0} end
return {'', redis.call('PTTL', KEYS[1])}
"""

# KEYS: the dead host's queue, the shared queue, the dead host's scheduled set, the shared one.
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


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns an account now: `host`, a live host (None: no live host); `expires_in`, seconds until
    a dead host's lease on it expires (0: none held)."""

    host: str | None
    expires_in: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """Where a job about an account runs: `queue`, its owner's routed queue (or the placement's);
    None while a dead host's lease on it expires, in `wait` seconds. `why` says which, for logs."""

    queue: str | None
    wait: float = 0.0
    why: str = ""


async def mark_alive(redis: aioredis.Redis, host_id: str) -> None:
    """This host is alive (renewed by each worker child with its heartbeat): sends are routed here."""
    await redis.set(host_alive(host_id), b"1", ex=ALIVE_TTL)


async def find_owner(redis: aioredis.Redis, pool: asyncpg.Pool, account_id: int) -> Owner:
    """The account's live owner host: its lease's, else (Redis lost it) `accounts.owner_host`'s."""
    host, ttl_ms = await redis.eval(_LEASE_OWNER, 1, account_lease(account_id), HOST_ALIVE_PREFIX)
    host_s = host.decode() if isinstance(host, bytes) else str(host)
    if host_s:
        return Owner(host_s)
    if int(ttl_ms) != -2:  # a dead host's process still holds the lease
        return Owner(None, max(0.0, int(ttl_ms) / 1000))
    stored = await pool.fetchval("SELECT owner_host FROM accounts WHERE id = $1", account_id)
    if stored and await redis.exists(host_alive(str(stored))):
        return Owner(str(stored))
    return Owner(None)


def owner_queue(base: str, owner: Owner) -> str:
    """The queue of `base`'s jobs for an account that `owner` owns: its host's, else the shared one."""
    return host_queue(base, owner.host) if owner.host else base


async def enqueue_for_account(enqueuer: Enqueuer, redis: aioredis.Redis, pool: asyncpg.Pool, base: str,
                              func: str, args: Sequence[Any], *, job_id: str, account_id: int) -> str:
    """Enqueue a job about one account on its owner's queue of `base` (the shared one without a
    live owner); returns the queue."""
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


def least_loaded(loads: dict[str, int]) -> str | None:
    """The host owning fewest accounts (ties: the smallest id, so every host picks the same one)."""
    return min(loads, key=lambda host: (loads[host], host)) if loads else None


def orphan_share(loads: dict[str, int], host_id: str, orphans: int) -> int:
    """How many of `orphans` (accounts nobody owns) this host opens: up to its fair share of all
    accounts the live hosts would then hold. Only orphans are placed; no owned account moves."""
    mine = dict(loads)
    mine.setdefault(host_id, 0)
    target = math.ceil((sum(mine.values()) + orphans) / len(mine))
    return max(0, min(orphans, target - mine[host_id]))


def spread(account_ids: Sequence[int], host_id: str) -> list[int]:
    """The accounts in an order of this host's own, so hosts opening their shares at once mostly
    try different accounts."""
    return sorted(account_ids, key=lambda a: hashlib.blake2b(f"{host_id}:{a}".encode(), digest_size=8).digest())


class SendRouter:
    """Checks a send job before its message is claimed: moved to its account's owner host, or placed
    on the least-loaded host, instead of counting a failed attempt here; and tells a campaign's
    runner where each of its accounts runs (`route`)."""

    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool, host_id: str, *, gone_after: float,
                 hosted_here: Callable[[int], bool]) -> None:
        self._redis = redis
        self._pool = pool
        self.host_id = host_id
        self._gone_after = gone_after
        self._hosted_here = hosted_here

    async def check(self, ctx: JobContext, message_id: int, account_id: int | None) -> None:
        """Return when the send is this host's to make; raise `Moved` (another host's) or `Retry`
        (a dead host's lease still holds the account). Redis or PostgreSQL unreachable: the send is
        made here, where its own rules meet the outage (a retry, nothing sent)."""
        try:
            await self._check(ctx, message_id, account_id)
        except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:
            log.warning("send not routed: made here", message_id=message_id, error=type(exc).__name__)

    def own_queue(self, base: str) -> str:
        """This worker's routed queue of `base` (what it consumes besides the shared one)."""
        return host_queue(base, self.host_id)

    async def route(self, base: str, account_id: int) -> Route:
        """The routed queue of `base` a job about the account belongs on: this worker's when the
        account is open here, its live owner's, else (nobody owns it) the least-loaded host's."""
        if self._hosted_here(account_id):
            return Route(self.own_queue(base))  # the fast path, no round trip
        owner = await find_owner(self._redis, self._pool, account_id)
        if owner.host is not None:
            return Route(owner_queue(base, owner), why=f"account {account_id} is owned by host {owner.host}")
        if owner.expires_in > 0:
            return Route(None, owner.expires_in, f"account {account_id}: its dead owner's lease expires")
        target = least_loaded(await host_loads(self._pool, self._redis, gone_after=self._gone_after))
        if target is None:
            return Route(self.own_queue(base), why=f"account {account_id}: no live host known, placed here")
        return Route(owner_queue(base, Owner(target)), why=f"account {account_id} placed on host {target}")

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
    """Every per-host queue ever enqueued to (RQ's set of queues names them)."""
    prefix = queue_key("")
    names = [(m.decode() if isinstance(m, bytes) else str(m))[len(prefix):] for m in await redis.smembers(QUEUES_SET)]
    return sorted(n for n in names if queue_host(n) is not None)


async def hand_back_dead_host_queues(redis: aioredis.Redis, host_id: str) -> int:
    """The queued and scheduled jobs of hosts no longer alive go to the shared queues, where they
    are routed again (their accounts' new owners, or placement). Returns how many moved."""
    moved = 0
    for queue in await host_queues(redis):
        host = queue_host(queue)
        if host is None or host == host_id or await redis.exists(host_alive(host)):
            continue
        base = base_queue(queue)
        keys = [queue_key(queue), queue_key(base), scheduled_key(queue), scheduled_key(base)]
        while (n := int(await redis.eval(_HAND_BACK, 4, *keys, HAND_BACK_BATCH))) > 0:
            moved += n
            await asyncio.sleep(0)
    return moved

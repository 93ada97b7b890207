"""Account ownership: one account's database is open in one process of the whole deployment.

A lease is a Redis key holding `<owner>|<fencing token>` with a TTL; the owner renews it, and
another process may take it only once it has expired. The token here grows with every new owner of
the lease. The account's state in PostgreSQL is fenced by a token of its own, which a new owner
takes there once it holds the lease (`accounts.owner_token`, storage/accounts.py): a stale owner's
late state writes are refused by the database, even after Redis has lost its keys and this counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from ..redis_keys import account_fence, account_lease
from .base import OwnedElsewhere

LEASE_TTL_MS = 15_000

# KEYS: lease, fence. ARGV: owner, ttl ms. Returns {owner, token, acquired(0/1)}.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  local owner = string.sub(current, 1, sep - 1)
  local token = string.sub(current, sep + 1)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {owner, token, 1}
  end
  return {owner, token, 0}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {ARGV[1], tostring(token), 1}
"""

# KEYS: lease. ARGV: owner|token, ttl ms (0 = release). Returns 1 if still ours, 2 if it was gone
# and is ours again (renewal only), 0 if another owner holds it.
_RENEW_OR_RELEASE = """
local current = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if current == ARGV[1] then
  if ttl == 0 then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ttl) end
  return 1
end
if not current and ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  return 2
end
return 0
"""

# What a renewal found: still ours; gone from Redis (a restart without persistence, FLUSHALL, or
# expired with nobody taking it) and set again; or another owner's now.
LeaseStatus = Literal["held", "retaken", "lost"]
_STATUSES: dict[int, LeaseStatus] = {1: "held", 2: "retaken", 0: "lost"}


@dataclass(frozen=True, slots=True)
class Lease:
    account_id: int
    owner: str
    token: int

    @property
    def value(self) -> str:
        return f"{self.owner}|{self.token}"


class LeaseManager:
    def __init__(self, redis: aioredis.Redis, owner: str, ttl_ms: int = LEASE_TTL_MS) -> None:
        self._redis = redis
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew_or_release = redis.register_script(_RENEW_OR_RELEASE)

    async def acquire(self, account_id: int) -> Lease:
        """Take (or extend) the lease; raise OwnedElsewhere if another live process holds it."""
        owner, token, acquired = await self._acquire(
            keys=[account_lease(account_id), account_fence(account_id)], args=[self.owner, self.ttl_ms]
        )
        owner_s = owner.decode() if isinstance(owner, bytes) else str(owner)
        if not int(acquired):
            raise OwnedElsewhere(account_id, owner_s)
        return Lease(account_id, owner_s, int(token))

    async def renew_many(self, leases: list[Lease]) -> list[LeaseStatus]:
        """Renew several leases in one round trip. A lease found gone is set again ("retaken"): no
        other process holds it now, but one may have held it meanwhile, which only PostgreSQL's
        owner token can tell (AccountSessions.renew_leases asks it)."""
        if not leases:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for lease in leases:
                await self._renew_or_release(keys=[account_lease(lease.account_id)], args=[lease.value, self.ttl_ms],
                                             client=pipe)
            results = await pipe.execute()
        return [_STATUSES[int(r)] for r in results]

    async def release(self, lease: Lease) -> None:
        await self._renew_or_release(keys=[account_lease(lease.account_id)], args=[lease.value, 0])

    async def expires_in(self, account_id: int) -> float:
        """Seconds until the account's lease expires unless renewed (0 when nobody holds it)."""
        ttl_ms = int(await self._redis.pttl(account_lease(account_id)))
        return max(0.0, ttl_ms / 1000)

    async def owners_of(self, account_ids: list[int]) -> list[str | None]:
        """Each account's lease holder (None: free), in one round trip."""
        if not account_ids:
            return []
        values = await self._redis.mget([account_lease(a) for a in account_ids])
        return [None if not v else (v.decode() if isinstance(v, bytes) else str(v)).split("|", 1)[0]
                for v in values]

    async def owner_of(self, account_id: int) -> str | None:
        return (await self.owners_of([account_id]))[0]

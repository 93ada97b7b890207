"""The one scheduler: due scheduled jobs (retries, flood waits, delayed jobs) back onto their queues.

Any number of worker children may run `Scheduler.run`; a Redis lock (SET NX with a TTL, renewed by
its holder) lets exactly one of them promote at a time, and another takes over within `LOCK_TTL`
seconds of the holder's death. Promotion does not wait for a queue to fall idle: a busy queue's
retries come due on time. The holder also trims RQ's finished and failed registries of entries
whose job hashes have expired, as RQ's own scheduler does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
import structlog

from ..outages import REDIS_DOWN
from ..redis_keys import SCHEDULER_LOCK
from .jobs import failed_key, finished_key, queue_key, scheduled_key
from .routing import host_queues

log = structlog.get_logger(__name__)

LOCK_TTL = 10.0
TICK_SECONDS = 0.2
CLEAN_EVERY_SECONDS = 60.0
# The routed queues (RQ's set of queues) are read again this often, not every tick: a worker
# slot's queue is new only once, when the slot first takes a job.
HOST_QUEUES_SECONDS = 1.0
# Jobs promoted per queue in one call (one Lua call must stay short); more are taken by the next.
PROMOTE_LIMIT = 1000

# KEYS: lock, then (scheduled, queue) pairs. ARGV: owner, lock ttl ms, now, limit per queue.
# One call per tick, whatever the number of queues: hold (or extend) the lock and, when held,
# promote every queue's due jobs. Returns {held (0/1), promoted, 1 when a queue had more due}.
_HOLD_AND_PROMOTE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return {0, 0, 0}
end
local limit = tonumber(ARGV[4])
local promoted, more = 0, 0
for k = 2, #KEYS, 2 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[3], 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    redis.call('ZREM', KEYS[k], id)
    redis.call('HSET', 'rq:job:' .. id, 'status', 'queued')
    redis.call('RPUSH', KEYS[k + 1], id)
  end
  promoted = promoted + #ids
  if #ids == limit then more = 1 end
end
return {1, promoted, more}
"""

# KEYS: lock. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Scheduler:
    def __init__(self, redis: aioredis.Redis, queues: Sequence[str], *, owner: str) -> None:
        self._redis = redis
        self._queues = tuple(queues)
        self.owner = owner
        self._hold_and_promote = redis.register_script(_HOLD_AND_PROMOTE)
        self._release = redis.register_script(_RELEASE)
        self._last_clean = 0.0
        self._host_queues: list[str] = []
        self._host_queues_read = -HOST_QUEUES_SECONDS
        self.holding = False

    async def tick(self) -> int:
        """One round: hold the lock, promote what is due; returns how many jobs were promoted. One
        round trip (two when the routed queues are read again)."""
        if time.monotonic() - self._host_queues_read >= HOST_QUEUES_SECONDS:
            # The routed queues too (queue/routing.py): a child's retries go back to its slot's queue.
            self._host_queues = await host_queues(self._redis)
            self._host_queues_read = time.monotonic()
        keys = [SCHEDULER_LOCK]
        for queue in (*self._queues, *self._host_queues):
            keys += [scheduled_key(queue), queue_key(queue)]
        promoted = 0
        while True:
            held, moved, more = await self._hold_and_promote(
                keys=keys, args=[self.owner, int(LOCK_TTL * 1000), time.time(), PROMOTE_LIMIT])
            self.holding = bool(held)
            promoted += int(moved)
            if not (self.holding and more):
                break
        if not self.holding:
            return promoted
        now = time.time()
        if time.monotonic() - self._last_clean >= CLEAN_EVERY_SECONDS:
            self._last_clean = time.monotonic()
            await self.clean_registries(now)
        return promoted

    async def clean_registries(self, now: float) -> None:
        """Entries are scored by their expiry (as RQ scores them): drop the expired ones."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for queue in self._queues:
                pipe.zremrangebyscore(finished_key(queue), "-inf", now)
                pipe.zremrangebyscore(failed_key(queue), "-inf", now)
            await pipe.execute()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Tick until cancelled (or `stop` is set); Redis outages are waited out."""
        try:
            while stop is None or not stop.is_set():
                try:
                    await self.tick()
                except REDIS_DOWN as exc:
                    log.warning("scheduler: redis unreachable", error=type(exc).__name__)
                    await asyncio.sleep(1.0)
                await asyncio.sleep(TICK_SECONDS)
        finally:
            if self.holding:
                with contextlib.suppress(*REDIS_DOWN):
                    await asyncio.shield(self._release(keys=[SCHEDULER_LOCK], args=[self.owner]))

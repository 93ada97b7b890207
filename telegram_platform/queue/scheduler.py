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

# KEYS: scheduled, queue. ARGV: now, limit. Returns how many were promoted.
_PROMOTE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HSET', 'rq:job:' .. id, 'status', 'queued')
  redis.call('RPUSH', KEYS[2], id)
end
return #ids
"""

# KEYS: lock. ARGV: owner, ttl ms. Take the lock if free, extend it if ours; 1 when we hold it.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
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
        self._promote = redis.register_script(_PROMOTE_DUE)
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self._last_clean = 0.0
        self.holding = False

    async def tick(self) -> int:
        """One round: hold the lock, promote what is due; returns how many jobs were promoted."""
        self.holding = bool(await self._hold(keys=[SCHEDULER_LOCK], args=[self.owner, int(LOCK_TTL * 1000)]))
        if not self.holding:
            return 0
        now = time.time()
        promoted = 0
        # The routed queues too (queue/routing.py): a child's retries go back to its slot's queue.
        for queue in (*self._queues, *await host_queues(self._redis)):
            while True:
                moved = int(await self._promote(keys=[scheduled_key(queue), queue_key(queue)], args=[now, 1000]))
                promoted += moved
                if moved < 1000:
                    break
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

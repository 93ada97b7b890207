"""An asyncio consumer of RQ queues: batched, atomic dequeues and bounded per-queue concurrency.

Stock RQ spends ~55 Redis commands in ~18 round trips on every job and runs one job at a time per
process. Here one Lua call per batch both acknowledges the jobs finished since the last call (status,
TTL, finished registry) and moves the next batch from the queue to this worker's `active` list,
marked started: about one round trip per batch, not per job. `concurrency` lanes run the jobs of a
small local buffer, so the next batch is on its way while the lanes work. A job taken by a worker
that dies stays in that worker's active list until `rescue_abandoned` gives it back; due scheduled
jobs are moved to their queue by the one `Scheduler` (queue/scheduler.py), not here.
"""

from __future__ import annotations

import asyncio
import functools
import time
import traceback
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import redis.asyncio as aioredis
import structlog
from rq.utils import utcformat

from ..outages import REDIS_DOWN, redis_unavailable
from ..redis_keys import WORKER_HEARTBEAT_PREFIX, active_jobs
from .job_status import JobStatus
from .jobs import (
    FAILURE_TTL,
    JOB_PREFIX,
    QUEUES_SET,
    RESULT_TTL,
    decode_job_data,
    failed_key,
    finished_key,
    queue_key,
    scheduled_key,
)
from .registry import base_queue

if TYPE_CHECKING:
    from ..metrics.definitions import Metrics

log = structlog.get_logger(__name__)

WORKER_TTL = 10  # seconds without a heartbeat before a worker's active jobs are rescued
# A job found this many times in the hands of a worker that died is failed, not requeued again: it
# is likely what kills them (a crash in native code, a memory blow-up). Counted in its hash.
MAX_WORKER_DEATHS = 3
WORKER_DEATHS_FIELD = "worker_deaths"
# How often a job was moved to another queue (`Moved`), in its hash: queue/routing.py bounds it.
ROUTE_HOPS_FIELD = "route_hops"
# A job's outcome that Redis could not take is written again after this, doubling up to the cap.
OUTCOME_RETRY_FIRST = 0.2
OUTCOME_RETRY_CAP = 5.0
# While jobs run and the queue is empty, block on it this long at most: finished jobs are
# acknowledged at least this often.
BUSY_WAIT_SECONDS = 0.05

# KEYS: queue, active, finished registry.
# ARGV: take, worker, started_at, ended_at, finished score, result ttl, then the finished job ids.
# Acknowledges the finished jobs, then takes up to `take` jobs: returns id, data, id, data, ...
# A job whose hash is gone (FLUSHALL) is dropped from the active list rather than run half-known.
_ACK_AND_TAKE = """
for i = 7, #ARGV do
  local id = ARGV[i]
  local key = 'rq:job:' .. id
  redis.call('LREM', KEYS[2], 1, id)
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'status', 'finished', 'ended_at', ARGV[4])
    redis.call('EXPIRE', key, ARGV[6])
    redis.call('ZADD', KEYS[3], ARGV[5], id)
  end
end
local out = {}
local take = tonumber(ARGV[1])
while #out < take * 2 do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  local key = 'rq:job:' .. id
  local data = redis.call('HGET', key, 'data')
  if data then
    redis.call('HSET', key, 'status', 'started', 'started_at', ARGV[3], 'worker_name', ARGV[2])
    out[#out + 1] = id
    out[#out + 1] = data
  else
    redis.call('LREM', KEYS[2], 1, id)
  end
end
return out
"""

JobHandler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class JobContext:
    job_id: str
    queue: str
    func: str
    # Set when the worker stops taking jobs: a long job (a campaign) hands its work back and returns.
    stopping: asyncio.Event = field(default_factory=asyncio.Event, compare=False)


class Retry(Exception):
    """Raised by a handler: run the job again after `delay` seconds (not a failure)."""

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay:.1f}s")
        self.delay = delay


class Moved(Exception):
    """Raised by a handler: the job is another queue's (its account's owner host, queue/routing.py):
    moved there as it is, neither run here nor a failure; its hops are counted in its hash."""

    def __init__(self, queue: str, reason: str = "") -> None:
        super().__init__(reason or f"moved to {queue}")
        self.queue = queue


class JobBudget:
    """RQ's `max_jobs` for a process with several consumers: together they take at most `total`
    jobs; `spent` is set once they have."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.spent = asyncio.Event()

    def settle(self, reserved: int, used: int) -> None:
        """`reserved` were set aside for a take that got `used` jobs: give the rest back."""
        self.remaining += reserved - used
        if self.remaining <= 0:
            self.spent.set()


class QueueConsumer:
    """Consumes one queue with up to `concurrency` jobs in flight in this process.

    `batch` bounds one take; at most `concurrency + batch` jobs are held (running or buffered)."""

    def __init__(
        self, redis: aioredis.Redis, queue: str, *, worker: str, concurrency: int,
        handlers: Mapping[str, JobHandler], batch: int = 32, metrics: Metrics | None = None,
        log_each_job: bool = True, budget: JobBudget | None = None,
    ) -> None:
        self._metrics = metrics
        self._budget = budget
        # A JSON line per job costs more than the job's whole bookkeeping: without it, successes are
        # summed up in one line a minute (failures and retries always get their own line).
        self._log_each_job = log_each_job
        self._quiet: dict[str, list[float]] = {}
        self._quiet_since = time.monotonic()
        self._redis = redis
        self.queue = queue
        self.worker = worker
        self.concurrency = concurrency
        self._handlers = handlers
        self._batch = max(1, batch)
        self._capacity = concurrency + self._batch
        self._buffer: deque[tuple[str, bytes]] = deque()
        self._acks: list[str] = []
        # The queue was found empty by a blocking wait, with nothing in hand since.
        self._idle = False
        self._running = 0
        self._work_ready = asyncio.Event()
        self._room_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lanes: list[asyncio.Task[None]] = []
        self._ack_and_take = redis.register_script(_ACK_AND_TAKE)
        self._keys = [queue_key(queue), active_jobs(queue, worker), finished_key(queue)]
        self.processed = 0
        self.failed = 0

    @property
    def in_flight(self) -> int:
        return self._running

    # -- taking jobs ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Take jobs until `stop()`; jobs in hand are left for `drain`."""
        self._lanes = [asyncio.create_task(self._lane(), name=f"lane:{self.queue}:{i}")
                       for i in range(self.concurrency)]
        delay = 0.1
        while not self._stopping.is_set():
            try:
                await self._take_more()
                delay = 0.1
            except Exception as exc:
                if not redis_unavailable(exc):
                    raise
                # Redis restarting, or refusing writes for now (OOM, MISCONF, READONLY): the jobs in
                # hand go on; taking resumes when it is back.
                log.warning("queue unreachable, retrying", queue=self.queue, error=type(exc).__name__,
                            retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _take_more(self) -> None:
        take = max(0, min(self._capacity - len(self._buffer) - self._running, self._batch))
        worth_it = min(self._batch, self.concurrency)
        if self._budget is not None:
            take = min(take, self._budget.remaining)
            worth_it = max(1, min(worth_it, self._budget.remaining))
        if take < worth_it and not self._acks:
            # Full (or the process's job budget is spent): wait until a lane finishes a job, or stop().
            self._room_freed.clear()
            await self._room_freed.wait()
            return
        if self._idle and not (self._acks or self._running or self._buffer):
            # Nothing to acknowledge and the last blocking wait found the queue empty: block again
            # without the take script first (one command a second per idle queue, not two).
            self._idle = not await self._wait_for_work(1.0)
            return
        if self._budget is not None:
            self._budget.remaining -= take
        found: list[bytes] = []
        try:
            found = await self._call(take)
        finally:
            if self._budget is not None:
                self._budget.settle(take, len(found) // 2)
        if found:
            self._push(found)
        elif take > 0:
            # The queue is empty: block on it (briefly while jobs run, so their acks are not held).
            busy = bool(self._running or self._buffer or self._acks)
            self._idle = not await self._wait_for_work(BUSY_WAIT_SECONDS if busy else 1.0) and not busy

    async def _call(self, take: int) -> list[bytes]:
        acks, self._acks = self._acks, []
        now = time.time()
        stamp = utcformat(datetime.now(UTC))
        try:
            found: list[bytes] = await self._ack_and_take(
                keys=self._keys,
                args=[take, self.worker, stamp, stamp, now + RESULT_TTL, RESULT_TTL, *acks])
        except BaseException:
            self._acks[:0] = acks  # not acknowledged: try again with the next call
            raise
        return found

    def _push(self, found: list[bytes]) -> None:
        for i in range(0, len(found), 2):
            self._buffer.append((found[i].decode(), found[i + 1]))
        self._work_ready.set()

    async def _wait_for_work(self, timeout: float) -> bool:
        """Block on the queue for one job; whether one was taken (or found gone). Blocking at most
        a second: stop requests are noticed within it."""
        qkey, akey = self._keys[0], self._keys[1]
        if self._budget is not None:
            self._budget.remaining -= 1
        job_id = None
        try:
            job_id = await self._redis.blmove(qkey, akey, timeout, "LEFT", "RIGHT")  # type: ignore[arg-type]
        finally:
            if self._budget is not None:
                self._budget.settle(1, 1 if job_id is not None else 0)
        if job_id is None:
            return False
        jid = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
        started = utcformat(datetime.now(UTC))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(JOB_PREFIX + jid, "data")
            pipe.hset(JOB_PREFIX + jid, mapping={"status": JobStatus.STARTED, "started_at": started,
                                                 "worker_name": self.worker})
            data, _ = await pipe.execute()
        if data is None:  # its hash is gone (FLUSHALL): nothing to run
            await self._redis.delete(JOB_PREFIX + jid)
            await self._redis.lrem(akey, 1, jid)
            return True
        self._push([jid.encode(), data])
        return True

    # -- running jobs -----------------------------------------------------------------------------

    async def _lane(self) -> None:
        while True:
            while not self._buffer or self._stopping.is_set():
                if self._stopping.is_set():
                    return
                self._work_ready.clear()
                await self._work_ready.wait()
            job_id, data = self._buffer.popleft()
            self._running += 1
            try:
                await self._execute(job_id, data)
            except Exception as exc:
                if not redis_unavailable(exc):
                    raise
                # Its outcome could not be recorded before the worker stopped (`_recorded`): the
                # job stays in this worker's active list (run again when the worker's jobs are
                # rescued); the lane goes on.
                log.error("job outcome not recorded: Redis unavailable", job_id=job_id, error=type(exc).__name__)
            finally:
                self._running -= 1
                self._room_freed.set()

    async def _execute(self, job_id: str, data: bytes) -> None:
        start = time.perf_counter()
        func = "?"
        with structlog.contextvars.bound_contextvars(job_id=job_id, queue=self.queue):
            try:
                func, args = decode_job_data(data)
                handler = self._handlers.get(func)
                if handler is None:
                    raise LookupError(f"no handler registered for {func!r}")
                await handler(JobContext(job_id, self.queue, func, self._stopping), *args)
            except Retry as retry:
                await self._recorded(job_id, functools.partial(self._reschedule, job_id, retry.delay))
                self._observe(func, "retried", start)
                log.info("job rescheduled", kind=func.rsplit(".", 1)[-1], outcome="retried",
                         delay=round(retry.delay, 3), reason=str(retry),
                         duration_ms=round((time.perf_counter() - start) * 1000, 2))
            except Moved as moved:
                await self._recorded(job_id, functools.partial(self._move, job_id, moved.queue))
                self._observe(func, "retried", start)
                log.info("job moved", kind=func.rsplit(".", 1)[-1], outcome="moved", to=moved.queue,
                         reason=str(moved))
            except asyncio.CancelledError:
                # Cold shutdown: give the job back so another worker runs it.
                await asyncio.shield(self._requeue([job_id]))
                raise
            except Exception as exc:
                self.failed += 1
                self._observe(func, "failed", start)
                await self._recorded(job_id, functools.partial(self._fail, job_id, exc))
                log.error("job failed", kind=func.rsplit(".", 1)[-1], outcome="failed",
                          error=f"{type(exc).__name__}: {exc}",
                          duration_ms=round((time.perf_counter() - start) * 1000, 2))
            else:
                self.processed += 1
                self._observe(func, "ok", start)
                self._finish(job_id)
                if self._log_each_job:
                    log.info("job done", kind=func.rsplit(".", 1)[-1], outcome="ok",
                             duration_ms=round((time.perf_counter() - start) * 1000, 2))
                else:
                    self._sum_up(func, time.perf_counter() - start)

    def _sum_up(self, func: str, seconds: float) -> None:
        kind = self._quiet.setdefault(func.rsplit(".", 1)[-1], [0, 0.0, 0.0])
        kind[0] += 1
        kind[1] += seconds
        kind[2] = max(kind[2], seconds)
        if time.monotonic() - self._quiet_since >= 60.0:
            with structlog.contextvars.bound_contextvars(job_id=None):
                for name, (count, total, longest) in self._quiet.items():
                    log.info("jobs done", kind=name, outcome="ok", count=int(count),
                             mean_ms=round(total / count * 1000, 3), max_ms=round(longest * 1000, 2),
                             period_s=round(time.monotonic() - self._quiet_since, 1))
            self._quiet.clear()
            self._quiet_since = time.monotonic()

    def _observe(self, func: str, outcome: Literal["ok", "failed", "retried"], start: float) -> None:
        if self._metrics is not None:  # a kind only for registered handlers: the label set stays bounded
            kind = func.rsplit(".", 1)[-1] if func in self._handlers else "unknown"
            # A child's own queue counts as its shared queue's (`messages@a/tp-worker-w0` as
            # `messages`): the label set stays the same whatever the number of hosts and children.
            self._metrics.job_finished(base_queue(self.queue), kind, outcome, time.perf_counter() - start)

    def _finish(self, job_id: str) -> None:
        """Acknowledged with the next take (one round trip for a batch); a crash before that
        re-runs the job, which every handler tolerates (a send claims its row first)."""
        self._acks.append(job_id)
        self._room_freed.set()

    async def _recorded(self, job_id: str, write: Callable[[], Awaitable[None]]) -> None:
        """Write a job's outcome (rescheduled, moved, failed), trying again while Redis is
        unavailable: a job whose outcome is not written stays in this worker's active list and
        counts as live, so the reconciler would not enqueue its campaign again while this worker
        lives. Given up once the worker stops (its jobs are rescued when it is gone). A write
        applied whose answer was lost may be made twice: a job run twice is harmless (a send
        claims its row, a campaign member runs once per process)."""
        delay = OUTCOME_RETRY_FIRST
        while True:
            try:
                await write()
                return
            except Exception as exc:
                if not redis_unavailable(exc) or self._stopping.is_set():
                    raise
                log.warning("job outcome not recorded yet: Redis unavailable, trying again", job_id=job_id,
                            error=type(exc).__name__, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, OUTCOME_RETRY_CAP)

    async def _fail(self, job_id: str, exc: BaseException) -> None:
        now = time.time()
        exc_info = zlib.compress("".join(traceback.format_exception(exc)).encode())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrem(active_jobs(self.queue, self.worker), 1, job_id)
            pipe.hset(JOB_PREFIX + job_id, mapping={"status": JobStatus.FAILED, "exc_info": exc_info,
                                                    "ended_at": utcformat(datetime.now(UTC))})
            pipe.expire(JOB_PREFIX + job_id, FAILURE_TTL)
            pipe.zadd(failed_key(self.queue), {job_id: now + FAILURE_TTL})
            await pipe.execute()

    async def _reschedule(self, job_id: str, delay: float) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrem(active_jobs(self.queue, self.worker), 1, job_id)
            pipe.hset(JOB_PREFIX + job_id, "status", JobStatus.SCHEDULED)
            pipe.zadd(scheduled_key(self.queue), {job_id: time.time() + delay})
            await pipe.execute()

    async def _move(self, job_id: str, queue: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lrem(active_jobs(self.queue, self.worker), 1, job_id)
            pipe.hset(JOB_PREFIX + job_id, mapping={"status": JobStatus.QUEUED, "origin": queue})
            pipe.hincrby(JOB_PREFIX + job_id, ROUTE_HOPS_FIELD, 1)
            pipe.sadd(QUEUES_SET, queue_key(queue))
            pipe.rpush(queue_key(queue), job_id)
            await pipe.execute()

    async def _requeue(self, job_ids: Iterable[str]) -> None:
        """Back to the front of the queue, in their order."""
        ids = list(job_ids)
        if not ids:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for job_id in ids:
                pipe.lrem(active_jobs(self.queue, self.worker), 1, job_id)
                pipe.hset(JOB_PREFIX + job_id, "status", JobStatus.QUEUED)
            pipe.lpush(queue_key(self.queue), *reversed(ids))
            await pipe.execute()

    # -- stopping ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking jobs (warm shutdown); jobs in hand go on, buffered ones go back in `drain`."""
        self._stopping.set()
        self._work_ready.set()
        self._room_freed.set()

    async def drain(self, deadline: float) -> int:
        """Wait for jobs in hand until `deadline` (monotonic), then cancel the rest (they are requeued).

        Returns how many were cancelled."""
        self.stop()
        buffered = [job_id for job_id, _ in self._buffer]
        self._buffer.clear()
        try:
            await self._requeue(buffered)
        except REDIS_DOWN as exc:
            log.warning("buffered jobs not requeued (rescued later)", count=len(buffered), error=type(exc).__name__)
        busy = [lane for lane in self._lanes if not lane.done()]
        running = self._running
        if busy:
            _, still = await asyncio.wait(busy, timeout=max(0.0, deadline - time.monotonic()))
            cancelled = running if still else 0
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        else:
            cancelled = 0
        if self._acks:
            try:
                await self._call(0)
            except REDIS_DOWN as exc:
                log.warning("finished jobs not acknowledged", count=len(self._acks), error=type(exc).__name__)
        return cancelled


async def heartbeat(redis: aioredis.Redis, worker: str, info: str = "") -> None:
    await redis.set(WORKER_HEARTBEAT_PREFIX + worker, info or "alive", ex=WORKER_TTL)


async def active_workers(redis: aioredis.Redis, queues: Iterable[str]) -> set[str]:
    """Workers that hold taken jobs (they have an active list), alive or not."""
    workers: set[str] = set()
    for queue in queues:
        prefix = active_jobs(queue, "")
        async for key in redis.scan_iter(match=prefix + "*", count=200):
            workers.add(key.decode()[len(prefix):])
    return workers


async def rescue_abandoned(redis: aioredis.Redis, queues: list[str], *, dead: Iterable[str] = ()) -> int:
    """Return jobs held by workers whose heartbeat expired (or that are known `dead`) to the front
    of their queues."""
    known_dead = set(dead)
    rescued = 0
    for queue in queues:
        prefix = active_jobs(queue, "")
        async for key in redis.scan_iter(match=prefix + "*", count=200):
            worker = key.decode()[len(prefix):]
            if worker not in known_dead and await redis.exists(WORKER_HEARTBEAT_PREFIX + worker):
                continue
            while (taken := await redis.lmove(key, queue_key(queue), "RIGHT", "LEFT")) is not None:
                rescued += 1
                job_id = taken.decode() if isinstance(taken, bytes) else str(taken)
                if not await redis.exists(JOB_PREFIX + job_id):
                    continue  # its hash is gone (FLUSHALL): the consumer drops it
                # Counted once back in the queue: a crash here leaves the job queued, never lost.
                deaths = await redis.hincrby(JOB_PREFIX + job_id, WORKER_DEATHS_FIELD, 1)
                if deaths >= MAX_WORKER_DEATHS:
                    await _park_as_failed(redis, queue, job_id, deaths)
                else:
                    await redis.hset(JOB_PREFIX + job_id, "status", "queued")
    if rescued:
        log.warning("abandoned jobs requeued", count=rescued)
    return rescued


async def _park_as_failed(redis: aioredis.Redis, queue: str, job_id: str, deaths: int) -> None:
    """A job whose worker died that often while holding it would kill every worker that takes it:
    failed (RQ's failed registry, requeueable by hand), not retried forever."""
    reason = (f"WorkerDied: the worker running this job died {deaths} times (killed by a signal, "
              "os._exit or out of memory); parked as failed instead of being retried\n")
    async with redis.pipeline(transaction=True) as pipe:
        pipe.lrem(queue_key(queue), 1, job_id)
        pipe.hset(JOB_PREFIX + job_id, mapping={"status": "failed", "exc_info": zlib.compress(reason.encode()),
                                                "ended_at": utcformat(datetime.now(UTC))})
        pipe.expire(JOB_PREFIX + job_id, FAILURE_TTL)
        pipe.zadd(failed_key(queue), {job_id: time.time() + FAILURE_TTL})
        await pipe.execute()
    log.error("job parked as failed: its worker died running it", job_id=job_id, queue=queue, deaths=deaths)

"""A worker child: one long-lived process that hosts Telegram sessions and runs the queues' jobs.

Started by the pool with fork+exec (a fresh interpreter), it never forks itself, so TDLib may run
in it. `WorkerChild.serve` goes through four phases, as uvicorn's `Server` (startup, main loop,
shutdown) and arq's `Worker` do: `start` opens what the jobs need, `run` runs the periodic tasks and
the consumers in one task group until asked to stop, `drain` lets the jobs in hand finish within
`worker_drain_seconds`, and `close` closes the sessions and the resources. A signal only records the
intent to stop; the child then exits 0 (1 after a consumer crashed, 2 on a configuration error).

Which stop it is, the signal says: SIGTERM (or SIGINT) is the host's worker stopping (supervisord
signals the whole process group, the pool forwards it, systemd stops supervisord), and the drain
then hands the accounts off to the other live hosts (`TP_DRAIN_ON_STOP`), unless the platform is
restarting the worker (ops/restart_mark.py: it comes straight back); RECYCLE_SIGNAL (SIGUSR1)
is the pool replacing this one child (memory), and its accounts stay on the host for the next
child to resume, as they do after `TP_WORKER_MAX_JOBS` or when the pool is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import redis_keys
from ..logs import configure_logging
from ..metrics.definitions import Metrics, create_metrics
from ..ops.procfs import read_stat
from ..ops.restart_mark import is_restarting
from ..queue.consumer import JobBudget, JobHandler, QueueConsumer, active_workers, heartbeat, rescue_abandoned
from ..queue.registry import (
    APPLY_MESSAGE_CHANGE,
    DELIVER_WEBHOOK,
    QUEUE_NAMES,
    RUN_CAMPAIGN,
    SEND_MESSAGE,
    STORE_INCOMING,
    base_queue,
)
from ..queue.routing import (
    ROUTED_QUEUES,
    SendRouter,
    hand_back_dead_host_queues,
    host_queues,
    mark_alive,
    mark_gone,
    slot_of,
)
from ..queue.scheduler import Scheduler
from ..settings import ConfigError, Settings
from ..storage import hosts as host_store
from ..storage.db import open_pool
from ..storage.files import BlobStore, FileStore, open_blob_store
from ..storage.migrations import ensure_schema
from ..storage.outbox import Outbox
from ..storage.redis import open_redis
from ..tasks import cancel_and_wait
from ..telegram.base import Update
from ..telegram.factory import create_backend
from ..telegram.formatting import configure_logging as configure_tdlib_logging
from ..telegram.instrumented import instrument_backend
from .account_requests import AccountRequests
from .account_sessions import (
    DRAIN_CHECK_SECONDS,
    LEASE_RENEW_SECONDS,
    LEASE_RETRY_SECONDS,
    ORPHAN_SCAN_SECONDS,
    AccountSessions,
)
from .campaigns import CampaignRunner
from .liveness import DeadLeases, Liveness, alive
from .pool import RECYCLE_SIGNAL
from .rebalance import ROUND_SECONDS as REBALANCE_ROUND_SECONDS
from .rebalance import Rebalancer
from .reconciler import reconcile_campaigns, reconcile_outbox
from .retention import PURGE_EVERY_SECONDS, PURGE_FIRST_AFTER_SECONDS, Purger
from .sender import Sender
from .unknown_outcomes import settle_abandoned_sends
from .webhooks import BREAKERS_EVERY_SECONDS, WebhookService

# Named explicitly: this module runs as __main__ in the child.
log = structlog.get_logger("telegram_platform.worker.child")

PR_SET_PDEATHSIG = 1
# Closing a thousand TDLib clients takes seconds on two cores (benchmarks/tdlib_clients.py). Below a
# lease's TTL: AccountSessions.aclose renews the leases just before, so they outlive the close.
CLOSE_SESSIONS_SECONDS = 12.0
# After the consumers are told to stop, how long their take loops get to return before the drain.
CONSUMERS_STOP_SECONDS = 2.0


def die_with_parent() -> None:
    """Ask the kernel to signal us when the pool dies, even by SIGKILL: no orphans. As a recycle, not
    a stop of the host: a pool that died alone is restarted (tp-events), and resumes the accounts."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, RECYCLE_SIGNAL)
    except OSError:
        pass


@dataclass(frozen=True, slots=True)
class Periodic:
    """A task the child runs every `every_seconds` while it is up, the first time after `first_after`.
    A failed round is logged and the next one runs as usual (after `retry_seconds`, when given): one
    bad round must not stop the child."""

    name: str
    every_seconds: float
    run: Callable[[], Awaitable[object]]
    first_after: float = 0.0
    retry_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ChildServices:
    """What `start` builds for the phases after it."""

    pool: asyncpg.Pool
    redis: Redis
    liveness: Liveness
    metrics: Metrics
    sessions: AccountSessions
    account_requests: AccountRequests
    outbox: Outbox
    router: SendRouter
    sender: Sender
    campaigns: CampaignRunner
    webhooks: WebhookService
    purger: Purger
    consumers: list[QueueConsumer]
    budget: JobBudget | None
    files: FileStore
    scheduler: Scheduler
    dead_leases: DeadLeases
    rebalancer: Rebalancer


class WorkerChild:
    """One incarnation of a pool slot; `name` is its identity (the slot's name plus this pid): its
    heartbeat, lease owner, claims and liveness lock. `reaped` names earlier incarnations known dead."""

    def __init__(self, settings: Settings, *, name: str, parent_pid: int | None = None,
                 reaped: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.name = name
        self.parent_pid = parent_pid
        self.reaped = reaped
        # Set by a signal, by the pool's disappearance, by the job budget, or by a consumer's end.
        self.stopping = asyncio.Event()
        # The stop is the host's worker stopping (SIGTERM), not this child's replacement: its
        # accounts are handed off to the other live hosts during the drain.
        self.host_stopping = False
        self.crashed = False
        self.cancelled_jobs = 0
        # Rounds run per periodic task (what a test or a debugger reads).
        self.rounds: Counter[str] = Counter()
        # Every task `run` started, all done once it returns.
        self.tasks: list[asyncio.Task[None]] = []

    # -- intent -----------------------------------------------------------------------------------

    def handle_exit(self, *, host_stopping: bool = True) -> None:
        """The signal handler: only record the intent (and which stop it is); `run` notices it and
        the phases do the work. A SIGTERM after a recycle began still makes it the host's stop."""
        self.host_stopping = self.host_stopping or host_stopping
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit)
        loop.add_signal_handler(RECYCLE_SIGNAL, functools.partial(self.handle_exit, host_stopping=False))

    # -- the phases -------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Run until SIGTERM (or `TP_WORKER_MAX_JOBS` jobs); the exit code: 1 after a consumer
        crashed (the pool restarts it with back-off), else 0 (the pool replaces it at once)."""
        self.install_signal_handlers()
        structlog.contextvars.bind_contextvars(worker=self.name)
        log.info("worker child starting", telegram_backend=self.settings.telegram_backend)
        # No socket_timeout on this client: with one, redis-py 8 loses a task's cancellation when it lands
        # during a read (redis-py#2028, #2551), and a child whose loops ignore their cancellation never
        # stops. What must not wait on a Redis that stops answering is bounded where it is awaited
        # instead: lease renewals (3 s), an incoming message's hand-over (15 s).
        # The file store first: an S3 store that refuses its credentials stops the child (ConfigError).
        async with open_blob_store(self.settings.files) as blobs, open_pool(self.settings) as pool, \
                open_redis(self.settings.redis) as redis:
            services = await self.start(pool, redis, blobs)
            await self.run(services)
            await self.close(services)
        return 1 if self.crashed else 0

    async def start(self, pool: asyncpg.Pool, redis: Redis, blobs: BlobStore | None = None) -> ChildServices:
        """Open what the jobs need. The schema first: a child on a schema behind the code stops with
        a ConfigError before it takes anything. Then the liveness lock, before any claim: messages
        claimed by this process are judged by that lock, never by Redis (worker/liveness.py). Then the
        services, the heartbeat, and the jobs of the slot's previous incarnation, which is dead (the
        pool reaped it): they go back now, not when its heartbeat expires."""
        async with pool.acquire() as conn:
            await ensure_schema(conn, auto_migrate=self.settings.database.auto_migrate)
        liveness = Liveness(self.settings.database.url, self.name)
        await liveness.hold()
        await host_store.announce(pool, self.settings.host.id)
        services = self._build_services(pool, redis, liveness, FileStore(pool, blobs))
        await _heartbeat(redis, self.name, self.settings.host.id, services.sessions)
        await rescue_abandoned(redis, [*QUEUE_NAMES, *(services.router.own_queue(q) for q in ROUTED_QUEUES)],
                               dead=self.reaped)
        return services

    def _build_services(self, pool: asyncpg.Pool, redis: Redis, liveness: Liveness, files: FileStore) -> ChildServices:
        """Construct the account sessions, their requests, the outbox and the sender, the campaigns,
        the webhooks and the consumers: the one place that wires the services together (no I/O)."""
        settings, name = self.settings, self.name
        sessions_ref: list[AccountSessions] = []

        async def on_update(update: Update) -> None:
            await sessions_ref[0].on_update(update)

        metrics = create_metrics(settings.metrics_dir)  # this process's one Metrics (metrics/definitions.py)
        # Campaign texts are parsed by TDLib here (telegram/formatting.py), whichever the backend.
        configure_tdlib_logging(settings.tdlib.log_verbosity)
        backend = instrument_backend(create_backend(settings, on_update=on_update), metrics)
        sessions = AccountSessions(settings, pool, redis, backend, worker_name=name, metrics=metrics)
        sessions_ref.append(sessions)
        account_requests = AccountRequests(sessions, pool, redis, files=files)
        outbox = Outbox(pool, redis, sessions.redis_auth, log_length=settings.events.log_length,
                        count_failure=metrics.message_failed, publisher=sessions.events)
        router = SendRouter(redis, pool, settings.host.id, member=slot_of(name), gone_after=settings.host.gone_after,
                            hosted_here=lambda account_id: sessions.hosted(account_id) is not None)
        sender = Sender(sessions, outbox, pool, router=router, files=files)
        campaigns = CampaignRunner(sessions, sender, pool, redis)
        webhooks = WebhookService(settings, pool, redis, sessions.redis_auth)
        handlers: dict[str, JobHandler] = {SEND_MESSAGE: sender.send_message, RUN_CAMPAIGN: campaigns.run_campaign,
                                           STORE_INCOMING: sessions.incoming.store_incoming,
                                           APPLY_MESSAGE_CHANGE: sessions.incoming.apply_change,
                                           DELIVER_WEBHOOK: webhooks.deliver}
        # RQ's max_jobs: the consumers together take that many jobs, then this child stops warm.
        budget = JobBudget(settings.worker.max_jobs) if settings.worker.max_jobs else None
        # This child's own sends and campaign runs first (queue/routing.py), with as many lanes as the
        # shared queue's: a small job budget is reserved by the consumers that start first.
        own = [router.own_queue(queue) for queue in ROUTED_QUEUES]
        consumers = [
            QueueConsumer(redis, queue, worker=name,
                          concurrency=settings.worker.queue_concurrency[base_queue(queue)],
                          handlers=handlers, metrics=metrics, log_each_job=settings.worker.log_each_job, budget=budget)
            for queue in (*own, *QUEUE_NAMES)
        ]
        return ChildServices(pool=pool, redis=redis, liveness=liveness, metrics=metrics, sessions=sessions,
                             account_requests=account_requests, outbox=outbox, router=router, sender=sender,
                             campaigns=campaigns, webhooks=webhooks, files=files,
                             purger=Purger(pool, settings.retention, metrics), consumers=consumers, budget=budget,
                             scheduler=Scheduler(redis, QUEUE_NAMES, owner=name),
                             dead_leases=DeadLeases(pool, redis, self_identity=name),
                             rebalancer=Rebalancer(pool, redis, sessions.redis_auth,
                                                   moves_per_minute=settings.host.rebalance_moves_per_minute,
                                                   gone_after=settings.host.gone_after, metrics=metrics,
                                                   standing_by=lambda: sessions.draining or sessions.leaving))

    def periodic_tasks(self, s: ChildServices) -> tuple[Periodic, ...]:
        """The child's periodic tasks, all in this one table."""
        name, pool, redis, sessions, host_id = self.name, s.pool, s.redis, s.sessions, self.settings.host.id
        snapshots = (Periodic("state-snapshots", self.settings.tdlib.snapshot_seconds, sessions.snapshot_hosted,
                              first_after=self.settings.tdlib.snapshot_seconds),) \
            if self.settings.tdlib.snapshot_seconds else ()
        return (
            # A host stopping with a hand-off is no longer marked alive: no account is placed its way,
            # and its children's slots are no route (sends wait for the accounts' new owners).
            Periodic("heartbeat", 3, lambda: _heartbeat(redis, name, host_id, sessions, host_alive=not sessions.leaving,
                                                        slot_alive=not sessions.handing_off)),
            # The host's, in PostgreSQL (storage/hosts.py): what `tp hosts` judges up or gone by.
            Periodic("host-heartbeat", host_store.HEARTBEAT_SECONDS, lambda: host_store.announce(pool, host_id)),
            Periodic("rescue", 3, lambda: _rescue(pool, redis, name)),
            # A renewal that failed is tried again soon: one Redis blip must not close every session.
            Periodic("leases", LEASE_RENEW_SECONDS, sessions.renew_leases, retry_seconds=LEASE_RETRY_SECONDS),
            Periodic("orphaned-accounts", ORPHAN_SCAN_SECONDS, sessions.resume_orphaned_accounts,
                     first_after=ORPHAN_SCAN_SECONDS),
            # A draining host (`tp drain`) hands its accounts to the other up hosts (docs/operations.md).
            Periodic("drain", DRAIN_CHECK_SECONDS, sessions.drain),
            # Accounts moved onto hosts under their fair share, by one decider at a time (rebalance.py).
            Periodic("rebalance", REBALANCE_ROUND_SECONDS, s.rebalancer.run_once, first_after=REBALANCE_ROUND_SECONDS),
            Periodic("dead-leases", 3, s.dead_leases.sweep),
            Periodic("stats", 5, lambda: _publish_stats(redis, name, sessions, host_id)),
            Periodic("abandoned-sends", 2, lambda: settle_abandoned_sends(
                pool, s.outbox, sends_random_id=s.sender.sends_random_id, self_identity=name, redis=redis,
                unrecorded=s.sender.unrecorded)),
            Periodic("reconcile", 10, lambda: reconcile_outbox(pool, redis)),
            Periodic("reconcile-campaigns", 3, lambda: reconcile_campaigns(pool, redis,
                                                                           running_here=s.campaigns.active)),
            Periodic("webhook-sweep", 60, s.webhooks.sweep),
            Periodic("webhook-breakers", BREAKERS_EVERY_SECONDS, s.webhooks.breakers),
            # Finished rows past their retention; one child at a time does it (an advisory lock).
            Periodic("retention-purge", PURGE_EVERY_SECONDS, s.purger.run_once, first_after=PURGE_FIRST_AFTER_SECONDS),
            # Incoming messages spooled to disk while Redis and PostgreSQL were both away.
            Periodic("incoming-spool", 5, sessions.incoming.drain_spool),
            # Each logged-in account's Telegram state into PostgreSQL (worker/tdstate.py).
            *snapshots,
            *self._file_purge(s.files),
        )

    def _file_purge(self, store: FileStore) -> tuple[Periodic, ...]:
        """Files unused past TP_FILE_RETENTION_DAYS go, in batches (none with retention 0). Every
        child may run it: the batches skip rows another child is deleting."""
        retention = self.settings.files.retention_days
        if retention <= 0:
            return ()
        interval = self.settings.files.purge_interval
        return (Periodic("file-purge", interval, lambda: store.purge_all(retention), first_after=min(60.0, interval)),)

    def _resident_tasks(self, s: ChildServices) -> dict[str, Callable[[], Coroutine[Any, Any, object]]]:
        """The tasks that loop on their own (or run once) beside the periodic ones, by name."""
        resident: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
            "liveness": s.liveness.keep,
            "scheduler": s.scheduler.run,
            "resume-ready-accounts": s.sessions.resume_ready_accounts,
            "webhook-events": s.webhooks.listen,
        }
        if self.parent_pid is not None:
            resident["parent-watch"] = self._watch_parent
        if s.budget is not None:
            budget = s.budget
            resident["job-budget"] = lambda: self._recycle_after(budget, s.consumers)
        return resident

    async def run(self, s: ChildServices) -> None:
        """Run the periodic tasks, the resident tasks, the account requests and the consumers in one
        task group until asked to stop, then `drain`, then cancel and await every task. The drain
        runs inside the group: the heartbeat, the lease renewals and the liveness lock must go on
        while the jobs in hand finish, or another worker would take their accounts and jobs. A task
        that fails is logged where it fails and does not stop the others; a consumer's end stops
        the child."""
        async with asyncio.TaskGroup() as group:
            try:
                for periodic in self.periodic_tasks(s):
                    self._spawn(group, periodic.name, functools.partial(self._every, periodic))
                for task_name, factory in self._resident_tasks(s).items():
                    self._spawn(group, task_name, factory)
                serving = self._spawn(group, "account-requests", lambda: s.account_requests.serve_requests(s.redis))
                consuming = [self._spawn(group, f"consumer:{c.queue}", functools.partial(self._consume, c))
                             for c in s.consumers]
                log.info("worker child ready", queues={c.queue: c.concurrency for c in s.consumers})
                await self.stopping.wait()
                self.cancelled_jobs = await self.drain(s, consuming, serving)
            finally:
                # Cancelled again while one runs on: a cancellation lost inside redis-py or asyncpg
                # (tasks.py) would otherwise hold the child until the pool kills it.
                await cancel_and_wait(self.tasks)

    async def drain(self, s: ChildServices, consuming: list[asyncio.Task[None]],
                    serving: asyncio.Task[None]) -> int:
        """Stop taking jobs; the jobs in hand get `worker_drain_seconds` to finish, then the rest
        are cancelled and requeued (the count is returned). The deadline is below the pool's SIGKILL
        (drain + 15 s) and supervisord's `stopwaitsecs`, with room for `close`. Account requests are
        answered while the jobs drain, since the sessions are all still open; only then are no new
        ones taken, and those in hand are answered before `close` closes the sessions."""
        log.info("worker child stopping: finishing jobs in hand", deadline_s=self.settings.worker.drain_seconds)
        deadline = time.monotonic() + self.settings.worker.drain_seconds
        for consumer in s.consumers:
            consumer.stop()
        await asyncio.wait(consuming, timeout=CONSUMERS_STOP_SECONDS)
        cancelled = sum(await asyncio.gather(*(c.drain(deadline) for c in s.consumers)))
        s.account_requests.stop_taking_requests()
        await asyncio.wait([serving], timeout=max(0.0, deadline - time.monotonic()))
        await s.account_requests.finish_answers(deadline)
        if self.host_stopping and self.settings.host.drain_on_stop:
            if is_restarting(self.settings.var_dir, self.parent_pid):
                log.info("restarting: the accounts stay on this host")
            else:
                # The jobs are done or requeued: what is left of the same deadline hands the accounts
                # off, while the heartbeat and the lease renewals still run (docs/scaling.md).
                await s.sessions.hand_off(deadline)
        return cancelled

    async def close(self, s: ChildServices) -> None:
        """After every task has stopped (the lease renewals among them): close the sessions within
        CLOSE_SESSIONS_SECONDS, inside a lease's TTL, so no other host opens an account whose
        database this one still has open; then the webhooks' HTTP session; then remove the heartbeat
        and the stats, hand back account requests routed here and mark its slot gone, so its queue
        goes back to the shared one at once (nothing routes here once those are gone; best effort:
        they expire by themselves, and a Redis that is away must not fail the stop). The liveness
        lock goes last: once it is released, this process counts as dead and its claims may be
        settled by others."""
        with contextlib.suppress(TimeoutError):
            # Kept this host's unless it handed its accounts off: a restart, a recycle and the only
            # host stopping resume them here; what a hand-off left goes to the other hosts.
            await s.sessions.aclose(time.monotonic() + CLOSE_SESSIONS_SECONDS,
                                    keep_ownership=not s.sessions.handing_off)
        await s.webhooks.aclose()
        with contextlib.suppress(RedisError, OSError):
            await s.redis.delete(redis_keys.worker_heartbeat(self.name), redis_keys.tdlib_stats(self.name))
            await s.account_requests.hand_back_requests(s.redis)
            await mark_gone(s.redis, self.name)  # its slot's queue goes back to the shared one now
        await s.liveness.close()
        log.info("worker child stopped", cancelled_jobs=self.cancelled_jobs,
                 processed=sum(c.processed for c in s.consumers))

    # -- the tasks --------------------------------------------------------------------------------

    def _spawn(self, group: asyncio.TaskGroup, name: str,
               factory: Callable[[], Coroutine[Any, Any, object]]) -> asyncio.Task[None]:
        task = group.create_task(self._logged(name, factory), name=name)
        self.tasks.append(task)
        return task

    @staticmethod
    async def _logged(name: str, factory: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """A task's failure is logged and kept from the task group, which would otherwise cancel the
        other tasks (the heartbeat, the drain) with it."""
        try:
            await factory()
        except Exception as exc:
            log.error("background task failed", task=name, exc_info=exc)

    async def _every(self, periodic: Periodic) -> None:
        await asyncio.sleep(periodic.first_after)
        while True:
            wait = periodic.every_seconds
            try:
                await periodic.run()
            except Exception:
                log.exception("periodic task failed", task=periodic.name)
                wait = periodic.retry_seconds if periodic.retry_seconds is not None else wait
            self.rounds[periodic.name] += 1
            await asyncio.sleep(wait)

    async def _consume(self, consumer: QueueConsumer) -> None:
        """A consumer returns once told to stop; ending before that (a crash) stops the child, which
        then exits 1."""
        try:
            await consumer.run()
        except Exception as exc:
            if not self.stopping.is_set():
                self.crashed = True
                log.error("consumer crashed", error=repr(exc))
            raise
        finally:
            self.stopping.set()

    async def _recycle_after(self, budget: JobBudget, consumers: list[QueueConsumer]) -> None:
        """RQ's `max_jobs`: once that many jobs are taken, let them finish and stop warm; the pool
        starts a fresh child at once."""
        await budget.spent.wait()
        while any(c.in_flight for c in consumers):  # noqa: ASYNC110 - lanes expose counts, not events
            await asyncio.sleep(0.05)
        log.info("worker child recycling: max jobs reached", max_jobs=self.settings.worker.max_jobs)
        self.stopping.set()

    async def _watch_parent(self) -> None:
        # PDEATHSIG covers Linux; this covers a parent that vanished before prctl took effect.
        while os.getppid() == self.parent_pid:  # noqa: ASYNC110 - nothing to wait on but time
            await asyncio.sleep(1)
        log.warning("pool process gone, stopping")
        self.stopping.set()


async def _heartbeat(redis: Redis, name: str, host_id: str, sessions: AccountSessions, *,
                     host_alive: bool = True, slot_alive: bool = True) -> None:
    """This process's heartbeat, its slot's (with the accounts it holds) unless it is handing its
    accounts off, and its host's unless the host is leaving: sends are routed to its slot's queue
    while it lasts, and accounts placed by the loads it publishes."""
    await heartbeat(redis, name)
    await mark_alive(redis, host_id, identity=name if slot_alive else None, hosted=sessions.hosted_count(),
                     host=host_alive)


async def _rescue(pool: asyncpg.Pool, redis: Redis, name: str) -> int:
    """Jobs taken by workers that are gone go back to their queues: gone as PostgreSQL sees it (at
    once), or with an expired heartbeat. A job run twice is harmless (sends claim their rows). Then
    the queues of children (slots) no longer alive go to the shared queues (queue/routing.py)."""
    queues = [*QUEUE_NAMES, *await host_queues(redis)]
    holders = await active_workers(redis, queues) - {name}
    dead = holders - await alive(pool, holders) if holders else set()
    rescued = await rescue_abandoned(redis, queues, dead=dead)
    return rescued + await hand_back_dead_host_queues(redis, slot_of(name))


async def _publish_stats(redis: Redis, name: str, sessions: AccountSessions, host_id: str) -> None:
    """What /api/tdlib/health, the metrics and `tp hosts` read; it expires if this process dies."""
    stats = sessions.stats()
    stat = read_stat(os.getpid())
    stats.update(host=host_id, rss_bytes=stat.rss_bytes if stat else None)
    await redis.set(redis_keys.tdlib_stats(name), json.dumps(stats), ex=15)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="tp-worker-child")
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--reaped", action="append", default=[],
                        help="identity of a previous child of this slot, known dead")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(app_mode="worker")
    except ConfigError as exc:
        print(f"tp-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    # One identity per incarnation: a restarted child never inherits its predecessor's claims,
    # active jobs or leases by accident; they are judged dead or alive on their own.
    identity = f"{args.name}-{os.getpid()}"
    configure_logging(level=settings.logging.level, fmt=settings.logging.format, process=identity)
    child = WorkerChild(settings, name=identity, parent_pid=args.parent_pid, reaped=tuple(args.reaped))
    try:
        return asyncio.run(child.serve())
    except ConfigError as exc:  # found at start, e.g. a schema behind the code (the pool restarts us)
        print(f"tp-worker: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

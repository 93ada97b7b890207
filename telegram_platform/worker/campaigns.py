"""The campaign engine: a job per worker child that holds some of a campaign's accounts, every
account sending at its permitted pace.

A campaign is not one RQ job per message. Its shared job (`run_campaign` on `campaigns`, as the API
and the reconciler enqueue it) only fans out: for each worker child (on any host) that owns some of
the campaign's accounts, it makes sure that child's member job (`run_campaign` on its routed queue,
`campaigns@<host>/<slot>`, one job id per campaign and queue) is queued or running. A member runs a
sender for each campaign account it holds, so the members' rates add up to the campaign's accounts'
summed ceiling. Where an account runs is `SendRouter.route`'s answer (queue/routing.py;
`route_many` for all of them together): open here, its live owner, or, for an account nobody owns,
the least-loaded child of the least-loaded host (which opens it). A member asks again every
`ROUTE_SECONDS` and fans out too, so an account that moved (its host died, a drain, a move) is run
by its new owner within seconds; a sender whose account is found owned elsewhere stops without
claiming anything.

Each sender takes recipients from PostgreSQL in small batches (FOR UPDATE SKIP LOCKED, so senders
never take the same one), waits on its account's pacer (worker/pacing.py: per second with burst,
per chat, per day on a warm-up ramp, and Telegram's own flood waits), claims the message and sends
it exactly as a single message is sent (`Sender.send`, worker/sender.py). A batch is about a second of the
account's rate, so a stopped account strands little.

What is not finished in PostgreSQL is not finished: PostgreSQL alone decides that a campaign is
complete (`complete_if_done`), whichever member asks; a campaign none of whose jobs is live is
found running by the reconciler and its shared job enqueued again; its account senders pick up the
messages already assigned to them (`queued`) before taking new recipients. An account that cannot send for long
(daily limit, a long flood wait, PEER_FLOOD, logged out) hands its never-attempted messages back as
pending recipients for the campaign's other accounts, on any host. A member whose own accounts
cannot send fails the campaign only when PostgreSQL shows none of its other accounts able to send
either; a member holding none of them never judges it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..batching import Coalescer
from ..errors import NotFound
from ..outages import POSTGRES_DOWN, REDIS_DOWN
from ..queue.consumer import JobContext, Retry
from ..queue.jobs import Enqueuer
from ..queue.registry import CAMPAIGNS_QUEUE, RUN_CAMPAIGN, campaign_job_id
from ..queue.routing import SendRouter
from ..redis_keys import campaign_progress
from ..states import CampaignStatus
from ..storage import campaigns as campaign_store
from ..storage.optouts import peer_key
from ..telegram.base import AuthState, OwnedElsewhere, TelegramError
from .account_sessions import AccountSessions
from .pacing import AccountPacer
from .sender import Sender

log = structlog.get_logger(__name__)

# Sends of one account in flight at once. One: a send starts only after the previous one was
# answered, so a slow answer (a stalled network or loop) can never bunch the following sends up
# behind it and past Telegram's burst; the pacer then spaces the next one from when it really goes.
IN_FLIGHT_PER_ACCOUNT = 1
# Recipients an account takes at once: about a second of its sends, so that accounts share a
# campaign's tail evenly and a stopped account strands little.
BATCH_SECONDS = 1.0
BATCH_MAX = 50
# But never fewer than this: an account at 1 message/s taking one recipient at a time would make
# a refill per send (refills asked for together share one transaction, assign_batches).
BATCH_MIN = 4
# Accounts whose refills one transaction makes at most.
REFILL_ACCOUNTS_MAX = 200
# An account that must wait longer than this (daily limit, flood wait) gives its messages back.
LONG_WAIT_SECONDS = 30.0
# How often the runner looks at the campaign's status, and publishes its progress.
WATCH_SECONDS = 0.5
PROGRESS_SECONDS = 1.0
# When every account waits long, the job steps aside (Retry) for at most this long.
IDLE_RETRY_SECONDS = 60.0
# How often a member asks again where the campaign's accounts run (and fans out to their hosts).
ROUTE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Plan:
    """Where a campaign's accounts run, as one runner sees them now: `here`, this worker's to run;
    `elsewhere`, each other member's routed queue with its accounts; `awaiting`, seconds until the
    first lease of a dead host on one of them expires (0: none)."""

    here: frozenset[int]
    elsewhere: dict[str, list[int]] = field(default_factory=dict)
    awaiting: float = 0.0

    @property
    def covers_all(self) -> bool:
        """Every account of the campaign is this runner's: no other member runs any of them."""
        return not self.elsewhere and not self.awaiting


@dataclass(frozen=True, slots=True)
class SenderResult:
    account_id: int
    # done: nothing left for it; stopped: asked to; waiting: must wait `wait` s; unusable: cannot send;
    # moved: another member runs it now (its queued messages stay its own, for that member).
    outcome: str
    wait: float = 0.0
    detail: str = ""
    # What a waiting account waits on (pacing.AccountPacer.held_by's limit).
    limit: str = ""


# The refills of a campaign's accounts asked for together: one transaction for many accounts
# (storage/campaigns.py's assign_batches), each (account_id, how many) answered (messages, others taken).
Refills = Coalescer[tuple[int, int], tuple[list[dict[str, Any]], int]]


@dataclass(slots=True)
class _AccountRun:
    """One account's sender in a round: its pacer, its batch size, the messages it took and has not
    started, its sends in flight, and whether its own queued messages must be looked at before new
    recipients are taken (at the start, and after a send of its was given back to the queue)."""

    pacer: AccountPacer
    batch: int
    refills: Refills
    buffer: deque[dict[str, Any]] = field(default_factory=deque)
    in_flight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(IN_FLIGHT_PER_ACCOUNT))
    look_in_queue: bool = True


class CampaignRunner:
    """Runs the campaigns' jobs: opens their accounts through `sessions`, sends through `sender`,
    and asks the sender's router (None: one host, every account runs here) where each account runs."""

    def __init__(self, sessions: AccountSessions, sender: Sender, pool: asyncpg.Pool, redis: aioredis.Redis) -> None:
        self._sessions = sessions
        self._sender = sender
        self._pool = pool
        self._redis = redis
        self._router: SendRouter | None = sender.router
        self._enqueuer = Enqueuer(redis)
        # Campaigns whose member runs in this process (the shared job's fan-out is not counted).
        self.active: set[int] = set()

    async def run_campaign(self, ctx: JobContext, campaign_id: int) -> None:
        """The `run_campaign` job: on the shared queue, fan out; on this worker's routed queue, run
        the campaign's accounts held here. A second member job for a campaign running here returns
        at once."""
        structlog.contextvars.bind_contextvars(campaign_id=campaign_id)
        if self._router is not None and ctx.queue != self._router.own_queue(CAMPAIGNS_QUEUE):
            await self._dispatch(campaign_id)
            return
        if campaign_id in self.active:
            return
        self.active.add(campaign_id)
        try:
            await self._run(ctx, campaign_id)
        finally:
            self.active.discard(campaign_id)

    # -- where the accounts run -------------------------------------------------------------------

    async def _dispatch(self, campaign_id: int) -> None:
        """The shared job: each member's job queued or running, this worker's own included; stepping
        aside (Retry) while a dead host's lease still holds one of the accounts, so the account is
        placed once it expires."""
        campaign = await campaign_store.campaign_for_run(self._pool, campaign_id)
        if campaign is None or campaign["status"] != CampaignStatus.RUNNING:
            return
        try:
            plan = await self._plan(campaign)
            assert self._router is not None
            queues = dict(plan.elsewhere)
            if plan.here:
                queues[self._router.own_queue(CAMPAIGNS_QUEUE)] = sorted(plan.here)
            await self._fan_out(campaign_id, queues)
        except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:
            raise Retry(1.0, f"campaign not fanned out: {type(exc).__name__}") from exc
        if plan.awaiting:
            raise Retry(plan.awaiting + 0.1, "a dead host's lease holds some of the campaign's accounts")

    async def _plan(self, campaign: dict[str, Any]) -> Plan:
        """Where each of the campaign's accounts runs now (`SendRouter.route`); raises what an
        outage of Redis or PostgreSQL raises (the caller tries again)."""
        accounts: list[int] = campaign["account_ids"]
        router = self._router
        if router is None:
            return Plan(frozenset(accounts))
        own = router.own_queue(CAMPAIGNS_QUEUE)
        # Together, not a route() each at once: hundreds of lookups at once exhausted the Redis
        # client's connection pool (MaxConnectionsError), and the fan-out never happened.
        routes = await router.route_many(CAMPAIGNS_QUEUE, accounts)
        here: set[int] = set()
        elsewhere: dict[str, list[int]] = {}
        waits: list[float] = []
        for account_id, route in zip(accounts, routes, strict=True):
            if route.queue is None:
                waits.append(route.wait)
            elif route.queue == own:
                here.add(account_id)
            else:
                elsewhere.setdefault(route.queue, []).append(account_id)
        return Plan(frozenset(here), elsewhere, min(waits) if waits else 0.0)

    async def _fan_out(self, campaign_id: int, queues: dict[str, list[int]]) -> None:
        """A member job on each of these routed queues, unless one is queued or running there (one
        job id per campaign and queue: asked every round, it is never multiplied)."""
        for queue, accounts in queues.items():
            if await self._enqueuer.enqueue_unless_live(queue, RUN_CAMPAIGN, [campaign_id],
                                                        job_id=campaign_job_id(campaign_id, queue)):
                log.info("campaign run sent to its accounts' host", queue=queue, account_ids=accounts)

    # -- a member ---------------------------------------------------------------------------------

    async def _run(self, ctx: JobContext, campaign_id: int) -> None:
        started = time.monotonic()
        while True:
            campaign = await campaign_store.campaign_for_run(self._pool, campaign_id)
            if campaign is None or campaign["status"] != CampaignStatus.RUNNING:
                return
            try:
                plan = await self._plan(campaign)
                await self._fan_out(campaign_id, plan.elsewhere)
                await self._sender.pacers.load(sorted(plan.here))  # together: the senders start at once
            except (*REDIS_DOWN, *POSTGRES_DOWN) as exc:  # the accounts' owners are not known for now
                log.warning("campaign accounts not routed, trying again", error=type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.stopping.wait(), timeout=1.0)
                if ctx.stopping.is_set():
                    raise Retry(1.0, "worker stopping: the campaign goes on in the next worker") from exc
                continue
            if not plan.here:
                if plan.awaiting:  # come back when the dead host's lease has expired: it may be placed here
                    raise Retry(plan.awaiting + 0.1, "a dead host's lease holds the campaign's accounts")
                log.info("campaign holds no account here", elsewhere=sorted(plan.elsewhere))
                return
            stop = asyncio.Event()
            # This member's part of the campaign's accounts: its part of the tail (assign_batches).
            share = len(plan.here) / max(1, len(campaign["account_ids"]))
            refills: Refills = Coalescer(functools.partial(campaign_store.assign_batches, self._pool, campaign,
                                                           share=share),
                                         max_batch=REFILL_ACCOUNTS_MAX, name=f"campaign-{campaign_id}-refills")
            watcher = asyncio.create_task(self._watch(ctx, campaign_id, stop,
                                                      replan=self._replanner(campaign, plan)))
            try:
                results = await asyncio.gather(*(self._account_sender(campaign, a, stop, refills)
                                                 for a in sorted(plan.here)))
            finally:
                stop.set()
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await self.publish_progress(campaign_id, every_member=False)
            if ctx.stopping.is_set():
                raise Retry(1.0, "worker stopping: the campaign goes on in the next worker")
            status = await campaign_store.status_of(self._pool, campaign_id)
            if status != CampaignStatus.RUNNING:
                log.info("campaign runner stopped", status=status)  # paused or cancelled through the API
                return
            if await campaign_store.complete_if_done(self._pool, campaign_id):
                log.info("campaign completed", duration_s=round(time.monotonic() - started, 1))
                await self.publish_progress(campaign_id)
                return
            mine = [r for r in results if r.outcome != "moved"]  # a moved account is its new owner's
            usable = [r for r in mine if r.outcome != "unusable"]
            if mine and not usable:
                if await self._others_may_send(campaign, mine):
                    # Stepping aside (a scheduled job stays live), not returning: the other members'
                    # fan-out would otherwise start this job again every round.
                    log.warning("no campaign account here can send: the campaign goes on with its others",
                                reasons="; ".join(f"account {r.account_id}: {r.detail}" for r in mine))
                    raise Retry(IDLE_RETRY_SECONDS, "no campaign account here can send")
                await self._fail(campaign, mine)
                return
            waiting = [r for r in usable if r.outcome == "waiting"]
            if usable and len(waiting) == len(usable) and min(r.wait for r in waiting) > LONG_WAIT_SECONDS:
                first = min(waiting, key=lambda r: r.wait)
                if plan.covers_all:
                    # Nothing moves until the first account may send again: the campaign says why.
                    await campaign_store.set_held_back(self._pool, campaign_id, {
                        "limit": first.limit, "detail": first.detail, "account_id": first.account_id,
                        "resumes_at": time.time() + first.wait})
                    await self.publish_progress(campaign_id)
                raise Retry(min(first.wait, IDLE_RETRY_SECONDS), "every account here is waiting on its limits")
            # What is left is in flight elsewhere, due soon (retries), or was handed back by a waiting
            # account to the others: look again shortly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stopping.wait(), timeout=1.0)

    def _replanner(self, campaign: dict[str, Any], plan: Plan) -> Callable[[], Awaitable[bool]]:
        """What the watch calls every ROUTE_SECONDS: fan out again, and True when the accounts this
        member should run changed (one moved away, or one came here): the round then ends and the
        next one runs the new set."""
        async def replan() -> bool:
            now = await self._plan(campaign)
            await self._fan_out(campaign["id"], now.elsewhere)
            return now.here != plan.here

        return replan

    async def _others_may_send(self, campaign: dict[str, Any], unusable: list[SenderResult]) -> bool:
        """Can any of the campaign's accounts this member did not find unusable send, as
        PostgreSQL shows them? Then another member runs it, or will: this one does not fail the campaign."""
        others = set(campaign["account_ids"]) - {r.account_id for r in unusable}
        return bool(others) and bool(await campaign_store.accounts_that_may_send(self._pool, sorted(others)))

    async def _fail(self, campaign: dict[str, Any], results: list[SenderResult]) -> None:
        reasons = "; ".join(f"account {r.account_id}: {r.detail}" for r in results)
        for r in results:
            await campaign_store.fail_stranded(self._pool, campaign["id"], r.account_id, r.detail)
        await campaign_store.finish(self._pool, campaign["id"], CampaignStatus.FAILED,
                                    f"no account can send: {reasons}")
        log.error("campaign failed: no account can send", reasons=reasons)
        await self.publish_progress(campaign["id"])

    async def _watch(self, ctx: JobContext, campaign_id: int, stop: asyncio.Event,
                     replan: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Stops the round's senders on a pause, a cancel, the worker's stop, or (`replan`) when the
        accounts this member runs changed; publishes progress meanwhile."""
        last_progress = 0.0
        last_route = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=WATCH_SECONDS)
            if ctx.stopping.is_set():
                stop.set()
                return
            try:
                if await campaign_store.status_of(self._pool, campaign_id) != CampaignStatus.RUNNING:
                    stop.set()
                    return
                if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                    last_progress = time.monotonic()
                    await self.publish_progress(campaign_id, every_member=False)
                if replan is not None and time.monotonic() - last_route >= ROUTE_SECONDS:
                    last_route = time.monotonic()
                    if await replan():
                        log.info("campaign accounts moved: the round starts again with those held here")
                        stop.set()
                        return
            except (*REDIS_DOWN, *POSTGRES_DOWN, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # An outage must not end the watch: it is what stops the senders on a pause or a drain.
                log.warning("campaign watch failed", error=type(exc).__name__)

    async def publish_progress(self, campaign_id: int, *, every_member: bool = True) -> None:
        """The campaign's `campaign.progress` event. A routine one (`every_member=False`) goes out
        only if no member of the campaign published one in the last PROGRESS_SECONDS: members on
        several hosts make about one a second between them, not one each."""
        if not every_member and not await self._redis.set(campaign_progress(campaign_id), b"1", nx=True,
                                                          px=int(PROGRESS_SECONDS * 1000)):
            return
        try:
            campaign = await campaign_store.get_campaign(self._pool, campaign_id)
        except NotFound:
            return
        await self._sessions.publish("campaign.progress", {
            "campaign_id": campaign_id, "status": campaign["status"], "progress": campaign["progress"],
            "held_back": campaign["held_back"]})

    # -- one account ------------------------------------------------------------------------------

    async def _account_state(self, account_id: int) -> tuple[str, float, str]:
        """("ok" | "wait" | "unusable" | "moved", seconds to wait, why), without touching Telegram
        (nor Redis) when open here. "moved": another member's now (queue/routing.py)."""
        if self._router is not None and self._sessions.hosted(account_id) is None:
            route = await self._router.route(CAMPAIGNS_QUEUE, account_id)
            if route.queue != self._router.own_queue(CAMPAIGNS_QUEUE):
                return "moved", 0.0, route.why or "a dead host's lease holds it"
        try:
            hosted = await self._sessions.open_for_sending(account_id)
        except OwnedElsewhere as exc:
            return "wait", 1.0, exc.message  # another host still holds it (a restart's handover)
        except NotFound:
            return "unusable", 0.0, "account removed"
        except TelegramError as exc:
            if exc.error_class == "transient":
                return "wait", 2.0, exc.message
            return "unusable", 0.0, exc.message
        if hosted.session.auth_state is not AuthState.READY:
            return "unusable", 0.0, f"account is not logged in (auth_state={hosted.session.auth_state})"
        if hosted.peer_flood_until > time.time():
            return "unusable", 0.0, "PEER_FLOOD: the account may not write to new peers for now"
        return "ok", max(0.0, hosted.paused_until - time.time()), ""

    async def _account_sender(self, campaign: dict[str, Any], account_id: int, stop: asyncio.Event,
                              refills: Refills) -> SenderResult:
        try:
            pacer = await self._sender.pacers.get(account_id)
        except NotFound:
            return SenderResult(account_id, "unusable", detail="account removed")
        run = _AccountRun(pacer, max(BATCH_MIN, min(BATCH_MAX, math.ceil(pacer.limits.per_second * BATCH_SECONDS))),
                          refills)
        try:
            while not stop.is_set():
                try:
                    outcome = await self._step(campaign, account_id, run, stop)
                except (*REDIS_DOWN, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # The database or Redis is briefly away: nothing is lost (rows are as they were), try again.
                    log.warning("campaign sender step failed", account_id=account_id, error=type(exc).__name__)
                    run.buffer.clear()
                    run.look_in_queue = True
                    await _sleep(stop, 1.0)
                    continue
                if outcome is not None:
                    return outcome
            return SenderResult(account_id, "stopped")
        finally:
            await self._settle(run.in_flight)

    async def _step(self, campaign: dict[str, Any], account_id: int, run: _AccountRun,
                    stop: asyncio.Event) -> SenderResult | None:
        """One step of an account's sender (a send started, a wait, a refill), or its result."""
        campaign_id = campaign["id"]
        pacer, buffer, in_flight, slots = run.pacer, run.buffer, run.in_flight, run.slots
        state, wait, why = await self._account_state(account_id)
        if state == "moved":
            buffer.clear()
            await self._settle(in_flight)
            log.info("campaign account runs elsewhere now", account_id=account_id, reason=why)
            return SenderResult(account_id, "moved", detail=why)
        if state == "unusable":
            await self._settle(in_flight)
            released = await campaign_store.release_account(self._pool, campaign_id, account_id)
            log.warning("campaign account cannot send", account_id=account_id, reason=why, released=released)
            return SenderResult(account_id, "unusable", detail=why)
        if state == "wait":
            await _sleep(stop, wait)
            return None
        if not buffer:
            rows: list[dict[str, Any]] = []
            if run.look_in_queue:  # its own messages first: a round's start, or some came back
                run.look_in_queue = False
                rows = await campaign_store.queued_for(self._pool, campaign_id, account_id, run.batch,
                                                       exclude=list(in_flight))
            if not rows:
                rows, set_aside = await run.refills.submit((account_id, run.batch))
                if not rows and set_aside:  # recipients taken, none to send: more may be pending
                    return None
            if not rows:
                run.look_in_queue = True  # nothing new: what is still queued is what is left
                if in_flight:  # their outcomes may put messages back in the queue
                    await asyncio.wait(list(in_flight.values()), return_when=asyncio.FIRST_COMPLETED)
                    return None
                rows = await campaign_store.queued_for(self._pool, campaign_id, account_id, run.batch,
                                                       exclude=list(in_flight))
                if not rows:
                    return SenderResult(account_id, "done")
            buffer.extend(rows)
        message = buffer[0]
        held, limit, detail = pacer.held_by(message["peer"])
        if wait > held:  # the account's stored flood wait, which this pacer may not know yet
            held, limit, detail = wait, "flood_wait", "Telegram asked the account to wait (429)"
        wait = held
        if wait > LONG_WAIT_SECONDS:
            buffer.clear()
            await self._settle(in_flight)
            released = await campaign_store.release_account(self._pool, campaign_id, account_id)
            log.info("campaign account waits on its limits", account_id=account_id, wait_s=round(wait, 1),
                     limit=limit, released=released)
            return SenderResult(account_id, "waiting", wait=wait, detail=detail, limit=limit)
        if wait > 0:
            await _sleep(stop, wait)
            return None
        # The slot first, then the pacer once more: the send is counted when it really starts.
        await slots.acquire()
        if pacer.wait_for(message["peer"]) > 0 or stop.is_set():
            slots.release()
            return None
        if campaign.get("held_back") is not None:  # it moves again: no longer held back
            campaign["held_back"] = None
            await campaign_store.set_held_back(self._pool, campaign_id, None)
        buffer.popleft()
        pacer.reserve(message["peer"])
        task = asyncio.create_task(self._send(message, run))
        in_flight[message["id"]] = task
        task.add_done_callback(_forget(in_flight, message["id"]))
        return None

    async def _send(self, message: dict[str, Any], run: _AccountRun) -> None:
        requeued = True  # unless its outcome is known final: the row may be queued again
        try:
            if self._sessions.hosted(message["account_id"]) is None:
                return  # closed since its step (moved away): not claimed, so no attempt is counted
            row = await self._sender.outbox.claim_for_campaign(message["id"], self._sessions.worker_name,
                                                               peer_key(message["peer"]))
            if row is None:
                return  # opted out (cancelled, with its event), cancelled, or taken care of elsewhere
            with structlog.contextvars.bound_contextvars(message_id=row["id"], account_id=row["account_id"]):
                requeued = await self._sender.send(row) is not None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The row stays as it was (queued, or sending for the abandoned-send check): nothing is lost.
            log.warning("campaign send not recorded", message_id=message["id"], error=type(exc).__name__)
        finally:
            if requeued:
                run.look_in_queue = True
            run.slots.release()

    @staticmethod
    async def _settle(in_flight: dict[int, asyncio.Task[None]]) -> None:
        if in_flight:
            await asyncio.gather(*in_flight.values(), return_exceptions=True)


def _forget(in_flight: dict[int, asyncio.Task[None]], message_id: int) -> Callable[[asyncio.Task[None]], None]:
    def done(_: asyncio.Task[None]) -> None:
        in_flight.pop(message_id, None)

    return done


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds` (a pacer's exact wait), or less if the sender is asked to stop."""
    if stop.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)

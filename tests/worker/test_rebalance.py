"""The rebalancing decider (worker/rebalance.py): its plan (fair share, hysteresis, the round's budget)
as a pure function, and its rounds against the real PostgreSQL and Redis: the loads it reads, the one
decider at a time, the platform-wide bound per minute, and a stalled decider fenced off. The move
itself is the existing move request (tested in tests/ops/test_host_moves.py and the multi-host rig);
here it is a function that records the move and gives the account to its target in PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import redis.asyncio as aioredis

from telegram_platform.metrics.definitions import create_metrics
from telegram_platform.queue import routing
from telegram_platform.redis_auth import RedisAuth
from telegram_platform.redis_keys import REBALANCE_LOCK, REBALANCE_MOVES
from telegram_platform.worker import rebalance
from telegram_platform.worker.rebalance import Rebalancer, plan_moves, round_budget


def _apply(loads: dict[str, int], moves: list[tuple[str, str]]) -> dict[str, int]:
    after = dict(loads)
    for source, target in moves:
        after[source] -= 1
        after[target] += 1
    return after


def test_a_joining_host_is_planned_its_fair_share_from_the_most_loaded() -> None:
    """An empty host beside one owning 10 gets 5; beside hosts owning 9, 3 and 0 the moves come from
    the most-loaded and end with every host at 4; one account of difference is balanced."""
    assert plan_moves({"host-a": 10, "host-b": 0}, 100) == [("host-a", "host-b")] * 5
    moves = plan_moves({"host-a": 9, "host-b": 3, "host-c": 0}, 100)
    assert {source for source, _ in moves} == {"host-a"}
    assert _apply({"host-a": 9, "host-b": 3, "host-c": 0}, moves) == {"host-a": 4, "host-b": 4, "host-c": 4}
    assert plan_moves({"host-a": 11, "host-b": 10}, 100) == []
    assert plan_moves({"host-a": 11, "host-b": 0}, 100) == [("host-a", "host-b")] * 5  # 6 and 5
    assert plan_moves({"host-a": 10}, 100) == [] and plan_moves({}, 100) == []


def test_hysteresis_leaves_a_small_imbalance_and_a_plan_never_moves_back() -> None:
    """Loads within 1 + 5% of the fair share of each other move nothing (100 and 95 around a fair
    share of 97); past it the plan stops at that slack, and planning again on the result (or on any
    loads) never moves an account back toward the host that gave it."""
    assert plan_moves({"host-a": 100, "host-b": 95}, 100) == []
    moves = plan_moves({"host-a": 110, "host-b": 90}, 100)
    assert _apply({"host-a": 110, "host-b": 90}, moves) == {"host-a": 103, "host-b": 97}
    for loads in ({"a": 7, "b": 0, "c": 2}, {"a": 50, "b": 49, "c": 0}, {"a": 1, "b": 1, "c": 9, "d": 0}):
        first = plan_moves(loads, 100)
        after = _apply(loads, first)
        assert plan_moves(after, 100) == [], (loads, after)
        givers = {source for source, _ in first}
        assert not givers & {target for _, target in first}, first  # no host both gives and takes


def test_the_budget_bounds_a_plan_and_a_round_spreads_the_minutes_bound() -> None:
    """A plan is cut at its budget (none at 0); a round may make a sixth of the minute's bound, at
    least one move."""
    assert plan_moves({"host-a": 10, "host-b": 0}, 3) == [("host-a", "host-b")] * 3
    assert plan_moves({"host-a": 10, "host-b": 0}, 0) == []
    assert (round_budget(30), round_budget(4), round_budget(1), round_budget(600)) == (5, 1, 1, 100)


class _Moves:
    """The move request's stand-in: records (account, target) and makes the target the owner."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self.done: list[tuple[int, str]] = []

    async def __call__(self, account_id: int, target: str) -> None:
        self.done.append((account_id, target))
        await self.db.execute("UPDATE accounts SET owner_host = $2 WHERE id = $1", account_id, target)


async def _platform(db: asyncpg.Pool, redis: aioredis.Redis, owned: dict[str, int]) -> list[int]:
    """Live hosts owning `owned` logged-in accounts each; the account ids."""
    ids = []
    counter = itertools.count()
    for host, count in owned.items():
        await db.execute("INSERT INTO hosts (id) VALUES ($1)", host)
        await routing.mark_alive(redis, host)
        for _ in range(count):
            ids.append(int(await db.fetchval(
                "INSERT INTO accounts (phone, auth_state, owner_host) VALUES ($1, 'ready', $2) RETURNING id",
                f"+99966050{next(counter):02d}", host)))
    return ids


def _decider(db: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth, moves: _Moves, per_minute: int,
             **kwargs: object) -> Rebalancer:
    return Rebalancer(db, redis, auth, moves_per_minute=per_minute, gone_after=30, move=moves, **kwargs)  # type: ignore[arg-type]


async def _next_round(redis: aioredis.Redis) -> None:
    """As if a round's interval passed: the last decider's lock expired."""
    await redis.delete(REBALANCE_LOCK)


async def _owned(db: asyncpg.Pool) -> dict[str, int]:
    return {str(r["owner_host"]): int(r["n"]) for r in
            await db.fetch("SELECT owner_host, count(*) AS n FROM accounts GROUP BY owner_host")}


async def test_rounds_bring_a_joining_host_to_its_fair_share_then_move_nothing(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """host-b joins beside host-a's 10 accounts: with 30 moves a minute a round moves 5 (a sixth of
    the bound, here also the fair share), each a ready account of host-a's to host-b; the next round
    finds the hosts balanced and moves none; tp_rebalance_moves_total counts the 5. A draining host
    takes nothing."""
    await _platform(db, redis, {"host-a": 10, "host-b": 0})
    await db.execute("INSERT INTO hosts (id, draining_since) VALUES ('host-c', now())")
    await routing.mark_alive(redis, "host-c")
    moves = _Moves(db)
    metrics = create_metrics(None)
    decider = _decider(db, redis, redis_auth, moves, 30, metrics=metrics)
    assert await decider.run_once() == 5
    assert [target for _, target in moves.done] == ["host-b"] * 5
    assert len({account for account, _ in moves.done}) == 5
    assert await _owned(db) == {"host-a": 5, "host-b": 5}
    # The lock is kept until the round's interval is over: no other round before then.
    assert 0 < await redis.pttl(REBALANCE_LOCK) <= rebalance.ROUND_SECONDS * 1000
    await _next_round(redis)
    assert await decider.run_once() == 0
    assert len(moves.done) == 5
    assert metrics.registry is not None
    assert metrics.registry.get_sample_value("tp_rebalance_moves_total", {"result": "moved"}) == 5


async def test_the_moves_per_minute_bound_holds_across_deciders_and_rounds(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """With 3 moves a minute and host-b owed 10, rounds by two deciders (children of two hosts) move
    one account each until 3 moved within the minute, then none, though the imbalance remains; an
    account moved is not picked again within the minute; 0 moves a minute is off."""
    await _platform(db, redis, {"host-a": 20, "host-b": 0})
    moves = _Moves(db)
    first, second = (_decider(db, redis, redis_auth, moves, 3) for _ in range(2))
    results = []
    for decider in (first, second, first, second, first):
        results.append(await decider.run_once())
        await _next_round(redis)
    assert results == [1, 1, 1, 0, 0]  # one move a round (a sixth of 3, at least 1) until the bound
    assert len(moves.done) == 3 and len({account for account, _ in moves.done}) == 3
    assert await redis.zcard(REBALANCE_MOVES) == 3
    await _next_round(redis)
    assert await _decider(db, redis, redis_auth, moves, 0).run_once() == 0
    assert len(moves.done) == 3


async def test_one_decider_at_a_time_and_a_stalled_one_is_fenced(
        db: asyncpg.Pool, redis: aioredis.Redis, redis_auth: RedisAuth) -> None:
    """While one decider's round runs, another's round does nothing; a decider whose lock expired
    and was taken by another records no move (so makes none); one standing by (its host draining or
    stopping) does not decide."""
    await _platform(db, redis, {"host-a": 10, "host-b": 0})
    entered, release = asyncio.Event(), asyncio.Event()
    slow_done: list[tuple[int, str]] = []

    async def slow_move(account_id: int, target: str) -> None:
        entered.set()
        await release.wait()
        slow_done.append((account_id, target))

    moves = _Moves(db)
    slow = Rebalancer(db, redis, redis_auth, moves_per_minute=6, gone_after=30, move=slow_move)
    running = asyncio.create_task(slow.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    assert await _decider(db, redis, redis_auth, moves, 6).run_once() == 0  # the lock is held
    release.set()
    assert await running == 1 and len(slow_done) == 1 and moves.done == []
    await _next_round(redis)

    # A decider whose lock another took over during its first move (it stalled past the lock's
    # expiry): its next move is not recorded, so not made, and it leaves the other's lock alone.
    stolen: list[tuple[int, str]] = []

    async def stalling_move(account_id: int, target: str) -> None:
        stolen.append((account_id, target))
        await redis.set(REBALANCE_LOCK, "another-decider", px=60_000)

    stalled = Rebalancer(db, redis, redis_auth, moves_per_minute=60, gone_after=30, move=stalling_move)
    assert await stalled.run_once() == 1 and len(stolen) == 1
    assert moves.done == [] and await redis.zcard(REBALANCE_MOVES) == 2
    assert await redis.get(REBALANCE_LOCK) == b"another-decider"  # not touched by the stalled one
    assert await redis.pttl(REBALANCE_LOCK) > 50_000
    await redis.delete(REBALANCE_LOCK)
    assert await _decider(db, redis, redis_auth, moves, 6, standing_by=lambda: True).run_once() == 0
    assert moves.done == []
    assert rebalance.LOCK_TTL_MS > rebalance.ROUND_SECONDS * 1000

"""Rebalancing: a host under its fair share (one that joined, or came back) takes accounts from the
most-loaded live hosts over time, at most TP_REBALANCE_MOVES_PER_MINUTE moves a minute platform-wide.

Placement (queue/routing.py) only places accounts nobody owns; this moves owned ones, each by the
same move request an operator's `tp accounts move` sends (telegram/rpc.py `call_host`, op `move`):
the owner closes it (its TDLib state snapshot), the target opens it from that snapshot, so a move
never asks Telegram for a login.

One decider at a time: every worker child tries, every ROUND_SECONDS, to take a Redis lock (`SET NX
PX` with a token of its own); the holder plans a round and keeps the lock until ROUND_SECONDS after
the round started, so the platform has one round per interval however many children try. Each move is recorded
by one Lua call that first checks the lock still holds this decider's token (a decider that stalled
past the lock's expiry records nothing: fenced) and then the moves of the last minute, by Redis's
clock: past the bound, nothing is recorded and nothing moves. So the bound holds platform-wide even
if two deciders ever overlapped.

No churn: a round moves one account at a time from the most-loaded to the least-loaded live host, and
only while their difference exceeds one account plus a tolerance (TOLERANCE of the fair share), so a
move never makes its target the heavier of the two and the next round cannot move it back (no
ping-pong); an account moved is not picked again while its move is within the last minute.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import asyncpg
import redis.asyncio as aioredis
import structlog

from ..metrics.definitions import Metrics
from ..queue import routing
from ..redis_auth import RedisAuth
from ..redis_keys import REBALANCE_LOCK, REBALANCE_MOVES
from ..telegram import rpc

log = structlog.get_logger(__name__)

# How often each worker child tries to be the decider.
ROUND_SECONDS: Final = 10.0
# The decider's lock outlives a round of quick moves; a round slower than this (each move is waited
# for, rpc.MOVE_SECONDS at most) is fenced: its next record is refused.
LOCK_TTL_MS: Final = int((rpc.MOVE_SECONDS + ROUND_SECONDS) * 1000)
# The bound's window.
WINDOW_MS: Final = 60_000
# Hysteresis: hosts whose loads differ by at most 1 + this share of the fair share are balanced.
TOLERANCE: Final = 0.05

# KEYS: the lock, the moves. ARGV: the decider's token, the account id, the bound, the window (ms).
# Returns 1: recorded (the move may go); 0: the bound is reached; -1: the lock is not ours.
_RECORD_MOVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[4]))
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[2], now_ms, ARGV[2])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""

# KEYS: the moves. ARGV: the window (ms). Returns the accounts moved within it (Redis's clock).
_RECENT_MOVES = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms - tonumber(ARGV[1]), '+inf')
"""

# KEYS: the lock. ARGV: the token, how long it still holds (ms). Only if it is still this decider's:
# the next round, by any decider, starts no sooner than a round's interval after this one started.
_END_ROUND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return 0
"""


def plan_moves(loads: Mapping[str, int], budget: int, *, tolerance: float = TOLERANCE) -> list[tuple[str, str]]:
    """Up to `budget` moves (from host, to host) that bring the live hosts' `loads` (accounts owned)
    toward their fair share: each from the most-loaded host to the least-loaded one, while they
    differ by more than 1 + `tolerance` of the fair share. Ties: the largest id gives, the smallest
    takes, so every decider plans the same."""
    current = dict(loads)
    if len(current) < 2 or budget <= 0:
        return []
    slack = 1 + math.floor(sum(current.values()) / len(current) * tolerance)
    moves: list[tuple[str, str]] = []
    while len(moves) < budget:
        source = max(current, key=lambda host: (current[host], host))
        target = min(current, key=lambda host: (current[host], host))
        if current[source] - current[target] <= slack:
            break
        moves.append((source, target))
        current[source] -= 1
        current[target] += 1
    return moves


def round_budget(moves_per_minute: int) -> int:
    """Moves one round may make: the minute's bound spread over its rounds (one per ROUND_SECONDS
    platform-wide), so a joining host fills steadily rather than in one burst each minute."""
    return math.ceil(moves_per_minute * ROUND_SECONDS / (WINDOW_MS / 1000))


class Rebalancer:
    """The decider's round, run by every worker child; only the lock's holder plans and moves."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, auth: RedisAuth, *, moves_per_minute: int,
                 gone_after: float, metrics: Metrics | None = None,
                 standing_by: Callable[[], bool] = lambda: False,
                 move: Callable[[int, str], Awaitable[object]] | None = None) -> None:
        self._pool = pool
        self._redis = redis
        self._auth = auth
        self.moves_per_minute = moves_per_minute
        self._gone_after = gone_after
        self._metrics = metrics
        # True while this process must not decide (its host is draining or stopping).
        self._standing_by = standing_by
        self._token = uuid.uuid4().hex
        # How an account is moved: the move request, as `tp accounts move` sends it.
        self._send_move = move or self._move_request

    async def _move_request(self, account_id: int, target: str) -> object:
        return await rpc.call_host(self._redis, self._auth, "move", account_id, {"to": target},
                                   timeout=rpc.MOVE_SECONDS)

    async def run_once(self) -> int:
        """One round, if this process gets the lock: the accounts moved."""
        if self.moves_per_minute <= 0 or self._standing_by():
            return 0
        started = time.monotonic()
        if not await self._redis.set(REBALANCE_LOCK, self._token, nx=True, px=LOCK_TTL_MS):
            return 0
        try:
            return await self._round()
        finally:
            # Kept until a round's interval has passed since this one started: one round per
            # interval platform-wide, however many worker children try.
            keep_ms = max(1, int((started + ROUND_SECONDS - time.monotonic()) * 1000))
            await self._redis.eval(_END_ROUND, 1, REBALANCE_LOCK, self._token, keep_ms)

    async def _round(self) -> int:
        recent = {int(m) for m in await self._redis.eval(_RECENT_MOVES, 1, REBALANCE_MOVES, WINDOW_MS)}
        budget = min(round_budget(self.moves_per_minute), self.moves_per_minute - len(recent))
        loads = await routing.host_loads(self._pool, self._redis, gone_after=self._gone_after)
        planned = plan_moves(loads, budget)
        if not planned:
            return 0
        moves: list[tuple[int, str, str]] = []
        for source in sorted({s for s, _ in planned}):
            targets = [t for s, t in planned if s == source]
            # Logged-in accounts the source owns, not moved within the window: the newest first
            # (the oldest have the longest-lived sessions and caches).
            rows = await self._pool.fetch(
                """SELECT id FROM accounts WHERE owner_host = $1 AND auth_state = 'ready' AND NOT id = ANY($2::bigint[])
                   ORDER BY id DESC LIMIT $3""", source, sorted(recent), len(targets))
            moves.extend((int(row["id"]), source, target) for row, target in zip(rows, targets, strict=False))
        moved = 0
        # One after another, each recorded just before it is made: a round slowed past its lock's
        # expiry (moves wait up to rpc.MOVE_SECONDS) is fenced off from the next decider's.
        for account_id, source, target in moves:
            answer = int(await self._redis.eval(_RECORD_MOVE, 2, REBALANCE_LOCK, REBALANCE_MOVES, self._token,
                                                str(account_id), self.moves_per_minute, WINDOW_MS))
            if answer != 1:  # the bound is reached, or the lock is no longer ours: no more moves
                log.info("rebalancing: round ended early", reason="bound" if answer == 0 else "lock lost",
                         left=len(moves) - moved)
                break
            moved += await self._move(account_id, source, target, loads)
        return moved

    async def _move(self, account_id: int, source: str, target: str, loads: Mapping[str, int]) -> bool:
        log.info("rebalancing: moving an account", account_id=account_id, source=source, to=target,
                 source_owned=loads[source], target_owned=loads[target])
        try:
            await self._send_move(account_id, target)
        except Exception as exc:  # one move that fails must not end the round; the next round sees the loads
            log.warning("rebalancing: move failed", account_id=account_id, to=target,
                        error=str(exc) or type(exc).__name__)
            if self._metrics is not None:
                self._metrics.rebalance_moves.labels("failed").inc()
            return False
        log.info("rebalancing: account moved", account_id=account_id, source=source, to=target)
        if self._metrics is not None:
            self._metrics.rebalance_moves.labels("moved").inc()
        return True

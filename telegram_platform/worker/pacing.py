"""Per-account pacing: the campaign engine sends from an account only as fast as its limits allow.

One `AccountPacer` per account lives in the Telegram host process (the only process that sends),
shared by every campaign using the account. It enforces, all at once:
- per second, with a burst: GCRA (a token bucket's exact dual), so a late wake-up does not lose the
  account's rate, and a send never goes out earlier than the bucket allows;
- per chat: a minimum interval between two messages to one peer;
- per day: a rolling 24-hour window, capped on the warm-up ramp of a new account;
- Telegram's own word: a 429 "retry after N" pauses the account until then.
At start, the account's sends of the last 24 hours are read back from PostgreSQL, so a restarted
worker does not burst past what the previous one already sent. Messages sent outside campaigns
(`POST /api/messages`) are noted against the same budget but never delayed by it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque

import asyncpg

from ..errors import NotFound
from ..storage import limits as limits_store
from ..storage.limits import Limits
from ..storage.optouts import peer_key

DAY = 86_400.0
# Limits changed through the API reach a running pacer within this many seconds.
RELOAD_SECONDS = 5.0


class AccountPacer:
    def __init__(self, account_id: int, limits: Limits, created_at: dt.datetime) -> None:
        self.account_id = account_id
        self.limits = limits
        self.created_at = created_at
        self.loaded_at = time.monotonic()
        self._tat = 0.0  # GCRA theoretical arrival time (wall clock)
        self._chat_last: dict[str, float] = {}
        self._day: deque[float] = deque()
        self.paused_until = 0.0
        self.reserved = 0

    def replay(self, sends: list[tuple[float, str]]) -> None:
        """Account for sends made before this pacer existed (oldest first): (unix time, peer)."""
        for at, peer in sends:
            self._charge(at, peer_key(peer))

    def _charge(self, at: float, key: str) -> None:
        interval = 1.0 / self.limits.per_second
        self._tat = max(self._tat, at) + interval
        self._chat_last[key] = max(self._chat_last.get(key, 0.0), at)
        self._day.append(at)

    def wait_for(self, peer: str, now: float | None = None) -> float:
        """Seconds until a message to `peer` may go out (0: now)."""
        return self.held_by(peer, now)[0]

    def held_by(self, peer: str, now: float | None = None) -> tuple[float, str, str]:
        """(seconds until a message to `peer` may go out, the limit that holds it longest, why in
        words); ("", "") when nothing holds it. Limits: per_second, per_chat, per_day (warm-up
        included), flood_wait (Telegram's 429)."""
        now = time.time() if now is None else now
        limits = self.limits
        interval = 1.0 / limits.per_second
        waits = [(self._tat - (limits.burst - 1) * interval - now, "per_second",
                  f"{limits.per_second:g} a second, burst {limits.burst}"),
                 (self.paused_until - now, "flood_wait", "Telegram asked the account to wait (429)")]
        last = self._chat_last.get(peer_key(peer))
        if last is not None and limits.per_chat_seconds > 0:
            waits.append((last + limits.per_chat_seconds - now, "per_chat",
                          f"{limits.per_chat_seconds:g} s between two messages to one chat"))
        while self._day and self._day[0] <= now - DAY:
            self._day.popleft()
        today = dt.datetime.fromtimestamp(now, dt.UTC)
        cap = limits.daily_cap(self.created_at, today)
        if len(self._day) >= cap:
            # The window frees one slot when its oldest send turns a day old.
            detail = f"{cap} sends in 24 hours"
            if cap < limits.per_day:
                start = limits.warmup_from or self.created_at
                day = int(max(0.0, (today - start).total_seconds()) // DAY) + 1
                detail += f" (warm-up: day {day} of {limits.warmup_days}, ramping to {limits.per_day})"
            waits.append((self._day[len(self._day) - cap] + DAY - now if cap > 0 else DAY, "per_day", detail))
        wait, limit, detail = max(waits, key=lambda w: w[0])
        return (wait, limit, detail) if wait > 0 else (0.0, "", "")

    def reserve(self, peer: str, now: float | None = None) -> None:
        """Count a send that goes out now (call right after `wait_for` said 0, without awaiting)."""
        self._charge(time.time() if now is None else now, peer_key(peer))
        self.reserved += 1
        if len(self._chat_last) > 50_000:  # forget chats whose interval has long passed
            horizon = time.time() - max(60.0, self.limits.per_chat_seconds)
            self._chat_last = {k: v for k, v in self._chat_last.items() if v > horizon}

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    @property
    def permitted_rate(self) -> float:
        return self.limits.per_second


class Pacers:
    """The host's pacers, created on first use from the account's limits and recent sends."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pacers: dict[int, AccountPacer] = {}
        self._lock = asyncio.Lock()
        # Every pacer's limits are read again together, in one query, at most every RELOAD_SECONDS:
        # not one query per account (a thousand accounts sending would make 200 reads a second).
        self._reloaded = time.monotonic()
        self._reloading = False

    async def get(self, account_id: int) -> AccountPacer:
        pacer = self._pacers.get(account_id)
        if pacer is not None:
            if time.monotonic() - self._reloaded >= RELOAD_SECONDS and not self._reloading:
                await self.reload()
            return pacer
        await self.load([account_id])
        pacer = self._pacers.get(account_id)
        if pacer is None:
            raise NotFound(f"account {account_id} not found")
        return pacer

    async def load(self, account_ids: list[int]) -> None:
        """The pacers of these accounts not made yet, made together in three queries: a campaign
        round starting over a thousand accounts must not read them one at a time (its accounts'
        first sends would be spread over seconds). An account that no longer exists gets none."""
        async with self._lock:
            wanted = [a for a in dict.fromkeys(account_ids) if a not in self._pacers]
            if not wanted:
                return
            found = await limits_store.get_many_limits(self._pool, wanted)
            since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=DAY)
            sent: dict[int, list[tuple[float, str]]] = {}
            for r in await self._pool.fetch(
                    """SELECT account_id, coalesce(sent_at, claimed_at) AS at, peer FROM messages
                       WHERE account_id = ANY($1::bigint[])
                         AND (sent_at >= $2 OR (status = 'sending' AND claimed_at >= $2))
                         AND action IN ('send', 'forward')
                       ORDER BY 2""",
                    list(found), since):
                sent.setdefault(r["account_id"], []).append((r["at"].timestamp(), r["peer"]))
            paused = {r["id"]: r["paused_until"] for r in await self._pool.fetch(
                "SELECT id, paused_until FROM accounts WHERE id = ANY($1::bigint[]) AND paused_until IS NOT NULL",
                list(found))}
            for account_id, (limits, created) in found.items():
                pacer = AccountPacer(account_id, limits, created)
                pacer.replay(sent.get(account_id, []))
                if account_id in paused:
                    pacer.pause(paused[account_id].timestamp())
                self._pacers[account_id] = pacer

    async def reload(self) -> None:
        """Every pacer's limits as stored now (one query); a pacer whose account is gone keeps its own.
        Concurrent callers meanwhile use the limits they have, at most RELOAD_SECONDS old."""
        self._reloading = True
        try:
            found = await limits_store.get_many_limits(self._pool, list(self._pacers))
            self._reloaded = time.monotonic()
        finally:
            self._reloading = False
        for account_id, (limits, created_at) in found.items():
            pacer = self._pacers.get(account_id)
            if pacer is not None:
                pacer.limits, pacer.created_at, pacer.loaded_at = limits, created_at, self._reloaded

    def peek(self, account_id: int) -> AccountPacer | None:
        return self._pacers.get(account_id)

    def forget(self, account_id: int) -> None:
        self._pacers.pop(account_id, None)

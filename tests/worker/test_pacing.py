"""The per-account pacer: rate with burst, per-chat interval, daily cap on the warm-up ramp."""

from __future__ import annotations

import datetime as dt
import itertools

import asyncpg
import pytest

from telegram_platform.errors import NotFound
from telegram_platform.storage import accounts as account_store
from telegram_platform.storage import limits as limits_store
from telegram_platform.storage.limits import Limits
from telegram_platform.worker.pacing import DAY, RELOAD_SECONDS, AccountPacer, Pacers

T0 = 1_800_000_000.0
OLD = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def _drive(pacer: AccountPacer, peers: list[str], start: float = T0) -> list[float]:
    """Send to each peer as early as the pacer allows; returns the send times."""
    now, times = start, []
    for peer in peers:
        now += pacer.wait_for(peer, now)
        assert pacer.wait_for(peer, now) == 0
        pacer.reserve(peer, now)
        times.append(now)
    return times


def test_rate_and_burst() -> None:
    """At 4/s with burst 3: three at once, then one every 0.25 s: never more than the bucket allows."""
    pacer = AccountPacer(1, Limits(per_second=4, burst=3, per_chat_seconds=0, per_day=10_000, warmup_days=0), OLD)
    times = _drive(pacer, [f"@p{i}" for i in range(11)])
    assert times[:3] == [T0, T0, T0]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times[2:])]
    assert gaps == [0.25] * 8
    # A token bucket of 3 at 4/s: any window of w seconds holds at most 3 + 4w sends.
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= 3 + 4 * (times[j] - start) + 1e-9


def test_late_wake_up_keeps_the_rate_with_burst() -> None:
    """Waking late (scheduler jitter) does not lose rate when burst > 1: the average stays at the limit."""
    pacer = AccountPacer(1, Limits(per_second=10, burst=2, per_chat_seconds=0, per_day=100_000, warmup_days=0), OLD)
    now = T0
    pacer.reserve("@x", now)
    pacer.reserve("@x", now)
    for i in range(100):
        now += pacer.wait_for(f"@{i}", now) + 0.004  # always 4 ms late
        pacer.reserve(f"@{i}", now)
    assert 100 / (now - T0) >= 9.5


def test_per_chat_interval() -> None:
    """Two messages to one chat are at least per_chat_seconds apart, whatever the account rate."""
    pacer = AccountPacer(1, Limits(per_second=100, burst=10, per_chat_seconds=2.0, per_day=1000, warmup_days=0), OLD)
    times = _drive(pacer, ["@same", "@other", "@Same"])
    assert times[1] == T0 and times[2] - times[0] == 2.0


def test_daily_cap_on_the_warm_up_ramp() -> None:
    """A 3-day-old account on a 10-day ramp from 20 to 520 a day gets 170 today; the 171st waits a day."""
    created = dt.datetime.fromtimestamp(T0 - 3 * DAY, dt.UTC)
    limits = Limits(per_second=1000, burst=1000, per_chat_seconds=0, per_day=520, warmup_days=10,
                    warmup_start_per_day=20)
    assert limits.daily_cap(created, dt.datetime.fromtimestamp(T0, dt.UTC)) == 170
    pacer = AccountPacer(1, limits, created)
    times = _drive(pacer, [f"@d{i}" for i in range(170)])
    assert times[-1] < T0 + 1
    assert pacer.wait_for("@next", times[-1]) >= DAY - 1


def test_replay_of_earlier_sends() -> None:
    """A restarted worker accounts for what was sent before it: no burst past the bucket."""
    pacer = AccountPacer(1, Limits(per_second=1, burst=1, per_chat_seconds=5, per_day=1000, warmup_days=0), OLD)
    pacer.replay([(T0 - 0.5, "@a")])
    assert abs(pacer.wait_for("@b", T0) - 0.5) < 1e-9
    assert abs(pacer.wait_for("@A", T0) - 4.5) < 1e-9


def test_flood_wait_pause() -> None:
    """A 429's retry-after holds every send of the account."""
    pacer = AccountPacer(1, Limits(per_second=100, burst=5, per_chat_seconds=0, per_day=1000, warmup_days=0), OLD)
    pacer.pause(T0 + 7)
    assert pacer.wait_for("@x", T0) == 7


async def test_every_pacers_limits_are_read_again_in_one_query(db: asyncpg.Pool) -> None:
    """Limits changed in PostgreSQL reach every running pacer once RELOAD_SECONDS have passed, read
    for all of them by the one query the next `get` makes; a pacer whose account was deleted keeps
    the limits it had."""
    ids = [int((await account_store.create_account(db, f"+99966500{i}", None))["id"]) for i in range(3)]
    pacers = Pacers(db)
    for account_id in ids:
        assert (await pacers.get(account_id)).limits.per_second == Limits().per_second
    for n, account_id in enumerate(ids[:2]):
        await limits_store.set_limits(db, account_id, {"per_second": 7.0 + n})
    await db.execute("DELETE FROM accounts WHERE id = $1", ids[2])
    assert (await pacers.get(ids[0])).limits.per_second == Limits().per_second  # within RELOAD_SECONDS
    pacers._reloaded -= RELOAD_SECONDS  # the time passing, not waited for
    await pacers.get(ids[0])
    # The other pacers were read by that same reload: no `get` of theirs reads anything.
    assert [p.limits.per_second for p in map(pacers.peek, ids) if p is not None] == [7.0, 8.0, Limits().per_second]


async def test_a_rounds_pacers_are_made_together_from_limits_sends_and_pauses(db: asyncpg.Pool) -> None:
    """`load` makes the pacers of several accounts at once, each with its own limits, its sends of the
    last day replayed and its stored pause; an account that no longer exists gets none, and `get` of
    it says so."""
    ids = [int((await account_store.create_account(db, f"+99966501{i}", None))["id"]) for i in range(3)]
    await limits_store.set_limits(db, ids[0], {"per_second": 3.0, "per_day": 2, "warmup_days": 0})
    for peer in ("@x", "@y"):
        await db.execute("INSERT INTO messages (account_id, peer, text, status, sent_at) "
                         "VALUES ($1, $2, 'hi', 'sent', now() - interval '1 minute')", ids[0], peer)
    await db.execute("UPDATE accounts SET paused_until = now() + interval '1 hour' WHERE id = $1", ids[1])
    await db.execute("DELETE FROM accounts WHERE id = $1", ids[2])
    pacers = Pacers(db)

    await pacers.load(ids)

    first, second = pacers.peek(ids[0]), pacers.peek(ids[1])
    assert first is not None and second is not None and pacers.peek(ids[2]) is None
    assert first.limits.per_second == 3.0 and first.held_by("@z")[1] == "per_day"  # its two sends replayed
    assert second.limits == Limits() and second.held_by("@z")[1] == "flood_wait"  # its pause
    with pytest.raises(NotFound):
        await pacers.get(ids[2])

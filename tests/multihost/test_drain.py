"""Two hosts in network namespaces (tests/multihost/rig.py) handing accounts to each other: a host that
joins takes its fair share from the other at a bounded rate, a host whose worker is stopped gracefully
hands every account to the other before it exits, and a host that is the only one keeps its accounts
over a stop. Every move carries the account's TDLib state: the emulator never sees a new login."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import redis

from multihost.rig import BIN_DIR, Rig, unavailable, wait_for
from telegram_platform import redis_keys

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

USERNAME = "ops"
PASSWORD = "multihost-password-1234"
MOVES_PER_MINUTE = 3
WORKER = "tp-worker"


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """Two hosts rebalancing at most 3 moves a minute, whose workers get 15 s to drain."""
    env = {"TP_REBALANCE_MOVES_PER_MINUTE": str(MOVES_PER_MINUTE), "TP_WORKER_DRAIN_SECONDS": "15"}
    with Rig(2, admin=(USERNAME, PASSWORD), env=env) as rig:
        yield rig


def query(rig: Rig, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(rig.env["DATABASE_URL"])
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def owner_hosts(rig: Rig, ids: list[int]) -> dict[int, str | None]:
    """`accounts.owner_host` of each account, as PostgreSQL has it."""
    return {int(r["id"]): r["owner_host"] for r in query(rig, "SELECT id, owner_host FROM accounts WHERE id = ANY($1)",
                                                         ids)}


def lease_hosts(client: redis.Redis, ids: list[int]) -> dict[int, str | None]:
    """The host whose worker child holds each account's lease now (a lease names `<host>/<slot>-<pid>`)."""
    leases = client.mget([redis_keys.account_lease(a) for a in ids])
    return {a: (str(lease).split("/", 1)[0] if lease else None) for a, lease in zip(ids, leases, strict=True)}


def logins(rig: Rig) -> tuple[int, int]:
    counters = rig.emulator("/control/stats")["counters"]
    return counters.get("logins", 0), counters.get("code_requests", 0)


def worker_state(rig: Rig, host: str) -> str:
    return rig.host(host).client().info(WORKER).state


def log_events(rig: Rig, host: str, event: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines (stdout) on `host` whose event is `event`."""
    found = []
    for line in rig.host(host).log(WORKER, err=False).splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                found.append(entry)
    return found


def test_a_joining_host_takes_its_fair_share_at_the_bounded_rate_without_a_login(rig: Rig) -> None:
    """Ten accounts logged in on host1 alone; host2 starts: within three minutes each host owns five,
    the accounts changing hands one at a time, never more than 3 in any minute (the bound), every
    account READY and never without a host for more than a moment, no new login or code at Telegram,
    and each move logged by the decider."""
    rig.stop_host("host2")
    token = rig.login("host1", USERNAME, PASSWORD)
    ids = [rig.log_in("host1", token, f"+99966225{n:02d}") for n in range(10)]
    client = redis.Redis.from_url(rig.env["REDIS_URL"], socket_timeout=5, decode_responses=True)
    try:
        wait_for(lambda: set(lease_hosts(client, ids).values()) == {"host1"}, 30, "host1 holding every account")
        before = logins(rig)
        rig.start_host("host2")
        started = time.monotonic()
        changes: list[float] = []  # when an account's lease went from host1 to host2
        unheld: dict[int, float] = {}  # when each account was last seen without a lease
        last = lease_hosts(client, ids)
        while time.monotonic() - started < 180:
            now = lease_hosts(client, ids)
            at = time.monotonic()
            for account, host in now.items():
                if host is None:
                    unheld.setdefault(account, at)
                    continue
                gap = at - unheld.pop(account, at)
                assert gap < 10, f"account {account} had no host for {gap:.1f}s"
                if host != last[account]:
                    assert (last[account] in (None, "host1"), host) == (True, "host2"), (account, last[account], host)
                    changes.append(at)
                last[account] = host
            counts = {h: list(last.values()).count(h) for h in ("host1", "host2")}
            if counts == {"host1": 5, "host2": 5}:
                break
            time.sleep(0.25)
        assert counts == {"host1": 5, "host2": 5}, (counts, changes)
        elapsed = time.monotonic() - started
        print(f"\nhost2 took its fair share (5 of 10) in {elapsed:.0f}s; moves at "
              f"{[round(c - started, 1) for c in changes]} s")
        assert len(changes) == 5
        # The decider records each move before it is made, by Redis's clock; the lease changes a
        # moment later, so the observed moves are counted in windows a little shorter than a minute.
        for first in changes:
            assert sum(1 for c in changes if first <= c < first + 58) <= MOVES_PER_MINUTE, changes
        assert len(changes) > MOVES_PER_MINUTE  # the bound was reached, and waited out

        time.sleep(12)  # another round or two: balanced, nothing more moves (no ping-pong)
        assert lease_hosts(client, ids) == last
        assert owner_hosts(rig, ids) == last
        ready = query(rig, "SELECT count(*) AS n FROM accounts WHERE id = ANY($1) AND auth_state = 'ready'", ids)
        assert ready[0]["n"] == 10
        assert logins(rig) == before
        # Each move is logged by the decider that made it, on whichever host's worker that was.
        moved = [e for name in rig.hosts for e in log_events(rig, name, "rebalancing: account moved")]
        assert sorted(e["account_id"] for e in moved) == sorted(a for a, h in last.items() if h == "host2"), moved
    finally:
        client.close()


def test_a_stopped_worker_hands_every_account_to_the_other_host_before_it_exits(rig: Rig) -> None:
    """`supervisorctl stop tp-worker` on a host owning accounts: by the time its worker has exited the
    other host holds every one of them, its log says all were taken over; a message posted for one of
    them during the stop is sent once, and Telegram saw no new login or code request."""
    for name in rig.hosts:
        if worker_state(rig, name) != "RUNNING":
            rig.host(name).client().start(WORKER)
    token = rig.login("host2", USERNAME, PASSWORD)
    client = redis.Redis.from_url(rig.env["REDIS_URL"], socket_timeout=5, decode_responses=True)
    try:
        ids = [int(r["id"]) for r in query(rig, "SELECT id FROM accounts WHERE auth_state = 'ready'")]
        if not any(h == "host1" for h in lease_hosts(client, ids).values()):  # this test alone: log in on host1
            rig.host("host2").client().stop(WORKER)
            ids += [rig.log_in("host1", token, f"+99966226{n:02d}") for n in range(4)]
            rig.host("host2").client().start(WORKER)
        held = wait_for(lambda: (h := lease_hosts(client, ids)) and None not in h.values() and h, 30,
                        "every account held")
        on_host1 = sorted(a for a, h in held.items() if h == "host1")
        assert on_host1, held
        before = logins(rig)

        stop_asked = time.monotonic()
        rig.host("host1").client().stop(WORKER, False)  # SIGTERM to the worker's process group
        text = f"posted while host1 stops {time.time()}"
        status, message = rig.call("host2", "POST", "/api/messages",
                                   {"account_id": on_host1[0], "peer": "@drained", "text": text}, token=token)
        assert status in (200, 201, 202), message
        wait_for(lambda: worker_state(rig, "host1") in ("STOPPED", "EXITED", "FATAL"), 60, "host1's worker stopped",
                 interval=0.05)
        at_exit = lease_hosts(client, ids)
        print(f"\nhost1's worker handed {len(on_host1)} accounts off and exited "
              f"{time.monotonic() - stop_asked:.1f}s after the stop was asked")
        assert worker_state(rig, "host1") == "STOPPED"
        assert at_exit == {a: "host2" for a in ids}, at_exit
        handed = log_events(rig, "host1", "stopping: accounts handed off")
        assert handed and (handed[-1]["taken_over"], handed[-1]["left"]) == (len(on_host1), 0), handed
        assert owner_hosts(rig, ids) == {a: "host2" for a in ids}

        def settled() -> Any:
            body = rig.call("host2", "GET", f"/api/messages/{message['id']}", token=token)[1]
            return body if body["status"] in ("sent", "failed", "cancelled") else None

        final = wait_for(settled, 60, "the message settled")
        assert final["status"] == "sent", final
        received = [m["text"] for m in rig.emulator("/control/received")["messages"]]
        assert received.count(text) == 1
        assert logins(rig) == before
    finally:
        client.close()


def test_a_restart_keeps_the_hosts_accounts(rig: Rig) -> None:
    """`tp restart tp-worker` on host2, which owns accounts, while host1 is up: the restart is marked
    as one, so host2's worker hands nothing off and holds its accounts again once it is back (only
    rebalancing's bounded moves go to host1, never all), with no new login."""
    for name in rig.hosts:
        if worker_state(rig, name) != "RUNNING":
            rig.host(name).client().start(WORKER)
    token = rig.login("host2", USERNAME, PASSWORD)
    client = redis.Redis.from_url(rig.env["REDIS_URL"], socket_timeout=5, decode_responses=True)
    try:
        ids = [int(r["id"]) for r in query(rig, "SELECT id FROM accounts WHERE auth_state = 'ready'")]
        if not ids:  # this test alone
            ids = [rig.log_in("host2", token, f"+99966228{n:02d}") for n in range(4)]
        held = wait_for(lambda: (h := lease_hosts(client, ids)) and None not in h.values() and h, 45,
                        "every account held")
        on_host2 = sorted(a for a, h in held.items() if h == "host2")
        assert len(on_host2) > MOVES_PER_MINUTE, held
        before = logins(rig)
        restarted = rig.run_in("host2", [str(BIN_DIR / "tp"), "restart", WORKER], timeout=90)
        assert restarted.returncode == 0, restarted.stderr
        assert log_events(rig, "host2", "restarting: the accounts stay on this host")
        assert not log_events(rig, "host2", "stopping: handing the accounts off")
        after = wait_for(lambda: (h := lease_hosts(client, on_host2)) and None not in h.values() and h, 45,
                         "host2's accounts held again")
        moved = [a for a, h in after.items() if h != "host2"]
        assert len(moved) <= MOVES_PER_MINUTE < len(on_host2), after  # rebalancing toward host1, not a hand-off
        owners = owner_hosts(rig, on_host2)
        assert all(owners[a] == "host2" for a in on_host2 if a not in moved), owners
        assert logins(rig) == before
    finally:
        client.close()


def test_the_only_host_stopped_keeps_its_accounts_and_resumes_them_on_start(rig: Rig) -> None:
    """With host1's worker stopped, host2 is the only live host: its worker stopped gracefully hands
    nothing off and leaves every account owned by host2 (owner_host) while stopped; started again it
    holds them all again, READY, without a new login."""
    token = rig.login("host2", USERNAME, PASSWORD)
    if worker_state(rig, "host1") == "RUNNING":
        rig.host("host1").client().stop(WORKER)  # its accounts go to host2
    if worker_state(rig, "host2") != "RUNNING":
        rig.host("host2").client().start(WORKER)
    ids = [int(r["id"]) for r in query(rig, "SELECT id FROM accounts WHERE auth_state = 'ready'")]
    if not ids:  # this test alone
        ids = [rig.log_in("host2", token, f"+99966227{n:02d}") for n in range(3)]
    client = redis.Redis.from_url(rig.env["REDIS_URL"], socket_timeout=5, decode_responses=True)
    try:
        wait_for(lambda: set(lease_hosts(client, ids).values()) == {"host2"}, 45, "host2 holding every account")
        time.sleep(11)  # host1's mark of life is gone from Redis: host2 is the only live host
        before = logins(rig)

        rig.host("host2").client().stop(WORKER)
        assert lease_hosts(client, ids) == {a: None for a in ids}  # closed, leases let go
        assert owner_hosts(rig, ids) == {a: "host2" for a in ids}  # still host2's
        assert log_events(rig, "host2", "stopping: no other live host, the accounts stay this host's")

        rig.host("host2").client().start(WORKER)
        wait_for(lambda: set(lease_hosts(client, ids).values()) == {"host2"}, 45, "host2 holding them again")
        assert owner_hosts(rig, ids) == {a: "host2" for a in ids}
        ready = query(rig, "SELECT count(*) AS n FROM accounts WHERE id = ANY($1) AND auth_state = 'ready'", ids)
        assert ready[0]["n"] == len(ids)
        assert logins(rig) == before
    finally:
        client.close()

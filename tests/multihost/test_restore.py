"""A host cut off the network and restored (tests/multihost/rig.py) while messages are being sent: once
it is back, each account changes owner at most once (no ping-pong between the hosts), and the
Telegram clients the returning host reports are only those of accounts it holds."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
import redis

from multihost.rig import Rig, unavailable, wait_for
from multihost.test_drain import lease_hosts, log_events, owner_hosts
from telegram_platform import redis_keys

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

USERNAME = "ops"
PASSWORD = "multihost-password-1234"
CUT_SECONDS = 20.0
WATCH_SECONDS = 35.0  # after the restore: the orphan scans and a few rebalancing rounds


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """Two hosts rebalancing at a brisk rate, so moves after the restore come within the test."""
    with Rig(2, admin=(USERNAME, PASSWORD), env={"TP_REBALANCE_MOVES_PER_MINUTE": "12"}) as rig:
        yield rig


def host_clients(client: redis.Redis, host: str) -> tuple[int, float]:
    """The Telegram clients the host's live worker children publish (what `tp hosts` sums), and when
    the oldest of those figures was published (time.time())."""
    keys = list(client.scan_iter(match=redis_keys.TDLIB_STATS_PREFIX + "*", count=200))
    stats = [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []
    mine = [s for s in stats if s.get("host") == host]
    return sum(int(s.get("client_count", 0)) for s in mine), min((float(s["published_at"]) for s in mine),
                                                                  default=time.time())


def test_after_a_restore_each_account_changes_owner_at_most_once(rig: Rig) -> None:
    """Host2 cut off for 20 s and restored under steady sends: from the restore on, no account's lease
    goes back to a host it left (at most one change each), no two hosts send for one account in turn
    more than once (Telegram's attempt sources), and host2 never reports a client of an account it
    did not hold."""
    token = rig.login("host1", USERNAME, PASSWORD)
    ids = [rig.log_in("host1", token, f"+99966229{n:02d}") for n in range(6)]
    client = redis.Redis.from_url(rig.env["REDIS_URL"], socket_timeout=5, decode_responses=True)
    stop = threading.Event()

    def send() -> None:  # about 3 messages a second over the accounts, through host1's API
        for n, account in enumerate(itertools.cycle(ids)):
            if stop.wait(0.33):
                return
            with contextlib.suppress(OSError):
                rig.call("host1", "POST", "/api/messages",
                         {"account_id": account, "peer": f"@restore{n:05d}", "text": f"restore {n}"}, token=token)

    sender = threading.Thread(target=send, daemon=True)
    try:
        held = wait_for(lambda: (h := lease_hosts(client, ids)) and None not in h.values() and h, 45,
                        "every account held")
        assert "host2" in held.values(), held  # placement spread them over both hosts
        sender.start()
        time.sleep(3)
        on_host2 = sorted(a for a, h in lease_hosts(client, ids).items() if h == "host2")
        rig.cut("host2")
        try:
            # Read once host2 can no longer renew them: when its leases expire, and host1 may open them.
            expiries = {a: time.time() + client.pttl(redis_keys.account_lease(a)) / 1000 for a in on_host2}
            time.sleep(CUT_SECONDS)
        finally:
            rig.restore("host2")
        restored = time.time()
        history: dict[int, list[str]] = {a: [] for a in ids}  # each account's lease holders in turn
        samples: list[tuple[float, dict[int, str | None]]] = []
        stale: list[tuple[float, int, set[int]]] = []  # host2 reporting clients of accounts it did not hold
        while time.time() - restored < WATCH_SECONDS:
            now = time.time()
            holders = lease_hosts(client, ids)
            samples.append((now, holders))
            for account, host in holders.items():
                if host is not None and (not history[account] or history[account][-1] != host):
                    history[account].append(host)
            clients, published = host_clients(client, "host2")
            if published > restored + 1:
                # Each client opens under a lease and closes before it: host2's clients at `published`
                # are at most the accounts it held at some point since shortly before.
                recent = {a for at, h in samples if at >= published - 1 for a, host in h.items() if host == "host2"}
                if clients > len(recent):
                    stale.append((round(now - restored, 1), clients, recent))
            time.sleep(0.3)
        stop.set()
        sender.join(timeout=15)
        # While cut off, host2 closed every client it held before that client's lease could expire
        # (after it, host1 may open the account): one live client per account, and none left over.
        closed = {int(e["account_id"]): datetime.fromisoformat(e["timestamp"]).timestamp()
                  for e in log_events(rig, "host2", "lease unconfirmed, closing session before it can expire")}
        assert sorted(closed) == on_host2, (closed, on_host2)
        late = {a: round(at - expiries[a], 1) for a, at in closed.items() if at >= expiries[a]}
        assert not late, f"closed this long after their leases could expire: {late}"
        # The first holder seen after the restore, then at most one other.
        print(f"\nlease holders after the restore: {history}")
        assert all(len(hosts) <= 2 for hosts in history.values()), history
        assert not stale, stale
        # What Telegram saw: each account's sends since the restore come from at most two hosts in turn.
        by_address = {h.address: h.name for h in rig.hosts.values()}
        listed = rig.call("host1", "GET", "/api/accounts", token=token)[1]["items"]
        users = {int(r["telegram_user_id"]): int(r["id"]) for r in listed if r.get("telegram_user_id")}
        runs: dict[int, list[str]] = {}
        for attempt in sorted(rig.emulator("/control/attempts")["attempts"], key=lambda a: float(a["at"])):
            account = users.get(int(attempt["from_user_id"]))
            if account not in history or float(attempt["at"]) < restored or not attempt["to"].startswith("@restore"):
                continue
            host = by_address.get(str(attempt["source"]), str(attempt["source"]))
            if not runs.get(account) or runs[account][-1] != host:
                runs.setdefault(account, []).append(host)
        print(f"senders after the restore: {runs}")
        assert all(len(hosts) <= 2 for hosts in runs.values()), runs
        # Settled: host2's `tp hosts` clients are the accounts it owns and holds.
        def matches() -> object:
            owned = sum(1 for h in owner_hosts(rig, ids).values() if h == "host2")
            leased = sum(1 for h in lease_hosts(client, ids).values() if h == "host2")
            row = next(h for h in json.loads(rig.tp("hosts", "--json").stdout)["items"] if h["id"] == "host2")
            return (owned, leased, row["telegram_clients"]) if owned == leased == row["telegram_clients"] else None

        wait_for(matches, 20, "host2's clients, leases and owned accounts agreeing")
    finally:
        stop.set()
        client.close()

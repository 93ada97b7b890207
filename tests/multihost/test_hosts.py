"""The platform on three hosts in network namespaces (tests/multihost/rig.py), sharing one PostgreSQL,
Redis and emulator over a bridge: each serves, they form one platform, and losing one (killed, or cut
off the network) leaves the others serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from multihost.rig import API_PORT, Rig, unavailable, wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

USERNAME = "ops"
PASSWORD = "multihost-password-1234"


@pytest.fixture(scope="module")
def three_hosts() -> Iterator[Rig]:
    """Three hosts, started once for the module, with an admin user."""
    with Rig(3, admin=(USERNAME, PASSWORD)) as rig:
        yield rig


@pytest.fixture
def rig(three_hosts: Rig) -> Rig:
    """The module's rig with every host linked and serving again: a test may have killed or cut one."""
    rig = three_hosts
    for name in rig.hosts:
        if rig.is_cut(name):
            rig.restore(name)
    broken = [name for name in rig.hosts if not rig.serving(name)]
    for name in broken:
        rig.kill(name)
        rig.start_host(name, wait=False)
    rig.wait_serving(broken, rig.start_timeout)
    return rig


def live_workers(rig: Rig, via: str, token: str) -> list[str]:
    status, body = rig.call(via, "GET", "/api/health/detailed", token=token)
    assert status in (200, 503), body
    return [str(w["name"]) if isinstance(w, dict) else str(w) for w in body.get("workers") or []]


def test_every_host_serves_over_the_bridge(rig: Rig) -> None:
    """Each of three hosts answers /api/health on its own address from the root namespace, runs its
    programs inside its own namespace, and its worker is one of the three the shared Redis knows."""
    assert len(rig.hosts) == 3
    assert len({h.address for h in rig.hosts.values()}) == 3
    token = rig.login("host1", USERNAME, PASSWORD)
    for name, host in rig.hosts.items():
        assert rig.health(name) == 200, name
        programs = {p.name: p.pid for p in host.client().processes()}
        assert set(programs) >= {"tp-api:tp-api-00", "tp-worker", "tp-events"}, programs
        assert set(programs.values()) <= set(host.pids()), f"{name}: a program runs outside its namespace"
    workers = wait_for(lambda: len(live_workers(rig, "host2", token)) == 3 and live_workers(rig, "host2", token),
                       30, "three live workers")
    # A worker child's name ends with its pid: each host's namespace holds exactly one of them.
    for name, host in rig.hosts.items():
        pids = set(host.pids())
        assert sum(int(w.rsplit("-", 1)[-1]) in pids for w in workers) == 1, (name, workers)


def test_first_message_through_host1_is_sent(rig: Rig) -> None:
    """The README's first-message flow over REST through host 1's API (log in, add an account, enter
    the code, send): the account logs in, the message reaches `sent`, and Telegram (the emulator)
    received it once; any host may read it."""
    token = rig.login("host1", USERNAME, PASSWORD)
    phone = f"+9996621{int(time.time() * 1000) % 1000:03d}"
    account_id = rig.log_in("host1", token, phone)
    text = f"hello from three hosts {phone}"
    status, message = rig.call("host1", "POST", "/api/messages",
                               {"account_id": account_id, "peer": "@alice", "text": text}, token=token)
    assert status in (200, 201, 202), message

    def settled() -> Any:
        status, body = rig.call("host3", "GET", f"/api/messages/{message['id']}", token=token)
        assert status == 200, body
        return body if body["status"] in ("sent", "failed", "cancelled") else None

    assert rig.owner_of(account_id) in rig.hosts  # one host's worker holds the account
    final = wait_for(settled, 40, "the message settled")
    assert (final["status"], final["attempts"]) == ("sent", 1), final  # routed to its owner, not bounced
    received = rig.emulator("/control/received")
    assert [m["text"] for m in received["messages"]].count(text) == 1, received


def test_killed_host_leaves_the_others_serving(rig: Rig) -> None:
    """kill -9 of host 2's whole process tree leaves nothing running in its namespace, its address
    unanswered, and hosts 1 and 3 serving logins and reads."""
    killed = rig.kill("host2")
    assert killed, "host2 had no processes to kill"
    assert rig.host("host2").pids() == []
    assert rig.health("host2") is None
    for name in ("host1", "host3"):
        assert rig.health(name) == 200, name
        token = rig.login(name, USERNAME, PASSWORD)
        status, body = rig.call(name, "GET", "/api/accounts", token=token)
        assert status == 200, body


def test_cut_host_is_unreachable_and_comes_back(rig: Rig) -> None:
    """Cutting host 3 off makes its API unreachable from the root namespace and from host 1 (no
    answer, not a refusal), and the shared servers unreachable from it, while hosts 1 and 2 serve;
    after the restore all of it answers again, host 3's processes intact."""
    host3 = rig.host("host3")
    redis = rig.servers["redis"]
    assert rig.reaches("host1", host3.address, API_PORT)
    assert rig.reaches("host3", *redis)
    before = sorted(host3.pids())
    with rig.cut_off("host3"):
        assert rig.is_cut("host3")
        assert rig.health("host3", timeout=1.0) is None
        assert not rig.reaches("host1", host3.address, API_PORT)
        for server in ("postgres", "redis", "emulator"):
            assert not rig.reaches("host3", *rig.servers[server]), server
        assert rig.health("host1") == 200
        assert rig.health("host2") == 200
    wait_for(lambda: rig.health("host3") == 200, 15, "host3 answering after the restore")
    assert rig.reaches("host1", host3.address, API_PORT)
    assert rig.reaches("host3", *redis)
    assert rig.serving("host3")
    assert sorted(host3.pids()) == before


def test_sends_reach_the_owning_host_first_time(rig: Rig) -> None:
    """Messages for accounts owned by different hosts, posted through every host's API, are each sent
    on their first attempt: work goes to the account's owner."""
    token = rig.login("host1", USERNAME, PASSWORD)
    accounts = []
    for n in range(3):
        phone = f"+9996622{int(time.time() * 1000) % 100:02d}{n}"
        accounts.append(rig.log_in(f"host{n + 1}", token, phone))
    ids = []
    # Each account's messages one after another: Redis hands jobs to blocked consumers in turn, so
    # posting them in the logins' order could put every job on its owner by that rotation alone.
    for i in range(9):
        status, message = rig.call(f"host{i % 3 + 1}", "POST", "/api/messages",
                                   {"account_id": accounts[i // 3], "peer": f"@owner{i}", "text": "first time"},
                                   token=token)
        assert status in (200, 201, 202), message
        ids.append(message["id"])

    def settled() -> list[dict[str, Any]] | None:
        """Every message sent, or one already past its first attempt (the claim is false: stop there)."""
        found = [rig.call("host2", "GET", f"/api/messages/{i}", token=token)[1] for i in ids]
        if all(m["status"] == "sent" for m in found) or any(m["attempts"] > 1 for m in found):
            return found
        return None

    done = wait_for(settled, 30, "the messages settled")
    assert [(m["status"], m["attempts"]) for m in done] == [("sent", 1)] * len(ids), done


def test_dead_hosts_account_is_served_elsewhere_within_30s(rig: Rig) -> None:
    """kill -9 of the host that owns an account: within 30 s another host serves it (a message posted
    through a survivor is sent), without a new login at Telegram."""
    token = rig.login("host1", USERNAME, PASSWORD)
    phone = f"+9996623{int(time.time() * 1000) % 1000:03d}"
    account_id = rig.log_in("host1", token, phone)
    owner = wait_for(lambda: rig.owner_of(account_id), 10, "the account's owner")
    survivor = next(name for name in rig.hosts if name != owner)
    logins = rig.emulator("/control/stats")["counters"].get("logins", 0)
    rig.kill(owner)
    killed_at = time.monotonic()
    status, message = rig.call(survivor, "POST", "/api/messages",
                               {"account_id": account_id, "peer": "@failover", "text": "after the owner died"},
                               token=token)
    assert status in (200, 201, 202), message

    def settled() -> Any:
        body = rig.call(survivor, "GET", f"/api/messages/{message['id']}", token=token)[1]
        return body if body["status"] in ("sent", "failed", "cancelled") else None

    final = wait_for(settled, 40, "the message settled")
    assert final["status"] == "sent", final["error"]
    served_after = time.monotonic() - killed_at
    print(f"a dead host's account served elsewhere {served_after:.1f} s after the kill")
    assert served_after <= 30
    assert rig.owner_of(account_id) not in (None, owner)
    assert rig.emulator("/control/stats")["counters"].get("logins", 0) == logins


def test_a_cut_off_host_stops_sending_before_another_takes_its_account(rig: Rig) -> None:
    """A stream of messages for an account whose host is cut off the network for 20 s mid-stream: each
    message is sent once (none lost), no new login, one host holds the account after, and Telegram
    never saw two hosts send for it at once (the emulator records each send's source address)."""
    token = rig.login("host1", USERNAME, PASSWORD)
    phone = f"+9996624{int(time.time() * 1000) % 1000:03d}"
    account_id = rig.log_in("host1", token, phone)
    owner = wait_for(lambda: rig.owner_of(account_id), 10, "the account's owner")
    via = next(name for name in rig.hosts if name != owner)  # the API that takes the stream stays linked
    owner_address = rig.host(owner).address
    counters = rig.emulator("/control/stats")["counters"]
    logins_before = (counters.get("logins", 0), counters.get("code_requests", 0))

    tag = f"cutoff {phone}"
    ids: list[int] = []
    texts: list[str] = []
    started = time.monotonic()
    cut_at = restored_at = 0.0  # wall clock, as the emulator's attempt times are
    try:
        for n in range(125):  # one every 200 ms for 25 s; the owner cut from 3 s to 23 s
            if n == 15:
                rig.cut(owner)
                cut_at = time.time()
            if n == 115:
                rig.restore(owner)
                restored_at = time.time()
            text = f"{tag} #{n}"
            status, message = rig.call(via, "POST", "/api/messages",
                                       {"account_id": account_id, "peer": f"@cutoff{n}", "text": text},
                                       token=token)
            assert status in (200, 201, 202), message
            ids.append(message["id"])
            texts.append(text)
            time.sleep(max(0.0, started + (n + 1) * 0.2 - time.monotonic()))
    finally:
        if rig.is_cut(owner):
            rig.restore(owner)
            restored_at = time.time()

    def settled() -> list[dict[str, Any]] | None:
        found = [rig.call(via, "GET", f"/api/messages/{i}", token=token)[1] for i in ids]
        return found if all(m["status"] in ("sent", "failed", "cancelled") for m in found) else None

    done = wait_for(settled, 120, "every message settled")
    assert [m["status"] for m in done] == ["sent"] * len(ids), [(m["id"], m["status"], m["error"]) for m in done
                                                                 if m["status"] != "sent"]
    received = [m["text"] for m in rig.emulator("/control/received")["messages"] if m["text"].startswith(tag)]
    assert sorted(received) == sorted(texts), "a message lost or sent twice"
    recipients = rig.emulator("/control/deliveries")["recipients"]
    assert [recipients.get(f"@cutoff{n}") for n in range(len(texts))] == [1] * len(texts)
    counters = rig.emulator("/control/stats")["counters"]
    assert (counters.get("logins", 0), counters.get("code_requests", 0)) == logins_before  # no new login
    holders = [name for name in rig.hosts if rig.owner_of(account_id) == name]
    assert len(holders) == 1, holders

    attempts = [a for a in rig.emulator(f"/control/attempts?phone={phone.replace('+', '%2B')}")["attempts"]
                if a["to"].startswith("@cutoff")]
    assert attempts and all(a["source"] for a in attempts), attempts
    # Runs of consecutive attempts from one address: a handover makes a new run; two hosts sending at
    # once would interleave into many. The owner may win the account back after the restore: one more.
    runs: list[tuple[str, float, float]] = []
    for attempt in sorted(attempts, key=lambda a: float(a["at"])):
        if runs and runs[-1][0] == attempt["source"]:
            runs[-1] = (runs[-1][0], runs[-1][1], float(attempt["at"]))
        else:
            runs.append((str(attempt["source"]), float(attempt["at"]), float(attempt["at"])))
    summary = [(source, round(first - cut_at, 2), round(last - cut_at, 2)) for source, first, last in runs]
    assert len(runs) <= 3, f"hosts took turns sending for one account: {summary}"
    assert runs[0][0] == owner_address, summary
    cut_sends = [a for a in attempts if a["source"] == owner_address and cut_at < float(a["at"]) < restored_at]
    assert not cut_sends, f"the cut-off host reached Telegram while cut: {cut_sends}"
    after_cut = [a for a in attempts if float(a["at"]) > cut_at]
    assert after_cut, attempts
    served_again = float(after_cut[0]["at"]) - cut_at
    took_over = next((run for run in runs if run[0] != owner_address), None)
    print(f"\ncut-off host {owner}: account served again {served_again:.1f} s after the cut "
          f"({'by another host' if took_over else 'by the same host after the restore'}; restore at "
          f"{restored_at - cut_at:.1f} s); send runs (source, first, last, s from the cut): {summary}")

"""A campaign over accounts spread on three hosts in network namespaces (tests/multihost/rig.py): each
account's sends come from the host that owns it, every recipient gets one message, and a host
killed mid-campaign leaves its accounts' sending to the others (worker/campaigns.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from multihost.rig import Rig, unavailable, wait_for

pytestmark = [pytest.mark.multihost, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

USERNAME = "ops"
PASSWORD = "multihost-password-1234"
PER_HOST = 2  # accounts each host owns
RATE = 2  # messages per second per account: the campaign's summed ceiling is 12/s


@pytest.fixture(scope="module")
def spread() -> Iterator[tuple[Rig, str, dict[int, str]]]:
    """Three hosts, an admin, and six logged-in accounts placed two per host (the least-loaded host
    takes each new login), limited to RATE/s: (rig, token, {account id: phone})."""
    with Rig(3, admin=(USERNAME, PASSWORD)) as rig:
        token = rig.login("host1", USERNAME, PASSWORD)
        phones: dict[int, str] = {}
        for n in range(3 * PER_HOST):
            phone = f"+9996625{int(time.time() * 1000) % 100:02d}{n}"
            limits = {"per_second": RATE, "burst": 1, "warmup_days": 0}
            phones[rig.log_in(f"host{n % 3 + 1}", token, phone, limits=limits)] = phone
        yield rig, token, phones


def _owners(rig: Rig, accounts: dict[int, str]) -> dict[int, str]:
    def known() -> dict[int, str] | None:
        owners = {a: rig.owner_of(a) for a in accounts}
        return owners if all(owners.values()) else None  # type: ignore[return-value]

    found: dict[int, str] = wait_for(known, 30, "every account's owner")
    return found


def _run_campaign(rig: Rig, token: str, accounts: dict[int, str], tag: str, count: int) -> int:
    status, campaign = rig.call("host2", "POST", "/api/campaigns", {
        "name": tag, "account_ids": sorted(accounts), "template": f"{tag} {{peer}}",
        "recipients": [{"peer": f"@{tag}{i}"} for i in range(count)]}, token=token)
    assert status == 201, campaign
    status, started = rig.call("host3", "POST", f"/api/campaigns/{campaign['id']}/start", token=token)
    assert status == 200 and started["status"] == "running", started
    return int(campaign["id"])


def _finished(rig: Rig, via: str, token: str, campaign_id: int, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status, body = rig.call(via, "GET", f"/api/campaigns/{campaign_id}", token=token)
        assert status == 200, body
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    final: dict[str, Any] = wait_for(done, timeout, "the campaign finished")
    return final


def _attempts(rig: Rig, phone: str, tag: str) -> list[dict[str, Any]]:
    found = rig.emulator(f"/control/attempts?phone={phone.replace('+', '%2B')}")["attempts"]
    return [a for a in found if a["to"].startswith(f"@{tag}")]


def test_each_account_of_a_campaign_sends_from_its_owner_host(spread: tuple[Rig, str, dict[int, str]]) -> None:
    """Six accounts two per host, one campaign of 90 recipients: it completes, each recipient got
    exactly one message, every account sent, and every send of an account came from its owner
    host's address (the emulator records each attempt's source)."""
    rig, token, phones = spread
    owners = _owners(rig, phones)
    assert sorted(owners.values()) == sorted(f"host{n}" for n in (1, 2, 3) for _ in range(PER_HOST)), owners
    tag = f"spread{int(time.time()) % 10_000}x"
    count = 90
    campaign_id = _run_campaign(rig, token, phones, tag, count)
    final = _finished(rig, "host1", token, campaign_id, 90)
    assert final["status"] == "completed", final
    assert final["progress"]["sent"] == count, final["progress"]
    recipients = rig.emulator("/control/deliveries")["recipients"]
    assert [recipients.get(f"@{tag}{i}") for i in range(count)] == [1] * count
    for account_id, phone in phones.items():
        attempts = _attempts(rig, phone, tag)
        assert attempts, f"account {account_id} ({owners[account_id]}) never sent"
        sources = {a["source"] for a in attempts}
        assert sources == {rig.host(owners[account_id]).address}, (account_id, owners[account_id], sources)
        assert all(a["outcome"] == "accepted" for a in attempts), attempts


def test_a_campaign_survives_the_death_of_a_host_exactly_once(spread: tuple[Rig, str, dict[int, str]]) -> None:
    """kill -9 of one host (its whole namespace) in the middle of a campaign over six accounts on
    three hosts: the campaign completes, each recipient got exactly one message, and the dead
    host's accounts were sent for by the survivors after the kill (never by the dead host)."""
    rig, token, phones = spread
    owners = _owners(rig, phones)
    victim = "host1"
    victims = [a for a, host in owners.items() if host == victim]
    assert victims, owners
    tag = f"dies{int(time.time()) % 10_000}x"
    count = 180  # 15 s at the summed 12/s
    campaign_id = _run_campaign(rig, token, phones, tag, count)

    def under_way() -> bool:
        return sum(len(_attempts(rig, phones[a], tag)) for a in victims) >= 4

    wait_for(under_way, 30, "the victim host's accounts sending")
    rig.kill(victim)
    killed_at = time.time()
    final = _finished(rig, "host2", token, campaign_id, 120)
    assert final["status"] == "completed", final
    assert final["progress"]["sent"] == count, final["progress"]
    recipients = rig.emulator("/control/deliveries")["recipients"]
    assert [recipients.get(f"@{tag}{i}") for i in range(count)] == [1] * count
    dead_address = rig.host(victim).address
    survivors = {rig.host(name).address for name in rig.hosts if name != victim}
    after = [a for account_id in victims for a in _attempts(rig, phones[account_id], tag) if a["at"] > killed_at]
    assert after, "the dead host's accounts were not sent for after the kill"
    assert {a["source"] for a in after} <= survivors, {a["source"] for a in after}
    assert all(a["source"] != dead_address for a in after)
    first_after = min(float(a["at"]) for a in after) - killed_at
    print(f"\na dead host's campaign accounts sent again {first_after:.1f} s after the kill; "
          f"campaign of {count} completed {final['finished_at']}")

"""How close a campaign comes to its accounts' summed rate ceiling with the accounts on one host and
spread over three (worker/campaigns.py), on the multi-host rig (tests/multihost/rig.py: hosts in
network namespaces, one PostgreSQL, Redis and emulator; needs root).

    python benchmarks/campaign_hosts.py --accounts 6 --rate 5 --seconds 20

Three hosts start; `--accounts` logins are placed by the platform (the least-loaded host takes each),
each limited to `--rate` messages/s (burst 1, no warm-up): the summed ceiling is accounts x rate.
A campaign of ceiling x seconds recipients runs; its rate is measured from the emulator's record of
each accepted send (the count after the first, over the time from the first to the last). Then
hosts 2 and 3 stop (their accounts go to host 1, the only one left) and a second campaign of the
same size runs on one host. Prints both rates and their fractions of the ceiling, and which host
address sent how many.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout; the rig lives with the tests

from multihost.rig import Rig, wait_for  # noqa: E402

USERNAME, PASSWORD = "bench", "campaign-bench-password"


def login_accounts(rig: Rig, token: str, count: int, rate: float) -> dict[int, str]:
    phones: dict[int, str] = {}
    for n in range(count):
        phone = f"+9996627{n:03d}"
        limits = {"per_second": rate, "burst": 1, "warmup_days": 0, "per_day": 100_000}
        phones[rig.log_in(f"host{n % len(rig.hosts) + 1}", token, phone, limits=limits)] = phone
    return phones


def run_campaign(rig: Rig, token: str, accounts: dict[int, str], tag: str, count: int) -> dict[str, Any]:
    status, campaign = rig.call("host1", "POST", "/api/campaigns", {
        "name": tag, "account_ids": sorted(accounts), "template": "bench {peer}",
        "recipients": [{"peer": f"@{tag}{i}"} for i in range(count)]}, token=token, timeout=60)
    assert status == 201, campaign
    status, body = rig.call("host1", "POST", f"/api/campaigns/{campaign['id']}/start", token=token)
    assert status == 200, body

    def finished() -> dict[str, Any] | None:
        body = rig.call("host1", "GET", f"/api/campaigns/{campaign['id']}", token=token)[1]
        return body if body["status"] in ("completed", "failed", "cancelled") else None

    final: dict[str, Any] = wait_for(finished, count, "the campaign's end")
    attempts = [a for phone in accounts.values()
                for a in rig.emulator(f"/control/attempts?phone={phone.replace('+', '%2B')}")["attempts"]
                if a["to"].startswith(f"@{tag}") and a["outcome"] == "accepted"]
    times = sorted(float(a["at"]) for a in attempts)
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"status": final["status"], "sent": final["progress"]["sent"], "rate": rate,
            "by_source": dict(Counter(a["source"] for a in attempts)),
            "refused": sum(1 for phone in accounts.values()
                           for a in rig.emulator(f"/control/attempts?phone={phone.replace('+', '%2B')}")["attempts"]
                           if a["to"].startswith(f"@{tag}") and a["outcome"] != "accepted")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=6)
    parser.add_argument("--rate", type=float, default=5.0, help="messages/s per account")
    parser.add_argument("--seconds", type=float, default=20.0, help="the campaign's length at the ceiling")
    args = parser.parse_args()
    ceiling = args.accounts * args.rate
    count = int(ceiling * args.seconds)
    with Rig(3, admin=(USERNAME, PASSWORD)) as rig:
        token = rig.login("host1", USERNAME, PASSWORD)
        accounts = login_accounts(rig, token, args.accounts, args.rate)
        owners = wait_for(lambda: (o := {a: rig.owner_of(a) for a in accounts}) and all(o.values()) and o, 30,
                          "the accounts' owners")
        print(f"ceiling {ceiling:g}/s ({args.accounts} accounts x {args.rate:g}/s), {count} recipients a campaign")
        print(f"accounts per host: {dict(Counter(owners.values()))}")
        spread = run_campaign(rig, token, accounts, "three", count)
        print(f"3 hosts: {spread['rate']:.2f} sends/s = {spread['rate'] / ceiling:.0%} of the ceiling "
              f"({spread['status']}, {spread['sent']} sent, {spread['refused']} refused; by source "
              f"{spread['by_source']})")
        for name in ("host2", "host3"):
            rig.stop_host(name)
        wait_for(lambda: all(rig.owner_of(a) == "host1" for a in accounts), 90, "every account on host1")
        alone = run_campaign(rig, token, accounts, "one", count)
        print(f"1 host:  {alone['rate']:.2f} sends/s = {alone['rate'] / ceiling:.0%} of the ceiling "
              f"({alone['status']}, {alone['sent']} sent, {alone['refused']} refused; by source "
              f"{alone['by_source']})")


if __name__ == "__main__":
    main()

"""Issue 28's check, as one scenario on a running rig (tests/multihost/test_scenario.py runs it under
pytest, `scripts/hosts scenario` by hand): three hosts on shared PostgreSQL and a Sentinel-managed
Redis; accounts logged in through the emulator and spread over the hosts; a campaign over them; one
host killed (SIGKILL, its whole process tree) part-way, later the Redis master killed (Sentinel fails
over), and a second host cut off the network for 20 s, then restored. The events are timed on the
campaign's progress (what Telegram, the emulator, has accepted), not on the clock, so a slow machine
moves them all together.

`run()` only drives the platform and collects what happened (`Outcome`); the caller judges it, so the
test asserts and the script prints from the same record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from multihost.rig import Rig, RigError, wait_for

USERNAME = "ops"
PASSWORD = "multihost-password-1234"


@dataclass(frozen=True)
class Plan:
    """What the scenario does, and when (fractions of the recipients Telegram has received)."""

    recipients: int = 5000
    accounts: int = 9
    # The campaign's pace per account (its sending limits): 9 accounts at 6/s send 5,000 in ~95 s.
    per_second: float = 6.0
    kill_host: str = "host3"
    cut_host: str = "host2"
    api_host: str = "host1"  # the API the scenario talks to: never killed nor cut
    kill_at: float = 0.30
    master_kill_at: float = 0.55
    cut_at: float = 0.70
    cut_seconds: float = 20.0
    timeout: float = 600.0  # for the whole send, from the campaign's start
    # "campaign": one campaign over every account (issue 28's check); "messages": the same recipients
    # as single POST /api/messages, paced by the scenario (the path before campaigns reach owners).
    sends: str = "campaign"


@dataclass
class Outcome:
    """What happened: the timeline and everything the caller checks."""

    timeline: list[tuple[float, str]] = field(default_factory=list)
    accounts: dict[int, str] = field(default_factory=dict)  # account id -> its owner after the logins
    killed_hosts_accounts: list[int] = field(default_factory=list)
    campaign: dict[str, Any] | None = None
    message_ids: list[int] = field(default_factory=list)
    expected_peers: list[str] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)
    duplicates: int = -1
    logins_before: tuple[int, int] = (0, 0)
    logins_after: tuple[int, int] = (0, 0)
    auth_states: dict[int, str] = field(default_factory=dict)
    owners_after: dict[int, str | None] = field(default_factory=dict)
    hosts: list[dict[str, Any]] = field(default_factory=list)  # `tp hosts --json`'s items at the end
    failover_seconds: float = 0.0
    sent_seconds: float = 0.0  # from the campaign's start until every recipient was received
    events: dict[str, float] = field(default_factory=dict)  # event -> seconds from the start
    # Per account, the hosts Telegram saw its sends come from, in turn (a handover starts a new run):
    # (host, first and last attempt in seconds from the start, attempts).
    senders: dict[int, list[tuple[str, float, float, int]]] = field(default_factory=dict)

    def host_row(self, name: str) -> dict[str, Any]:
        return next((h for h in self.hosts if h["id"] == name), {})


class Scenario:
    """Drives one run of the scenario on `rig` (started with three hosts, sentinels and the admin)."""

    def __init__(self, rig: Rig, plan: Plan | None = None, say: Callable[[str], None] | None = None) -> None:
        self.rig = rig
        self.plan = plan or Plan()
        self.say = say or (lambda line: None)
        self.outcome = Outcome()
        self.token = ""
        self._started = time.monotonic()
        self._started_wall = time.time()  # the emulator's records carry wall-clock times

    # -- the steps ------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        plan = self.plan
        self._started, self._started_wall = time.monotonic(), time.time()
        self.token = self.rig.login(plan.api_host, USERNAME, PASSWORD)
        self.log_in_accounts()
        counters = self.rig.emulator("/control/stats")["counters"]
        self.outcome.logins_before = (counters.get("logins", 0), counters.get("code_requests", 0))
        baseline = counters.get("messages", 0)
        self.outcome.expected_peers = [f"@scenario{n:05d}" for n in range(plan.recipients)]
        if plan.sends == "campaign":
            self.start_campaign()
        sends_started = time.monotonic()
        pending = list(self.outcome.expected_peers)  # for "messages": posted by the scenario itself
        events = [(plan.kill_at, self.kill_host), (plan.master_kill_at, self.kill_master), (plan.cut_at, self.cut)]
        cut_until = 0.0
        checked = 0.0
        while True:
            if plan.sends == "messages" and pending:
                self._post_due(pending, sends_started)
            received = self.rig.emulator("/control/stats")["counters"].get("messages", 0) - baseline
            if events and received >= events[0][0] * plan.recipients:
                _, action = events.pop(0)
                self.note(f"{received} of {plan.recipients} received")
                cut_until = action() or cut_until
            if cut_until and time.monotonic() >= cut_until:
                self.rig.restore(plan.cut_host)
                cut_until = 0.0
                self.mark("restored", f"{plan.cut_host} restored")
            if not cut_until and (received >= plan.recipients or time.monotonic() - checked > 5):
                checked = time.monotonic()
                if self._finished(received):
                    break
            if time.monotonic() - sends_started > plan.timeout:
                self.note(f"timed out: {received} of {plan.recipients} received")
                break
            time.sleep(0.2)
        if cut_until:  # timed out while cut: never leave a host off the network
            self.rig.restore(plan.cut_host)
        self.outcome.sent_seconds = time.monotonic() - sends_started
        self.note(f"every recipient received ({self.outcome.sent_seconds:.1f} s after the start)"
                  if received >= plan.recipients else "not every recipient was received")
        self.collect()
        return self.outcome

    def log_in_accounts(self) -> None:
        """Each account through the emulator's test DC (`+99966XYYYY`, code X five times), one after the
        other, through every host's API in turn; each is owned before the next is added, so placement
        (the least-loaded host) sees the last one counted and the accounts spread over the hosts."""
        names = list(self.rig.hosts)
        for n in range(self.plan.accounts):
            via = names[n % len(names)]
            phone = f"+999664{n + 1:04d}"
            account_id = self.rig.log_in(via, self.token, phone)
            owner = wait_for(partial(self.rig.owner_of, account_id), 30, f"account {account_id} owned")
            self.outcome.accounts[account_id] = owner
            status, limits = self._call(self.plan.api_host, "PUT", f"/api/accounts/{account_id}/limits", {
                "per_second": self.plan.per_second, "burst": 1, "per_chat_seconds": 0, "per_day": 1_000_000,
                "warmup_days": 0})
            if status != 200:
                raise RigError(f"limits of account {account_id}: {status} {limits}")
        spread = {h: sorted(a for a, o in self.outcome.accounts.items() if o == h) for h in names}
        self.mark("logged_in", f"{self.plan.accounts} accounts logged in: {spread}")

    def start_campaign(self) -> None:
        body = {"name": "issue 28 scenario", "account_ids": sorted(self.outcome.accounts),
                "template": "Hello {peer}, from many hosts",
                "recipients": [{"peer": p} for p in self.outcome.expected_peers]}
        status, campaign = self._call(self.plan.api_host, "POST", "/api/campaigns", body, timeout=60)
        if status != 201:
            raise RigError(f"creating the campaign: {status} {campaign}")
        status, campaign = self._call(self.plan.api_host, "POST", f"/api/campaigns/{campaign['id']}/start")
        if status != 200:
            raise RigError(f"starting the campaign: {status} {campaign}")
        self.outcome.campaign = campaign
        self.mark("started", f"campaign {campaign['id']} started: {self.plan.recipients} recipients over "
                             f"{self.plan.accounts} accounts at {self.plan.per_second:g}/s each")

    def kill_host(self) -> None:
        name = self.plan.kill_host
        self.outcome.killed_hosts_accounts = sorted(a for a in self.outcome.accounts
                                                    if self.rig.owner_of(a) == name)
        killed = self.rig.kill(name)
        self.mark("host_killed", f"{name} killed (kill -9 of its {len(killed)} processes; it owned accounts "
                                 f"{self.outcome.killed_hosts_accounts})")

    def kill_master(self) -> None:
        old = self.rig.kill_redis_master()
        self.mark("master_killed", f"Redis master {old[0]}:{old[1]} killed (kill -9)")
        self.outcome.failover_seconds = self.rig.wait_failover(old)
        new = self.rig.redis_master()
        self.mark("failed_over", f"Sentinel promoted {new[0]}:{new[1]}, {self.outcome.failover_seconds:.1f} s "
                                 "after the kill")

    def cut(self) -> float:
        self.rig.cut(self.plan.cut_host)
        self.mark("cut", f"{self.plan.cut_host} cut off the network for {self.plan.cut_seconds:g} s")
        return time.monotonic() + self.plan.cut_seconds

    def collect(self) -> None:
        """The accounts and `tp hosts` once they have settled (the killed host judged gone, every
        account ready and held by a live host: a rebalance may be moving one, closed for a moment),
        then what Telegram saw."""
        outcome = self.outcome
        if outcome.campaign is not None:
            outcome.campaign = self._get(f"/api/campaigns/{outcome.campaign['id']}")
        live = [h for h in self.rig.hosts if h != self.plan.kill_host]
        listed: dict[str, Any] = {}

        def settled() -> bool:
            nonlocal listed
            listed = self._get("/api/accounts")
            outcome.auth_states = {int(a["id"]): str(a["auth_state"]) for a in listed["items"]}
            outcome.owners_after = {a: self.rig.owner_of(a) for a in outcome.accounts}
            result = self.rig.tp("hosts", "--json")
            outcome.hosts = json.loads(result.stdout)["items"] if result.returncode == 0 else []
            return (outcome.host_row(self.plan.kill_host).get("state") == "gone"
                    and sum(int(h["accounts_owned"]) for h in outcome.hosts) == len(outcome.accounts)
                    and all(s == "ready" for s in outcome.auth_states.values())
                    and all(o in live for o in outcome.owners_after.values()))

        try:
            wait_for(settled, 90, "the killed host gone, every account ready and held by a live host")
        except RigError as exc:
            self.note(f"{exc}: states {outcome.auth_states}, holders {outcome.owners_after}")
        table = self.rig.tp("hosts").stdout.rstrip()
        self.note("tp hosts:\n    " + table.replace("\n", "\n    "))
        deliveries = self.rig.emulator("/control/deliveries")
        outcome.deliveries = {p: n for p, n in deliveries["recipients"].items() if p.startswith("@scenario")}
        outcome.duplicates = int(deliveries["duplicates"])
        counters = self.rig.emulator("/control/stats")["counters"]
        outcome.logins_after = (counters.get("logins", 0), counters.get("code_requests", 0))
        by_address = {h.address: h.name for h in self.rig.hosts.values()}
        user_ids = {int(a["telegram_user_id"]): int(a["id"]) for a in listed["items"] if a.get("telegram_user_id")}
        for attempt in sorted(self.rig.emulator("/control/attempts")["attempts"], key=lambda a: float(a["at"])):
            account = user_ids.get(int(attempt["from_user_id"]))
            if account is None or not str(attempt["to"]).startswith("@scenario"):
                continue
            runs = outcome.senders.setdefault(account, [])
            host = by_address.get(str(attempt["source"]), str(attempt["source"]))
            at = round(float(attempt["at"]) - self._started_wall, 1)
            if runs and runs[-1][0] == host:
                runs[-1] = (host, runs[-1][1], at, runs[-1][3] + 1)
            else:
                runs.append((host, at, at, 1))
        described = {a: ", ".join(f"{h} {first:g}-{last:g} s ({n})" for h, first, last, n in runs)
                     for a, runs in sorted(outcome.senders.items())}
        self.note("each account's sends as Telegram saw them, from the hosts in turn (first-last attempt, "
                  "attempts): " + "; ".join(f"{a}: {runs}" for a, runs in described.items()))

    # -- helpers --------------------------------------------------------------------------------------

    def _finished(self, received: int) -> bool:
        """The campaign has ended (completed, or given up), or every single send was received. One
        request, not retried: the loop asks again soon, and must keep to the cut's 20 s."""
        if self.outcome.campaign is None:
            return received >= self.plan.recipients
        try:
            status, campaign = self._call(self.plan.api_host, "GET", f"/api/campaigns/{self.outcome.campaign['id']}")
        except OSError:
            return False
        return status == 200 and campaign["status"] in ("completed", "failed", "cancelled")

    def _post_due(self, pending: list[str], started: float) -> None:
        """Single sends at the campaign's pace: every account's `per_second`, in turn."""
        rate = self.plan.per_second * len(self.outcome.accounts)
        due = int((time.monotonic() - started) * rate) - len(self.outcome.message_ids)
        accounts = sorted(self.outcome.accounts)
        for _ in range(max(0, min(due, len(pending)))):
            peer = pending[0]
            account = accounts[len(self.outcome.message_ids) % len(accounts)]
            status, message = self._call(self.plan.api_host, "POST", "/api/messages",
                                         {"account_id": account, "peer": peer, "text": f"Hello {peer}"})
            if status == 503:  # not accepted (Redis failing over): the same message again next round
                return
            if status not in (200, 201, 202):
                raise RigError(f"posting to {peer}: {status} {message}")
            self.outcome.message_ids.append(int(message["id"]))
            pending.pop(0)

    def _call(self, via: str, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
        return self.rig.call(via, method, path, body, token=self.token, timeout=timeout)

    def _get(self, path: str) -> Any:
        """A read through the API host, tried again while it answers 503 (Redis failing over)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = self._call(self.plan.api_host, "GET", path)
            except OSError as exc:
                status, body = 0, repr(exc)
            if status == 200:
                return body
            if time.monotonic() > deadline or status not in (0, 503):
                raise RigError(f"GET {path}: {status} {body}")
            time.sleep(0.5)

    def mark(self, event: str, text: str) -> None:
        self.outcome.events[event] = time.monotonic() - self._started
        self.note(text)

    def note(self, text: str) -> None:
        at = time.monotonic() - self._started
        self.outcome.timeline.append((at, text))
        self.say(f"{at:7.1f} s  {text}")


@dataclass(frozen=True)
class Verdict:
    claim: str
    ok: bool
    detail: str


def judge(outcome: Outcome, plan: Plan, hosts: list[str]) -> list[Verdict]:
    """Issue 28's stated outcomes, each checked against what the run recorded."""
    verdicts = []
    owned = {h: sorted(a for a, o in outcome.accounts.items() if o == h) for h in hosts}
    share = plan.accounts // len(hosts)
    verdicts.append(Verdict("the accounts logged in spread over the hosts",
                            len(outcome.accounts) == plan.accounts and all(len(a) >= share for a in owned.values()),
                            f"owned after the logins: {owned}"))
    order = ["host_killed", "master_killed", "failed_over", "cut", "restored"]
    at = [outcome.events[e] for e in order if e in outcome.events]
    verdicts.append(Verdict("a host killed, then the Redis master (Sentinel failing over), then a host cut off "
                            "for the set time and restored, in that order",
                            len(at) == len(order) and at == sorted(at) and at[4] - at[3] >= plan.cut_seconds - 0.5
                            and bool(outcome.killed_hosts_accounts),
                            f"at (s): {dict(zip(order, (round(t, 1) for t in at), strict=False))}; the killed "
                            f"host owned {outcome.killed_hosts_accounts}"))
    if plan.sends == "campaign":
        progress = (outcome.campaign or {}).get("progress", {})
        verdicts.append(Verdict("the campaign completes",
                                (outcome.campaign or {}).get("status") == "completed"
                                and progress.get("sent") == plan.recipients and progress.get("failed") == 0,
                                f"status {(outcome.campaign or {}).get('status')}, progress {progress}, "
                                f"error {(outcome.campaign or {}).get('error')}"))
    wrong = {p: outcome.deliveries.get(p, 0) for p in outcome.expected_peers if outcome.deliveries.get(p) != 1}
    verdicts.append(Verdict("Telegram's delivery records show every recipient exactly one message",
                            len(outcome.expected_peers) == plan.recipients and not wrong
                            and set(outcome.deliveries) == set(outcome.expected_peers) and outcome.duplicates == 0,
                            f"{len(outcome.deliveries)} recipients received, {outcome.duplicates} duplicates, "
                            f"{len(wrong)} not exactly once (first: {dict(list(wrong.items())[:5])})"))
    not_ready = {a: s for a, s in outcome.auth_states.items() if s != "ready"}
    verdicts.append(Verdict("no account asked for a new login",
                            outcome.logins_after == outcome.logins_before and not not_ready
                            and len(outcome.auth_states) == plan.accounts,
                            f"(logins, code requests) at Telegram {outcome.logins_before} before the send, "
                            f"{outcome.logins_after} after; not ready: {not_ready}"))
    dead = outcome.host_row(plan.kill_host)
    others = {h["id"]: (h["state"], int(h["accounts_owned"])) for h in outcome.hosts}
    moved = {a: outcome.owners_after.get(a) for a in outcome.killed_hosts_accounts}
    verdicts.append(Verdict("`tp hosts` shows the dead host gone and its accounts owned elsewhere",
                            dead.get("state") == "gone" and dead.get("accounts_owned") == 0
                            and sum(n for _, n in others.values()) == plan.accounts
                            and all(o in hosts and o != plan.kill_host for o in moved.values()),
                            f"tp hosts: {others}; the dead host's accounts now held by {moved}"))
    return verdicts

"""Issue 28's multi-host figures in one run, on hosts in Linux network namespaces (tests/multihost/rig.py).

    python benchmarks/multihost.py                      # as root; every part, about 7 minutes on an idle machine
    python benchmarks/multihost.py --only latency,death  # some parts (campaigns, many, latency, snapshots, death)

Two rigs, one after the other, each with its own PostgreSQL, Redis and emulator on a bridge, every
host a whole supervisord deployment (API group, worker, listener) in its own namespace:

- one host: a campaign over --campaign-accounts accounts limited to --campaign-rate messages/s each
  (burst 1 in the platform, burst 2 at the emulator: the platform's limits within Telegram's); then
  --many accounts (1,000) logged in, limited to 1 message/s each, and one campaign over all of them.
- three hosts: the same campaign over as many accounts, which the platform places on the hosts
  (least-loaded first), so they are spread; the send latency; the snapshots; a host's death.

Figures, each printed with its target and pass or miss, and again together at the end:

- Campaign utilization, one host and three: the achieved rate over the summed ceiling (accounts x
  rate), counted at the emulator (what Telegram accepted) while every account was sending: from
  the last account's first send to the first account's last (`all_sending_rate`). That is the rate
  the accounts keep at their ceiling, without the start (accounts take their first recipients one
  after another, their first sends spread over about one period) and the tail (accounts run out of
  recipients at different times). Printed beside it, the rate between the campaign's first and
  last send less each account's first send, as benchmarks/platform_bench.py counts it: that one
  cannot pass 0.95 at a perfect pace once the first sends spread over a period (k sends per
  account give (k - 1) / (k - 1 + 1) at best: 0.95 for the 20 sends of --many-seconds 20).
- 1,000 accounts at 1 message/s on one host: the same measure over 1,000/s.
- Latency POST -> `sent` for an account owned by another host than the API member that takes the
  POST, on an idle platform: the time from the POST to the `message.status` `sent` event read on a
  WebSocket (`/api/ws?topics=account:<id>`) held open to that same API member, so what a client of
  it sees; messages one after another, 50 ms apart. The same through the owner's own API, beside it.
- Host death: the host owning the most of the three-host campaign's accounts (topped up to
  --death-accounts by moves) is killed (SIGKILL to every process in its namespace); at once one
  message per account is POSTed through the surviving hosts. Each account's time is its message's
  `sent_at` (PostgreSQL's clock, this machine's) less the moment the kill began; a message that
  ends failed is posted again. The figure is the last account's.
- Snapshot size: the sealed TDLib state rows of `account_snapshots` (bytes of `sealed`), median and
  max, after the logins and after the sends (the three-host rig runs with TDLIB_SNAPSHOT_SECONDS=10
  so that a snapshot is taken again after the sends; its generation shows it was).

The machine's load moves every figure here (several hosts' processes share its cores): the load
average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
# tests/ first: its `multihost` package (the rig) is found before this script's own name.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # platform_bench, a sibling script
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from multihost.rig import Rig, unavailable  # noqa: E402
from platform_bench import Platform, percentile  # noqa: E402

from telegram_platform.redis_auth import RedisAuth  # noqa: E402

USERNAME = "bench"
PASSWORD = "bench-password-" + "x" * 8
PARTS = ("campaigns", "many", "latency", "snapshots", "death")
FINAL_CAMPAIGN_STATES = ("completed", "cancelled", "failed")
FINAL_MESSAGE_STATES = ("sent", "failed", "cancelled")


# -- pure helpers (tests/benchmarks/test_multihost.py) ---------------------------------------------


def steady_rate(times: Sequence[float], accounts: int) -> float:
    """Sends per second between the first and the last send, leaving out each account's first send
    (they all go at the start, a burst the limits allow, not the steady rate). 0 when too few."""
    if len(times) <= accounts or len(times) < 2:
        return 0.0
    ordered = sorted(times)
    span = ordered[-1] - ordered[0]
    return (len(ordered) - accounts) / span if span > 0 else 0.0


def all_sending_rate(sends: Sequence[tuple[int, float]]) -> tuple[float, float, float]:
    """(sends per second, window length, spread of the first sends) over the window in which every
    account was sending: from the last account's first send to the first account's last send. It
    leaves out the start (accounts opened and refilled one after another) and the tail (accounts
    running out of recipients at different times): what is left is the rate the accounts keep up
    at their ceiling. (0, 0, spread) when the window is empty."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for account, at in sends:
        first[account] = min(first.get(account, at), at)
        last[account] = max(last.get(account, at), at)
    if not first:
        return 0.0, 0.0, 0.0
    start, end = max(first.values()), min(last.values())
    spread = start - min(first.values())
    if end <= start:
        return 0.0, 0.0, spread
    inside = sum(1 for _, at in sends if start < at <= end)
    return inside / (end - start), end - start, spread


@dataclass(frozen=True)
class Figure:
    """One of the issue's figures: its value against a target (`at_least` or `at_most`), or none."""

    name: str
    value: float | None  # None: not measured (the part failed or was skipped)
    shown: str  # the value as printed, with its unit and context
    target: float | None = None
    at_least: bool = True

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if self.target is None:
            return "-"
        met = self.value >= self.target if self.at_least else self.value <= self.target
        return "pass" if met else "MISS"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "no target"
        return f"{'>=' if self.at_least else '<='} {self.target:g}"

    def line(self) -> str:
        return f"  {self.name:<46} {self.verdict:<12} target {self.target_text:<9} {self.shown}"


def summarize_ms(values: Sequence[float]) -> str:
    """p50 / p99 / max of latencies in ms."""
    return (f"p50 {percentile(list(values), 50):.1f} ms, p99 {percentile(list(values), 99):.1f} ms, "
            f"max {max(values):.1f} ms ({len(values)} sends)")


# -- the platform on a rig --------------------------------------------------------------------------


@dataclass
class Hosts:
    """A started rig seen from the benchmark: a Platform (platform_bench's client) per host's API."""

    rig: Rig
    http: aiohttp.ClientSession
    token: str
    db: asyncpg.Connection
    apis: dict[str, Platform] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.rig.hosts)

    def api(self, name: str) -> Platform:
        return self.apis[name]

    @property
    def any(self) -> Platform:
        return next(iter(self.apis.values()))

    async def emulator(self, method: str, path: str, body: Any = None) -> Any:
        return await self.any.control(method, path, **({"json": body} if body is not None else {}))

    async def owners(self, accounts: Iterable[int]) -> dict[int, str | None]:
        """Each account's owner host as PostgreSQL records it (`accounts.owner_host`)."""
        rows = await self.db.fetch("SELECT id, owner_host FROM accounts WHERE id = ANY($1::bigint[])", list(accounts))
        return {int(r["id"]): r["owner_host"] for r in rows}


async def open_hosts(rig: Rig, http: aiohttp.ClientSession) -> Hosts:
    token = rig.login(next(iter(rig.hosts)), USERNAME, PASSWORD)
    db = await asyncpg.connect(rig.env["DATABASE_URL"])
    hosts = Hosts(rig, http, token, db)
    auth = RedisAuth(bytes.fromhex(rig.env["ENCRYPTION_KEY"]))
    for name, host in rig.hosts.items():
        hosts.apis[name] = Platform(host.url, rig.emulator_url, rig.env["DATABASE_URL"], rig.env["REDIS_URL"],
                                    token, http, auth)
    return hosts


async def bounded(calls: Iterable[Callable[[], Awaitable[Any]]], at_once: int) -> list[Any]:
    """Run the calls with at most `at_once` in flight; their results in order."""
    gate = asyncio.Semaphore(at_once)

    async def one(call: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def log_in(hosts: Hosts, indexes: range, at_once: int = 16) -> list[int]:
    """Accounts logged in (emulator phones, platform_bench's scheme), through every host's API in turn;
    the platform places each on a host itself."""
    names = hosts.names
    started = time.perf_counter()
    ids = await bounded([functools.partial(hosts.api(names[i % len(names)]).ready_account, i) for i in indexes],
                        at_once)
    elapsed = time.perf_counter() - started
    print(f"  {len(ids)} accounts logged in in {elapsed:.1f} s ({len(ids) / elapsed:.0f}/s)", flush=True)
    return [int(i) for i in ids]


async def set_limits(hosts: Hosts, accounts: Sequence[int], rate: float) -> None:
    body = {"per_second": rate, "burst": 1, "per_chat_seconds": 0, "per_day": 10_000_000, "warmup_days": 0}
    await bounded([functools.partial(hosts.any.call, "PUT", f"/api/accounts/{a}/limits", json=body)
                   for a in accounts], 16)


# -- where the CPU went -------------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, float]]:
    """Every process: its parent and the CPU seconds it has used (user + system), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return found


def _label(pid: int) -> str:
    """A process's program: its console script, or what `python -c`/`-m` runs."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    name = Path(argv[0].split()[0]).name.rstrip(":")  # redis and PostgreSQL's backends retitle themselves
    if name.startswith("python") and len(argv) > 1:  # a console script, or `python -m module`
        name = argv[2].removeprefix("telegram_platform.") if argv[1] == "-m" and len(argv) > 2 else Path(argv[1]).name
    return name


def cpu_by_program(rig: Rig) -> dict[str, float]:
    """CPU seconds used so far by the rig's programs: each host's (by namespace) and the shared
    servers' (PostgreSQL with its backends, Redis, the emulator: the root-namespace processes whose
    command line names the rig's directory or bridge address, with their descendants)."""
    table = _processes()
    labels: dict[int, str] = {}
    for name, host in rig.hosts.items():
        for pid in host.pids():
            labels[pid] = f"{name} {_label(pid)}"
    marks = (str(rig.base_dir), rig.gateway)
    for pid in table:
        if pid in labels:
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if any(mark in cmdline for mark in marks) and "netns" not in cmdline:
                labels[pid] = f"shared {_label(pid)}"
    changed = True
    while changed:  # descendants of the shared servers (PostgreSQL's backends)
        changed = False
        for pid, (parent, _) in table.items():
            if pid not in labels and parent in labels and labels[parent].startswith("shared"):
                labels[pid] = labels[parent]
                changed = True
    totals: dict[str, float] = {}
    for pid, label in labels.items():
        if pid in table:
            totals[label] = totals.get(label, 0.0) + table[pid][1]
    return totals


def print_cpu(before: dict[str, float], after: dict[str, float], wall: float, sends: int, top: int = 6) -> None:
    """The programs' CPU over a campaign: as a share of one core, and per send."""
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    ranked = [(k, v) for k, v in sorted(used.items(), key=lambda kv: -kv[1])[:top] if v > 0]
    per_send = f"; {sum(used.values()) / sends * 1000:.2f} ms of CPU per send in all" if sends else ""
    print(f"    CPU over {wall:.0f} s, share of one core (ms per send): "
          + ", ".join(f"{k} {v / wall:.0%}" + (f" ({v / sends * 1000:.2f})" if sends else "") for k, v in ranked)
          + per_send,
          flush=True)


# -- parts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignResult:
    accounts: int
    rate: float
    recipients: int
    sent: int
    status: str
    steady: float
    elapsed: float
    rejections: int
    duplicates: int
    # all_sending_rate's figures: the rate while every account sent, that window, the first sends' spread.
    all_sending: float = 0.0
    window: float = 0.0
    spread: float = 0.0

    @property
    def ceiling(self) -> float:
        return self.accounts * self.rate

    @property
    def fraction(self) -> float:
        """The figure: the rate while every account was sending, over the ceiling."""
        return self.all_sending / self.ceiling

    @property
    def first_to_last(self) -> float:
        """The rate from the campaign's first send to its last (each account's first left out), over the ceiling."""
        return self.steady / self.ceiling


async def run_campaign(hosts: Hosts, accounts: Sequence[int], rate: float, seconds: float, tag: str,
                       timeout: float) -> CampaignResult:
    """One campaign over `accounts`, each limited to `rate`/s, with enough recipients for `seconds` at
    the summed ceiling; cancelled if still running after `timeout`."""
    await hosts.emulator("POST", "/control/config", {"account_rate": rate, "account_burst": 2})
    await set_limits(hosts, accounts, rate)
    recipients = math.ceil(len(accounts) * rate * seconds)
    p = hosts.any
    campaign = await p.call("POST", "/api/campaigns", json={"name": tag, "account_ids": list(accounts),
                                                            "template": "Hello {first_name}!"})
    csv_body = "peer,first_name\n" + "".join(f"@{tag}{i},Name{i}\n" for i in range(recipients))
    await p.call("POST", f"/api/campaigns/{campaign['id']}/recipients/import", data=csv_body.encode(),
                 headers={"Content-Type": "text/csv"})
    before = (await hosts.emulator("GET", "/control/stats"))["counters"]
    servers_before = await server_counts(hosts)
    cpu_before = cpu_by_program(hosts.rig)
    started = time.perf_counter()
    await p.call("POST", f"/api/campaigns/{campaign['id']}/start")
    state = {"status": "running"}
    while time.perf_counter() - started < timeout:
        state = await p.call("GET", f"/api/campaigns/{campaign['id']}")
        if state["status"] in FINAL_CAMPAIGN_STATES:
            break
        await asyncio.sleep(0.5)
    else:
        print(f"  campaign {tag} still {state['status']} after {timeout:.0f} s: cancelled", flush=True)
        state = await p.call("POST", f"/api/campaigns/{campaign['id']}/cancel")
    elapsed = time.perf_counter() - started
    cpu_after = cpu_by_program(hosts.rig)
    servers_after = await server_counts(hosts)
    await asyncio.sleep(1)  # sends in flight at a cancel reach the emulator
    received = [m for m in (await hosts.emulator("GET", "/control/received"))["messages"]
                if m["to"].startswith(f"@{tag}")]
    print_cpu(cpu_before, cpu_after, elapsed, len(received))
    if received:
        used = {k: servers_after[k] - servers_before[k] for k in servers_before}
        print(f"    per send, idle work included: {used['xacts'] / len(received):.2f} PostgreSQL transactions, "
              f"{used['rows'] / len(received):.2f} rows written, {used['commands'] / len(received):.1f} Redis "
              f"commands", flush=True)
    if len(hosts.names) > 1 and received:
        await print_by_host(hosts, tag, min(m["at"] for m in received))
    after = (await hosts.emulator("GET", "/control/stats"))["counters"]
    counts: dict[str, int] = {}
    for m in received:
        counts[m["to"]] = counts.get(m["to"], 0) + 1
    rejections = sum(after.get(k, 0) - before.get(k, 0) for k in ("rate_limited", "peer_flood"))
    await hosts.emulator("POST", "/control/config", {"account_rate": None})  # later parts send unpaced
    all_sending, window, spread = all_sending_rate([(m["from_user_id"], m["at"]) for m in received])
    by_account: dict[int, list[float]] = {}
    for m in received:
        by_account.setdefault(m["from_user_id"], []).append(m["at"])
    gaps = sorted(b - a for times in by_account.values() for a, b in itertools.pairwise(sorted(times)))
    if gaps:
        print(f"    one account's sends apart: p10 {gaps[len(gaps) // 10]:.3f} s, median {gaps[len(gaps) // 2]:.3f} s, "
              f"p90 {gaps[len(gaps) * 9 // 10]:.3f} s, p99 {gaps[len(gaps) * 99 // 100]:.3f} s "
              f"(the limit: {1 / rate:.3f} s)", flush=True)
    return CampaignResult(len(accounts), rate, recipients, len(received), state["status"],
                          steady_rate([m["at"] for m in received], len(accounts)), elapsed, rejections,
                          sum(n - 1 for n in counts.values()), all_sending, window, spread)


async def server_counts(hosts: Hosts) -> dict[str, int]:
    """PostgreSQL's committed transactions and rows written (this database), Redis's commands."""
    row = await hosts.db.fetchrow(
        """SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS rows FROM pg_stat_database
           WHERE datname = current_database()""")
    client = hosts.rig.redis_client()
    try:
        commands = int(await asyncio.to_thread(lambda: client.info("stats")["total_commands_processed"]))
    finally:
        client.close()
    return {"xacts": int(row["xact_commit"]), "rows": int(row["rows"]), "commands": commands}


async def print_by_host(hosts: Hosts, tag: str, first: float) -> None:
    """When each host sent its share (the emulator records each attempt's source address): a host
    that starts late or ends early lowers the campaign's rate."""
    names = {host.address: name for name, host in hosts.rig.hosts.items()}
    spans: dict[str, list[float]] = {}
    for a in (await hosts.emulator("GET", "/control/attempts"))["attempts"]:
        if a["to"].startswith(f"@{tag}") and a.get("source"):
            spans.setdefault(names.get(a["source"], a["source"]), []).append(float(a["at"]) - first)
    print("    attempts by host (first and last, s after the campaign's first send; count): " + ", ".join(
        f"{name} {min(t):+.1f}..{max(t):+.1f} {len(t)}" for name, t in sorted(spans.items())), flush=True)


def print_campaign(title: str, r: CampaignResult) -> None:
    print(f"  {title}: {r.accounts} accounts x {r.rate:g}/s (ceiling {r.ceiling:g}/s), {r.recipients} recipients, "
          f"status {r.status} after {r.elapsed:.1f} s; {r.sent} sent, {r.steady:.1f}/s from the first send to the "
          f"last = {r.first_to_last:.3f} of the ceiling; flood rejections {r.rejections}, duplicates "
          f"{r.duplicates}", flush=True)
    print(f"    while every account was sending ({r.window:.1f} s, from the last account's first send to the first "
          f"account's last): {r.all_sending:.1f}/s = {r.all_sending / r.ceiling:.3f} of the ceiling; first sends "
          f"spread over {r.spread:.1f} s", flush=True)


def campaign_figure(name: str, r: CampaignResult | None) -> Figure:
    if r is None:
        return Figure(name, None, "-", 0.95)
    return Figure(name, r.fraction, f"{r.fraction:.3f} ({r.all_sending:.1f} of {r.ceiling:g}/s while every account "
                  f"sent; {r.first_to_last:.3f} first to last; {r.status})", 0.95)


async def latency(hosts: Hosts, account: int, via: str, samples: int) -> list[float]:
    """POST -> `sent` event on a WebSocket to the same API member, `samples` messages one after another."""
    p = hosts.api(via)
    arrived: dict[int, float] = {}
    news = asyncio.Event()
    url = f"{p.api}/api/ws?topics=account:{account}&token={hosts.token}"
    async with hosts.http.ws_connect(url, heartbeat=30) as ws:
        first = await ws.receive_json(timeout=10)
        if first.get("type") != "subscribed":
            raise RuntimeError(f"WebSocket: {first}")

        async def read() -> None:
            async for frame in ws:
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(frame.data)
                data = event.get("data") or {}
                if event.get("type") == "message.status" and data.get("status") == "sent":
                    arrived[int(data["message_id"])] = time.perf_counter()
                    news.set()

        reader = asyncio.create_task(read())
        try:
            latencies = []
            for i in range(samples):
                t0 = time.perf_counter()
                message = await p.call("POST", "/api/messages", json={"account_id": account, "peer": f"@lat{via}{i}",
                                                                      "text": "latency"})
                deadline = time.monotonic() + 15
                while message["id"] not in arrived:  # the event may have come before the POST's answer
                    news.clear()
                    if time.monotonic() > deadline or reader.done():
                        raise RuntimeError(f"no `sent` event for message {message['id']} within 15 s")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(news.wait(), 1.0)
                latencies.append((arrived[message["id"]] - t0) * 1000)
                await asyncio.sleep(0.05)
            return latencies
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


@dataclass(frozen=True)
class Snapshots:
    accounts: int
    median: float
    largest: int
    generations: float  # the median generation: > the first shows a snapshot taken again

    def text(self) -> str:
        return (f"median {self.median:.0f} B, max {self.largest} B over {self.accounts} accounts "
                f"(median generation {self.generations:g})")


async def snapshot_sizes(hosts: Hosts, accounts: Sequence[int]) -> Snapshots:
    rows = await hosts.db.fetch("""SELECT octet_length(sealed) AS size, generation FROM account_snapshots
                                   WHERE account_id = ANY($1::bigint[]) AND sealed IS NOT NULL""", list(accounts))
    if not rows:
        raise RuntimeError("no snapshot found")
    sizes = [int(r["size"]) for r in rows]
    return Snapshots(len(rows), statistics.median(sizes), max(sizes),
                     statistics.median(int(r["generation"]) for r in rows))


@dataclass(frozen=True)
class Death:
    host: str
    accounts: int
    served: list[float]  # seconds from the kill, per account
    reposted: int
    owners_after: dict[str, int]
    new_logins: int


async def host_death(hosts: Hosts, accounts: Sequence[int], wanted: int, timeout: float) -> Death:
    """Kill the host owning the most of `accounts` (topped up to `wanted` by moves); each of its
    accounts' time to a send made elsewhere."""
    owners = await hosts.owners(accounts)
    by_host: dict[str, list[int]] = {}
    for account, owner in owners.items():
        if owner:
            by_host.setdefault(owner, []).append(account)
    victim = max(hosts.names, key=lambda n: len(by_host.get(n, [])))
    doomed = list(by_host.get(victim, []))
    for account in [a for a in accounts if a not in doomed][: max(0, wanted - len(doomed))]:
        await hosts.api(victim).call("POST", f"/api/accounts/{account}/move", json={"to": victim})
        doomed.append(account)
    survivors = [n for n in hosts.names if n != victim]
    logins = (await hosts.emulator("GET", "/control/stats"))["counters"].get("logins", 0)
    print(f"  killing {victim}, owner of {len(doomed)} accounts; survivors {', '.join(survivors)}", flush=True)
    killed_at = time.time()
    hosts.rig.kill(victim)  # returns once nothing is left in its namespace
    print(f"  {victim} dead {time.time() - killed_at:.2f} s after the first SIGKILL", flush=True)

    async def post(account: int, n: int) -> int:
        via = hosts.api(survivors[n % len(survivors)])
        message = await via.call("POST", "/api/messages", json={"account_id": account, "peer": f"@death{account}",
                                                                "text": f"after {victim} died"})
        return int(message["id"])

    pending = {await post(a, i): a for i, a in enumerate(doomed)}
    served: dict[int, float] = {}
    reposted = 0
    deadline = time.monotonic() + timeout
    reader = hosts.api(survivors[0])
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        for message_id, account in list(pending.items()):
            message = await reader.call("GET", f"/api/messages/{message_id}")
            if message["status"] not in FINAL_MESSAGE_STATES:
                continue
            del pending[message_id]
            if message["status"] == "sent":
                sent_at = dt.datetime.fromisoformat(message["sent_at"]).timestamp()
                served[account] = sent_at - killed_at
            else:
                reposted += 1
                pending[await post(account, reposted)] = account
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(doomed)} accounts not served within {timeout:.0f} s")
    after = await hosts.owners(doomed)
    owners_after: dict[str, int] = {}
    for owner in after.values():
        owners_after[str(owner)] = owners_after.get(str(owner), 0) + 1
    new_logins = (await hosts.emulator("GET", "/control/stats"))["counters"].get("logins", 0) - logins
    return Death(victim, len(doomed), sorted(served.values()), reposted, owners_after, new_logins)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Results:
    campaign_one: CampaignResult | None = None
    campaign_three: CampaignResult | None = None
    many: CampaignResult | None = None
    latency: list[float] | None = None
    latency_same_host: list[float] | None = None
    latency_route: str = ""
    snapshots_login: Snapshots | None = None
    snapshots_sends: Snapshots | None = None
    death: Death | None = None
    errors: list[str] = field(default_factory=list)

    def figures(self, many: int) -> list[Figure]:
        figures = [campaign_figure("campaign, accounts on 1 host", self.campaign_one),
                   campaign_figure("campaign, the same accounts on 3 hosts", self.campaign_three)]
        m = self.many
        figures.append(Figure(f"1 host, {many:,} accounts x 1 msg/s", m.fraction if m else None,
                              f"{m.fraction:.3f} ({m.all_sending:.0f}/s of {m.ceiling:,.0f}/s while every account "
                              f"sent; {m.first_to_last:.3f} first to last; {m.status})" if m else "-",
                              0.95))
        lat = self.latency
        figures.append(Figure("latency POST->sent, API and owner apart (p99)", percentile(lat, 99) if lat else None,
                              f"{summarize_ms(lat)}; {self.latency_route}" if lat else "-", 50, at_least=False))
        d = self.death
        figures.append(Figure("host death -> last account served elsewhere", max(d.served) if d else None,
                              f"{max(d.served):.1f} s ({d.accounts} accounts of {d.host}; median "
                              f"{statistics.median(d.served):.1f} s)" if d else "-", 30, at_least=False))
        for label, snap in (("after login", self.snapshots_login), ("after sends", self.snapshots_sends)):
            figures.append(Figure(f"TDLib state snapshot size, {label}", snap.median if snap else None,
                                  snap.text() if snap else "-"))
        return figures


async def attempt(results: Results, part: str, work: Callable[[], Awaitable[None]]) -> None:
    """One part; its failure is reported and the run goes on to the next."""
    try:
        await work()
    except Exception as exc:  # a benchmark reports what failed and measures the rest
        results.errors.append(f"{part}: {type(exc).__name__}: {exc}")
        print(f"  {part} FAILED: {type(exc).__name__}: {exc}", flush=True)


async def one_host(rig: Rig, args: argparse.Namespace, results: Results) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        hosts = await open_hosts(rig, http)
        try:
            accounts: list[int] = []
            if "campaigns" in args.only:
                accounts = await log_in(hosts, range(args.campaign_accounts))

                async def campaign() -> None:
                    results.campaign_one = await run_campaign(hosts, accounts, args.campaign_rate,
                                                              args.campaign_seconds, "c1r", args.timeout)
                    print_campaign("campaign on 1 host", results.campaign_one)

                await attempt(results, "campaign on 1 host", campaign)
            if "many" in args.only:
                async def many() -> None:
                    more = await log_in(hosts, range(len(accounts), args.many))
                    everyone = accounts + more
                    results.many = await run_campaign(hosts, everyone, 1.0, args.many_seconds, "m1r", args.timeout)
                    print_campaign(f"{args.many} accounts on 1 host", results.many)

                await attempt(results, "many accounts", many)
        finally:
            await hosts.db.close()


async def three_hosts(rig: Rig, args: argparse.Namespace, results: Results) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        hosts = await open_hosts(rig, http)
        try:
            accounts = await log_in(hosts, range(args.campaign_accounts))
            await asyncio.sleep(2)  # the snapshot at READY is taken again a second later
            spread: dict[str, int] = {}
            for owner in (await hosts.owners(accounts)).values():
                spread[str(owner)] = spread.get(str(owner), 0) + 1
            print(f"  placed: {dict(sorted(spread.items()))}", flush=True)

            if "snapshots" in args.only:
                async def after_login() -> None:
                    results.snapshots_login = await snapshot_sizes(hosts, accounts)
                    print(f"  snapshots after login: {results.snapshots_login.text()}", flush=True)

                await attempt(results, "snapshots after login", after_login)
            if "campaigns" in args.only:
                async def campaign() -> None:
                    results.campaign_three = await run_campaign(hosts, accounts, args.campaign_rate,
                                                                args.campaign_seconds, "c3r", args.timeout)
                    print_campaign("campaign on 3 hosts", results.campaign_three)

                await attempt(results, "campaign on 3 hosts", campaign)
            if "latency" in args.only:
                async def measure_latency() -> None:
                    owners = await hosts.owners(accounts)
                    account, owner = next((a, str(o)) for a, o in owners.items() if o in rig.hosts)
                    via = next(n for n in hosts.names if n != owner)
                    await asyncio.sleep(2)  # idle: what the campaign left in flight is done
                    results.latency_same_host = await latency(hosts, account, owner, args.latency_samples)
                    print(f"  latency through the owner's own API ({owner}): "
                          f"{summarize_ms(results.latency_same_host)}", flush=True)
                    results.latency = await latency(hosts, account, via, args.latency_samples)
                    results.latency_route = f"API {via}, account on {rig.owner_of(account)}, WebSocket event"
                    print(f"  latency API {via} -> owner {owner}: {summarize_ms(results.latency)}", flush=True)

                await attempt(results, "latency", measure_latency)
            if "snapshots" in args.only:
                async def after_sends() -> None:
                    await hosts.any.call("POST", "/api/messages", json={"account_id": accounts[0], "peer": "@snap",
                                                                        "text": "one more"})
                    await asyncio.sleep(args.snapshot_wait)  # TDLIB_SNAPSHOT_SECONDS=10, and its write
                    results.snapshots_sends = await snapshot_sizes(hosts, accounts)
                    print(f"  snapshots after sends: {results.snapshots_sends.text()}", flush=True)

                await attempt(results, "snapshots after sends", after_sends)
            if "death" in args.only:
                async def death() -> None:
                    results.death = d = await host_death(hosts, accounts, args.death_accounts, args.timeout)
                    print(f"  {d.accounts} accounts of {d.host} served elsewhere: last {max(d.served):.1f} s, median "
                          f"{statistics.median(d.served):.1f} s after the kill; re-posted {d.reposted}; owners now "
                          f"{d.owners_after}; new logins at Telegram {d.new_logins}", flush=True)

                await attempt(results, "host death", death)
        finally:
            await hosts.db.close()


def started_rig(hosts: int, args: argparse.Namespace, env: dict[str, str]) -> Rig:
    print(f"\nstarting {hosts} host(s) ... (load {os.getloadavg()[0]:.2f})", flush=True)
    return Rig(hosts, api_processes=args.api_processes, admin=(USERNAME, PASSWORD), start_timeout=180,
               env={"TP_ACCESS_TOKEN_TTL": "7200", **env, **dict(kv.split("=", 1) for kv in args.env)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--campaign-accounts", type=int, default=30)
    parser.add_argument("--campaign-rate", type=float, default=2.0, help="messages/s per account (campaigns)")
    parser.add_argument("--campaign-seconds", type=float, default=60.0,
                        help="recipients for this long at the summed ceiling")
    parser.add_argument("--many", type=int, default=1000, help="accounts on one host at 1 message/s")
    parser.add_argument("--many-seconds", type=float, default=20.0)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--death-accounts", type=int, default=10, help="accounts the killed host owns, at least")
    parser.add_argument("--snapshot-wait", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds any one wait may take")
    parser.add_argument("--api-processes", type=int, default=1, help="API processes per host")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every host (e.g. TP_WORKER_CHILDREN=2)")
    args = parser.parse_args()
    args.only = {p.strip() for p in args.only.split(",") if p.strip()}
    if unknown := args.only - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if reason := unavailable():
        sys.exit(f"benchmarks/multihost.py: {reason}")
    load_start = os.getloadavg()
    print(f"cpus {os.cpu_count()}, load {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    results = Results()
    started = time.monotonic()
    # A rig is used from the main thread (its processes' parent-death signal follows the thread).
    if args.only & {"campaigns", "many"}:
        with started_rig(1, args, {}) as rig:
            asyncio.run(one_host(rig, args, results))
    if args.only & {"campaigns", "latency", "snapshots", "death"}:
        with started_rig(3, args, {"TDLIB_SNAPSHOT_SECONDS": "10"}) as rig:
            asyncio.run(three_hosts(rig, args, results))
    load_end = os.getloadavg()
    print(f"\nissue 28, multi-host figures ({time.monotonic() - started:.0f} s; cpus {os.cpu_count()}, load at start "
          f"{load_start[0]:.2f}, at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f})")
    for figure in results.figures(args.many):
        print(figure.line())
    for error in results.errors:
        print(f"  error: {error}")


if __name__ == "__main__":
    main()

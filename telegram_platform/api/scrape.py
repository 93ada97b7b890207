"""What GET /metrics reads at scrape time (api/routes/metrics.py), where a reading is more accurate
than a running count: queue depths and the oldest job's age (Redis), Telegram clients (the hosts'
published stats), accounts and campaigns (PostgreSQL), processes, memory and uptime (supervisord and
/proc), the incoming-message spool, and the build (tp_build_info). Each reader reports its own success."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..events import parse_id
from ..ops.supervisor import SupervisorClient
from ..queue.jobs import JOB_PREFIX, failed_key, queue_key, scheduled_key
from ..queue.registry import QUEUE_NAMES
from ..queue.routing import host_queues
from ..redis_keys import EVENTS_LOG, TDLIB_STATS_PREFIX, WEBHOOKS_CURSOR, WORKER_HEARTBEAT_PREFIX, active_jobs
from ..states import HostState
from ..storage import campaigns as campaign_store
from ..storage import hosts as host_store
from ..version import VERSION, python_version, tdlib_version
from ..worker.spool import count_waiting

SCRAPE_READ_TIMEOUT = 2.0
# How long one round of scrape-time reads answers every scrape of this process: scrapers that come
# together (several Prometheis, a retry, a burst) cost PostgreSQL, Redis and supervisord one round.
SCRAPE_CACHE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class ScrapeSources:
    """What an API member reads at scrape time. Any of them may be missing (then it is skipped)."""

    redis: aioredis.Redis | None
    db: asyncpg.Pool | None
    supervisor_socket: Path | None
    # Restart counts kept by the operations event listener: {(program, cause): count}.
    restart_counts: Callable[[], Mapping[tuple[str, str], int]] | None = None
    # Where this machine's worker children spool incoming messages (worker/spool.py).
    spool_dir: Path | None = None
    # This host's TP_HOST_ID: the `host` label of what is read from this machine (processes, spool).
    host_id: str = ""
    # TP_HOST_GONE_SECONDS: a host silent this long counts as gone in the platform-wide host gauges.
    host_gone_after: float = 30.0


class ScrapeCache:
    """One round of `collect_platform` at a time per process, its result kept `ttl` seconds.

    A scrape that finds a fresh result takes it; one that finds a round in flight waits for that
    round; only a scrape that finds neither starts one. A scraper that gives up (its request is
    cancelled) does not cancel the round the others wait for."""

    def __init__(self, ttl: float = SCRAPE_CACHE_SECONDS) -> None:
        self._ttl = ttl
        self._result: list[Metric] | None = None
        self._read_at = 0.0
        self._round: asyncio.Future[list[Metric]] | None = None

    async def collect(self, sources: ScrapeSources) -> list[Metric]:
        if self._result is not None and time.monotonic() - self._read_at < self._ttl:
            return self._result
        if self._round is None:
            self._round = asyncio.ensure_future(self._read(sources))
        return await asyncio.shield(self._round)

    async def _read(self, sources: ScrapeSources) -> list[Metric]:
        try:
            result = await collect_platform(sources)
            # Fresh from when the round ended: a slow round is not re-read by the very next scrape.
            self._result, self._read_at = result, time.monotonic()
            return result
        finally:
            self._round = None


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


async def collect_platform(sources: ScrapeSources) -> list[Metric]:
    """Read queues, Telegram hosts, accounts, health and processes; each reader reports its own
    success in `tp_metrics_collector_success`, so one slow or broken part hides nothing else."""
    families: list[Metric] = []
    success = _gauge("tp_metrics_collector_success",
                     "1 when this scrape-time reader worked, 0 when it failed or timed out.", ["collector"])
    readers: list[tuple[str, Any]] = []
    if sources.redis is not None:
        readers.append(("redis", _read_redis(sources.redis)))
    if sources.db is not None:
        readers.append(("database", _read_database(sources.db)))
        readers.append(("hosts", _read_hosts(sources.db, sources.host_gone_after)))
    if sources.supervisor_socket is not None:
        readers.append(("supervisor", asyncio.to_thread(
            _read_processes, sources.supervisor_socket, sources.restart_counts, sources.host_id)))
    if sources.spool_dir is not None:
        readers.append(("spool", asyncio.to_thread(_read_spool, sources.spool_dir, sources.host_id)))
    results = await asyncio.gather(
        *(asyncio.wait_for(reader, SCRAPE_READ_TIMEOUT) for _, reader in readers), return_exceptions=True)
    up: dict[str, bool] = {}
    for (name, _), result in zip(readers, results, strict=True):
        ok = not isinstance(result, BaseException)
        success.add_metric([name], 1.0 if ok else 0.0)
        up[name] = ok
        if ok:
            assert isinstance(result, list)
            families.extend(result)
    families.append(success)
    health = _gauge("tp_health_ok", "1 when /api/health/detailed would say ok (database, Redis and a "
                    "live worker), else 0.")
    workers = next((f for f in families if f.name == "tp_queue_workers"), None)
    live_workers = workers.samples[0].value if workers is not None and workers.samples else 0.0
    db_up = next((f for f in families if f.name == "tp_database_up"), None)
    db_ok = bool(db_up is not None and db_up.samples and db_up.samples[0].value == 1.0)
    health.add_metric([], 1.0 if (up.get("redis") and db_ok and live_workers > 0) else 0.0)
    families.append(health)
    families.append(build_info(sources.host_id))
    return families


def build_info(host_id: str) -> Metric:
    """tp_build_info: which build this host runs, as the usual constant-1 gauge whose labels say it."""
    info = _gauge("tp_build_info", "The running build: telegram-platform, bundled TDLib and Python versions "
                  "(always 1).", ["host", "version", "tdlib_version", "python"])
    info.add_metric([host_id, VERSION, tdlib_version(), python_version()], 1.0)
    return info


async def _read_redis(client: aioredis.Redis) -> list[Metric]:
    depth = _gauge("tp_queue_depth", "Jobs waiting in the queue.", ["queue"])
    started = _gauge("tp_queue_started_jobs", "Jobs taken by a worker and not finished yet.", ["queue"])
    scheduled = _gauge("tp_queue_scheduled_jobs", "Jobs scheduled to run later (retries, flood waits, "
                       "scheduled sends).", ["queue"])
    failed = _gauge("tp_queue_failed_jobs", "Jobs in the failed registry (kept 7 days).", ["queue"])
    oldest = _gauge("tp_queue_oldest_job_age_seconds", "Age of the job at the head of the queue "
                    "(0 when empty).", ["queue"])
    # The shared queues and every host's own (queue/routing.py).
    queues = [*QUEUE_NAMES, *await host_queues(client)]
    async with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue_key(queue))
            pipe.zcard(scheduled_key(queue))
            pipe.zcard(failed_key(queue))
            pipe.lindex(queue_key(queue), 0)
        counts = await pipe.execute()
    heads: dict[str, str] = {}
    for i, queue in enumerate(queues):
        depth.add_metric([queue], counts[i * 4])
        scheduled.add_metric([queue], counts[i * 4 + 1])
        failed.add_metric([queue], counts[i * 4 + 2])
        head = counts[i * 4 + 3]
        if head is not None:
            heads[queue] = head.decode() if isinstance(head, bytes) else str(head)
    now = time.time()
    enqueued = await asyncio.gather(*(client.hget(JOB_PREFIX + jid, "enqueued_at") for jid in heads.values()))
    ages = {queue: _age(raw, now) for queue, raw in zip(heads, enqueued, strict=True)}
    for queue in queues:
        oldest.add_metric([queue], ages.get(queue, 0.0))
    in_hand = dict.fromkeys(queues, 0)
    for queue in queues:
        keys = [key async for key in client.scan_iter(match=active_jobs(queue, "*"), count=200)]
        if keys:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                in_hand[queue] = sum(await pipe.execute())
    for queue, count in in_hand.items():
        started.add_metric([queue], count)
    workers = _gauge("tp_queue_workers", "Worker children alive (heartbeat in the last 10 s).")
    workers.add_metric([], float(len([k async for k in client.scan_iter(match=WORKER_HEARTBEAT_PREFIX + "*",
                                                                          count=100)])))

    stat_keys = [key async for key in client.scan_iter(match=TDLIB_STATS_PREFIX + "*", count=100)]
    hosts = [json.loads(v) for v in (await client.mget(stat_keys) if stat_keys else []) if v]
    active = _gauge("tdlib_active_clients", "Telegram clients open in the hosts (all authorization states).")
    queue_depth = _gauge("tdlib_queue_depth", "Telegram requests sent and not answered yet, over all hosts.")
    by_state = _gauge("tdlib_clients", "Telegram clients open in the hosts, by authorization state.",
                      ["auth_state"])
    lag = _gauge("tdlib_receive_loop_lag_seconds", "Worst receive-loop lag over the hosts (last minute).")
    host_count = _gauge("tdlib_hosts", "Telegram hosts publishing stats (live worker children).")
    states: dict[str, int] = {}
    for host in hosts:
        for state, count in host.get("clients", {}).items():
            states[state] = states.get(state, 0) + int(count)
    active.add_metric([], float(sum(states.values())))
    queue_depth.add_metric([], float(sum(int(h.get("pending_requests", 0)) for h in hosts)))
    for state, count in sorted(states.items()):
        by_state.add_metric([state], float(count))
    lag.add_metric([], max((float(h.get("receive_loop_lag_seconds", 0.0)) for h in hosts), default=0.0))
    host_count.add_metric([], float(len(hosts)))
    # The same stats per host (each names its host): the clients a host holds, for the per-host view.
    per_host = _gauge("tp_host_telegram_clients", "Telegram clients open in each live host (its worker "
                      "children's published stats).", ["host"])
    clients_by_host: dict[str, int] = {}
    for host in hosts:
        name = str(host.get("host", ""))
        clients_by_host[name] = clients_by_host.get(name, 0) + sum(int(c) for c in host.get("clients", {}).values())
    for name, count in sorted(clients_by_host.items()):
        per_host.add_metric([name], float(count))

    kept = _gauge("tp_event_log_events", "Events kept for replay in the event log (tp:events:log).")
    behind = _gauge("tp_webhook_events_behind_seconds", "How far the webhook listeners' cursor trails the "
                    "newest event, by their publishing times (saved once a second: ~1 s when caught up).")
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(EVENTS_LOG)
        pipe.xrevrange(EVENTS_LOG, count=1)
        pipe.get(WEBHOOKS_CURSOR)
        length, newest, cursor = await pipe.execute()
    kept.add_metric([], float(length))
    gap = 0.0
    if newest and cursor:
        newest_ms, cursor_ms = parse_id(newest[0][0])[0], parse_id(cursor)[0]
        gap = max(0.0, (newest_ms - cursor_ms) / 1000)
    behind.add_metric([], gap)
    return [depth, started, scheduled, failed, oldest, workers, active, queue_depth, by_state, lag, host_count,
            per_host, kept, behind]


def _read_spool(directory: Path, host_id: str) -> list[Metric]:
    spooled = _gauge("tp_incoming_spooled_messages", "Incoming messages written to this machine's disk "
                     "while Redis and PostgreSQL were both unreachable, not yet handed to the updates queue.",
                     ["host"])
    spooled.add_metric([host_id], float(count_waiting(directory)))
    return [spooled]


def _age(raw: bytes | str | None, now: float) -> float:
    if not raw:
        return 0.0
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, now - when.timestamp())


async def _read_database(pool: asyncpg.Pool) -> list[Metric]:
    up = _gauge("tp_database_up", "1 when PostgreSQL answered this scrape.")
    accounts = _gauge("tp_accounts", "Telegram accounts, by authorization state.", ["auth_state"])
    paused = _gauge("tp_accounts_paused", "Accounts not sending now because Telegram limited them "
                    "(flood_wait: 429 retry-after; peer_flood: cold sends stopped).", ["reason"])
    campaigns = _gauge("tp_campaigns", "Campaigns, by status.", ["status"])
    campaign_progress = _gauge("tp_campaign_recipients", "Recipients of running and paused campaigns, by "
                               "progress (sent, failed, pending, skipped).", ["state"])
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT auth_state, count(*) AS n FROM accounts GROUP BY auth_state")
        limited = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE paused_until > now()) AS flood_wait, "
            "count(*) FILTER (WHERE peer_flood_until > now()) AS peer_flood FROM accounts")
        has_campaigns = await conn.fetchval("SELECT to_regclass('campaigns') IS NOT NULL")
        campaign_rows = (await conn.fetch("SELECT status, count(*) AS n FROM campaigns GROUP BY status")
                         if has_campaigns else [])
        progress = await _campaign_progress(conn) if has_campaigns else None
    up.add_metric([], 1.0)
    for row in rows:
        accounts.add_metric([row["auth_state"]], float(row["n"]))
    paused.add_metric(["flood_wait"], float(limited["flood_wait"]))
    paused.add_metric(["peer_flood"], float(limited["peer_flood"]))
    for row in campaign_rows:
        campaigns.add_metric([row["status"]], float(row["n"]))
    families: list[Metric] = [up, accounts, paused]
    if has_campaigns:
        families.append(campaigns)
    if progress is not None:
        for state in ("sent", "failed", "pending", "skipped"):
            campaign_progress.add_metric([state], float(progress.get(state, 0)))
        families.append(campaign_progress)
    return families


async def _campaign_progress(conn: asyncpg.Connection) -> dict[str, int]:
    """Sent/failed/pending/skipped summed over running and paused campaigns, counted the way
    GET /api/campaigns/{id} counts them (storage.campaigns.progress)."""

    out = {"sent": 0, "failed": 0, "pending": 0, "skipped": 0}
    for row in await conn.fetch("SELECT * FROM campaigns WHERE status IN ('running', 'paused')"):
        progress = await campaign_store.progress(conn, row)
        for state in out:
            out[state] += int(progress.get(state, 0))
    return out


async def _read_hosts(pool: asyncpg.Pool, gone_after: float) -> list[Metric]:
    """The platform's hosts as PostgreSQL sees them (storage/hosts.py), the same from every host's
    /metrics: `host` here is the host a sample is about, not the one that answered the scrape."""
    state = _gauge("tp_host_state", "1 for the state each host is in (up, draining, gone), judged by "
                   "PostgreSQL's clock from its last heartbeat.", ["host", "state"])
    owned = _gauge("tp_host_accounts", "Accounts each host owns (accounts.owner_host), gone hosts included.",
                   ["host"])
    age = _gauge("tp_host_heartbeat_age_seconds", "Seconds since each host's last heartbeat.", ["host"])
    by_state = _gauge("tp_hosts", "Hosts, by state.", ["state"])
    orphans = _gauge("tp_accounts_without_owner", "Logged-in accounts (ready or closed) that no up or "
                     "draining host owns: no owner host, or one that is gone. The orphan scan opens them.")
    async with pool.acquire() as conn:
        hosts = await host_store.list_hosts(conn, gone_after=gone_after)
        unowned = await host_store.count_without_owner(conn, gone_after=gone_after)
    counts = {s.value: 0 for s in HostState}
    for host in hosts:
        state.add_metric([host["id"], host["state"]], 1.0)
        owned.add_metric([host["id"]], float(host["accounts_owned"]))
        age.add_metric([host["id"]], max(0.0, float(host["heartbeat_age_seconds"])))
        counts[host["state"]] = counts.get(host["state"], 0) + 1
    for name, count in sorted(counts.items()):
        by_state.add_metric([name], float(count))
    orphans.add_metric([], float(unowned))
    return [state, owned, age, by_state, orphans]


# -- processes: supervisord and /proc ------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_processes(socket_path: Path,
                    restart_counts: Callable[[], Mapping[tuple[str, str], int]] | None,
                    host_id: str) -> list[Metric]:
    """Per program of this host: state, memory, start time, uptime; the worker pool's children too."""

    sup_up = _gauge("tp_supervisor_up", "1 when supervisord answered this scrape.", ["host"])
    if not socket_path.exists():
        sup_up.add_metric([host_id], 0.0)
        return [sup_up]
    processes = SupervisorClient(socket_path).processes()
    sup_up.add_metric([host_id], 1.0)
    state = _gauge("tp_process_state", "1 for the state each supervisord program is in (RUNNING, "
                   "BACKOFF, FATAL, ...).", ["host", "program", "state"])
    memory = _gauge("tp_process_resident_memory_bytes", "Resident memory of each platform process "
                    "(worker children listed on their own).", ["host", "program"])
    start = _gauge("tp_process_start_time_seconds", "Start time of each platform process (unix time).",
                   ["host", "program"])
    uptime = _gauge("tp_process_uptime_seconds", "Seconds each platform process has been running.",
                    ["host", "program"])
    now = time.time()
    boot = _boot_time()
    children = _children_by_parent()
    for proc in processes:
        program = proc.name.split(":", 1)[-1]
        state.add_metric([host_id, program, proc.state], 1.0)
        if not proc.pid:
            continue
        pids = [(program, proc.pid)]
        for child in children.get(proc.pid, []):
            name = _child_name(child)
            if name:
                pids.append((name, child))
        for name, pid in pids:
            rss = _rss(pid)
            began = _start_time(pid, boot)
            if rss is not None:
                memory.add_metric([host_id, name], float(rss))
            if began is not None:
                start.add_metric([host_id, name], began)
                uptime.add_metric([host_id, name], max(0.0, now - began))
    families: list[Metric] = [sup_up, state, memory, start, uptime]
    if restart_counts is not None:
        restarts = CounterMetricFamily("tp_process_restarts", "Restarts of each supervisord program, by "
                                       "cause (crash, watchdog, reload).", labels=["host", "program", "cause"])
        for (program, cause), count in sorted(restart_counts().items()):
            restarts.add_metric([host_id, program, cause], float(count))
        families.append(restarts)
    return families


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _boot_time() -> float:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _start_time(pid: int, boot: float) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / _CLK_TCK  # field 22 of stat; 20th after "(comm) "
    except (OSError, ValueError, IndexError):
        return None


def _children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _child_name(pid: int) -> str | None:
    """The worker child's `--name` without its host: a host's /metrics names its own programs
    (`<host>/tp-worker-w0` is `tp-worker-w0`); other children (shells, helpers) are not listed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if b"telegram_platform.worker.child" in argv and b"--name" in argv:
        index = argv.index(b"--name") + 1
        return argv[index].decode(errors="replace").rsplit("/", 1)[-1] if index < len(argv) else None
    return None
